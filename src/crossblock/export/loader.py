"""Load any crossblock output folder into a plain transformers model with dense weights.

The folder's format is looked up in the registry (`folder_format`): a format that writes its own
file (gguf: model.gguf) is told by that file, the others by config.json's
`quantization_config["quant_method"]` (none: a dense fake-quant folder). Each format reads its
own folders (`Format.load`): for the packed kinds the dense weights are recomputed from the
integers exactly as the fake-quant model computes them, and each layer gets its
`crossblock_qweight` back. Activation quantizers are re-attached by `crossblock.load`, from
crossblock.json (any format).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import CrossblockError
from .common import read_config
from .formats import FORMATS, Format


def folder_format(path: str | os.PathLike) -> Format:
    """The registered format whose folder `path` is."""
    forms = [FORMATS[name]() for name in FORMATS.names()]
    for form in forms:
        if form.file is not None and form.recognizes(Path(path), None):
            return form
    quantization = read_config(path).get("quantization_config")
    for form in forms:
        if form.file is None and form.recognizes(Path(path), quantization):
            return form
    method = quantization.get("quant_method") if isinstance(quantization, dict) else quantization
    readable = ", ".join(f.kind_name for f in forms if f.file is None)
    raise CrossblockError(f"{path}: cannot load quant_method {method!r} (crossblock loads {readable} folders)")


def load(path: str | os.PathLike, device: str = "cpu", dtype: torch.dtype | None = None,
         trust_remote_code: bool = False):
    """A transformers causal LM with dense (dequantized) weights on `device`, in `dtype`
    (default: the checkpoint's). Packed weights are dequantized straight into `dtype`, so a
    float32 load gives exactly scale * (q - zero)."""
    return folder_format(path).load(path, device, dtype, trust_remote_code)
