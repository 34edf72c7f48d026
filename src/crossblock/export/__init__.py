"""Checkpoint exports: one file per format (a `Format` registered in FORMATS: what it accepts,
writes and reads back), the loader that finds a folder's format in the registry, and `save`.
The compressed_tensors package is imported only when that format is written or read."""
from __future__ import annotations

import os

from torch import nn

# register the formats, in the order the CLI lists them
from . import fake, compressed_tensors, gptq, gguf  # noqa: F401
from .compressed_tensors import save_compressed_tensors
from .formats import FORMATS, Format, check_format, require_known_format
from .gptq import save_gptq
from .loader import load

__all__ = ["FORMATS", "Format", "check_format", "load", "save", "save_compressed_tensors", "save_gptq"]


def save(model: nn.Module, tokenizer, out_dir: str | os.PathLike, fmt: str, act_scheme: dict | None = None,
         grid: dict | None = None):
    """Write the quantized `model` (and tokenizer) into out_dir; returns what the format records
    in crossblock.json (a dict, or None).

    fmt "fake" writes the dense fake-quantized weights (any setting; act_scheme is not
    recorded); "compressed-tensors" and "gptq" write packed integers (limits: check_format). `grid`:
    the grid's finishing record (gguf: the dense types it rounded the embeddings and head to)."""
    return require_known_format(fmt).write(model, tokenizer, out_dir, act_scheme, grid)
