"""Load any crossblock output folder into a plain transformers model with dense weights.

A GGUF folder (model.gguf, export/gguf.py) goes through transformers' GGUF loader. The other
three folder kinds are told apart by config.json's `quantization_config`:
- none: a fake-quant folder, loaded as is;
- "compressed-tensors": integers unpacked with the compressed-tensors library (CPU code);
- "gptq": integers unpacked here from the safetensors, no GPTQ kernel package involved.
For the packed kinds the dense weights are recomputed from the integers exactly as the
fake-quant model computes them, and each layer gets its `crossblock_qweight` back. Activation
quantizers are re-attached by `crossblock.load`, from crossblock.json (any format).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CrossblockError
from ..model.loading import from_pretrained_exactly
from .common import build_model, cast_parameters, read_config, read_tensors, skeleton


def plain_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model config without its quantization_config, so transformers builds a dense model."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if isinstance(config.dtype, str):
        config.dtype = getattr(torch, config.dtype)
    return config


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False):
    """A transformers causal LM with dense (dequantized) weights on `device`, in `dtype`
    (default: the checkpoint's). Packed weights are dequantized straight into `dtype`, so a
    float32 load gives exactly scale * (q - zero)."""
    from transformers import AutoModelForCausalLM
    from .gguf import FILE, load_gguf
    if (Path(path) / FILE).is_file():
        return load_gguf(path, device, dtype)
    quantization = read_config(path).get("quantization_config")
    if quantization is None:
        # safetensors only: a pickled .bin is never unpickled (crossblock writes safetensors)
        model = from_pretrained_exactly(AutoModelForCausalLM, path, path, dtype="auto",
                                        trust_remote_code=trust_remote_code, use_safetensors=True)
        model = model.to(device).eval()
        return model if dtype is None else cast_parameters(model, dtype)
    method = quantization.get("quant_method")
    config = plain_config(path, trust_remote_code)
    if dtype is not None:
        config.dtype = dtype
    tensors = read_tensors(path)
    if method == "compressed-tensors":
        from .compressed_tensors import read_compressed_tensors
        qweights = read_compressed_tensors(skeleton(config, trust_remote_code), quantization, tensors)
    elif method == "gptq":
        from .gptq import read_gptq
        qweights = read_gptq(quantization, tensors, skeleton(config, trust_remote_code))
    else:
        raise CrossblockError(f"{path}: cannot load quant_method {method!r} "
                              f"(crossblock loads fake-quant, compressed-tensors and gptq folders)")
    return build_model(config, {k: v.to(config.dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                       qweights, device, trust_remote_code, where=path)
