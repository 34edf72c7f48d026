"""What the exports share: finding the quantized layers, writing and reading HF folders, and
building a dense transformers model from a state dict.

Writing goes through `save_pretrained(state_dict=...)`, so sharding, tied-weight removal and
transformers' own checkpoint key renaming stay transformers' business; the exports only swap
each quantized layer's `weight` for their packed tensors and add `quantization_config`.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import CrossblockError
from ..model.adapter import is_linear
from ..model.loading import from_pretrained_exactly
from ..quant.grid import QuantizedWeight
from ..quant.linear import is_conv1d
from .schema import check_qweight, need, read_json

log = logging.getLogger(__name__)


def quantized_layers(model: nn.Module) -> dict[str, tuple[nn.Module, QuantizedWeight]]:
    """Every layer carrying `crossblock_qweight`, by module name."""
    return {name: (module, module.crossblock_qweight) for name, module in model.named_modules()
            if getattr(module, "crossblock_qweight", None) is not None}


def scales_off_grid(layers: dict[str, tuple[nn.Module, QuantizedWeight]], dtype: torch.dtype) -> list[str]:
    """The uniform-grid layers whose scales are not `dtype` values (storing them rounds them);
    GGUF types keep their own scale codes."""
    return [name for name, (_, qw) in layers.items()
            if qw.kind == "uniform" and not torch.equal(qw.scale.to(dtype).to(qw.scale.dtype), qw.scale)]


def warn_if_scales_round(fmt: str, layers: dict[str, tuple[nn.Module, QuantizedWeight]], dtype: torch.dtype):
    """The formats store scales in `dtype`; float32 scales off that grid make the checkpoint
    differ (slightly) from the fake-quant model it comes from."""
    rounded = scales_off_grid(layers, dtype)
    if rounded:
        log.warning("%s stores scales in %s: %d layers (e.g. %s) round their float32 scales, so the "
                    "checkpoint differs slightly from the fake-quant model", fmt, dtype, len(rounded), rounded[0])


def routers(unquantized: list[dict]) -> list[str]:
    """Module names of the MoE routers (left in full precision), from the unquantized-weights list."""
    return [w["name"].rpartition(".")[0] for w in unquantized if w["why"] == "router"]


def unquantized_linears(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules()
            if is_linear(module) and getattr(module, "crossblock_qweight", None) is None]


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model's parameters in `dtype`, its buffers as they are: `model.to(dtype)` would also round
    RoPE's inv_freq, which transformers keeps in float32 for a model loaded in `dtype`."""
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def save_folder(model: nn.Module, tokenizer, out_dir: str | os.PathLike, state_dict: dict | None = None):
    """Safetensors weights, config.json, generation config and tokenizer, all inside out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def read_config(path: str | os.PathLike) -> dict:
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise CrossblockError(f"{path} is not a model folder: config.json is missing")
    return read_json(config_file)


def write_quantization_config(out_dir: str | os.PathLike, quantization_config: dict):
    config_file = Path(out_dir) / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"] = quantization_config
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def plain_config(path: str | os.PathLike, trust_remote_code: bool = False):
    """The model config without its quantization_config, so transformers builds a dense model."""
    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if isinstance(config.dtype, str):
        config.dtype = getattr(torch, config.dtype)
    return config


def load_dense(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False) -> nn.Module:
    """A folder of dense weights (safetensors only: a pickled .bin is never unpickled)."""
    from transformers import AutoModelForCausalLM
    model = from_pretrained_exactly(AutoModelForCausalLM, path, path, dtype="auto",
                                    trust_remote_code=trust_remote_code, use_safetensors=True)
    model = model.to(device).eval()
    return model if dtype is None else cast_parameters(model, dtype)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a folder's model weights: model.safetensors, or the shards its index names
    (never other .safetensors files beside them: a run's checkpoints, side files)."""
    index = Path(path) / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({Path(path) / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = [Path(path) / "model.safetensors"]
    if not all(f.is_file() for f in files):
        raise CrossblockError(f"{path} holds no model.safetensors (or shards its index names)")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(load_file(file))
    return tensors


def layer_shape(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a linear layer's weight (Conv1D stores it transposed); None for other modules."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        return None
    return tuple(w.t().shape if type(module).__name__ == "Conv1D" else w.shape)


def skeleton(config, trust_remote_code: bool = False) -> nn.Module:
    """The model's module tree on the meta device: names and layer types, no memory."""
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def dense_weight(qweight: QuantizedWeight, module: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The fake-quant weight in the module's own layout (Conv1D stores (in, out))."""
    w = qweight.dequantize().to(dtype)
    return w.t().contiguous() if is_conv1d(module) else w


def build_model(config, state_dict: dict, qweights: dict[str, QuantizedWeight], device: str,
                trust_remote_code: bool = False, where="the checkpoint"):
    """A plain transformers model with dense weights, `crossblock_qweight` re-attached.

    `state_dict` holds the unquantized tensors; each quantized layer's dense weight is
    computed here from its integers, so that the model equals the fake-quant one."""
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else torch.float32
    layout = skeleton(config, trust_remote_code)
    linears = {n for n, m in layout.named_modules() if is_linear(m)}
    # "<parameter>#experts": a fused 3-D expert parameter, its integers over the (E * out, in) view
    experts = {k.removesuffix("#experts"): qweights.pop(k) for k in list(qweights) if k.endswith("#experts")}
    for name, qweight in qweights.items():
        need(name in linears, f"quantized layer {name}", "not a linear layer of the model")
        check_qweight(name, qweight, layout.get_submodule(name))
        state_dict[f"{name}.weight"] = dense_weight(qweight, layout.get_submodule(name), dtype)
    for name, qweight in experts.items():
        state_dict[name] = qweight.dequantize().to(dtype).reshape(layout.get_parameter(name).shape)
    model = from_pretrained_exactly(type(layout), where, None, config=config, state_dict=state_dict, dtype=dtype)
    model.to(device).eval()
    for name, qweight in qweights.items():
        model.get_submodule(name).crossblock_qweight = qweight
    for name, qweight in experts.items():
        module, _, param = name.rpartition(".")
        module = model.get_submodule(module)
        module.crossblock_qexperts = {**(getattr(module, "crossblock_qexperts", None) or {}), param: qweight}
    return model
