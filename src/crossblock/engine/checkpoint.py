"""Window checkpoints: what a killed run needs to continue bit-identically.

One safetensors file holds the state of every wrapped layer (integers of finished blocks,
learnable parameters of blocks still in a window) and, as metadata, the next window, the report
so far and a fingerprint of model + recipe + calibration data. Activation chains are not stored:
a resumed run recomputes them from the frozen blocks (see WindowEngine.replay), which costs one
forward pass and keeps checkpoints small however long the calibration set is. It is written
to a temporary file, fsynced and renamed over the previous one, so at any instant the file on
disk is a complete checkpoint (or absent).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import CrossblockError
from .distributed import rank_and_size

CHECKPOINT_FILE = "checkpoint.safetensors"


def checkpoint_path(folder: Path) -> Path:
    """One file per data-parallel rank, so that ranks never write the same path."""
    rank, size = rank_and_size()
    return Path(folder) / (CHECKPOINT_FILE if size == 1 else f"checkpoint-rank{rank}-of-{size}.safetensors")


def checkpoint_files(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob("checkpoint*.safetensors"))


@dataclass
class EngineState:
    next_window: int
    layers: dict[str, dict[str, torch.Tensor]]  # "block.name" -> QuantLinear.checkpoint_state()
    report: dict


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_checkpoint(folder: Path, state: EngineState, fingerprint: str):
    tensors = {}
    for layer, entries in state.layers.items():
        for key, value in entries.items():
            tensors[f"layer.{layer}/{key}"] = value
    meta = {"fingerprint": fingerprint, "next_window": str(state.next_window), "report": json.dumps(state.report)}
    path = checkpoint_path(folder)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_checkpoint(folder: Path, fingerprint: str) -> EngineState | None:
    path = checkpoint_path(folder)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        if meta.get("fingerprint") != fingerprint:
            raise CrossblockError(
                f"cannot resume from {path}: it was made with a different model, recipe or calibration "
                "data (start over with --overwrite, or resume with the original settings)")
        layers = {}
        for key in f.keys():
            layer, _, name = key.removeprefix("layer.").partition("/")
            layers.setdefault(layer, {})[name] = f.get_tensor(key)
    return EngineState(int(meta["next_window"]), layers, json.loads(meta["report"]))
