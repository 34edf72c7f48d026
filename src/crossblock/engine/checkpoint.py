"""Window checkpoints: what a killed run needs to continue bit-identically.

A finished block's integers never change again, so each is written once, to its own file
(`checkpoint.block{j}.safetensors`), when it freezes; the window checkpoint holds the learnable
parameters of blocks still in a window and, as metadata, the next window, the list of finished
blocks, the report so far and a fingerprint of model + recipe + calibration data (also stamped
on every block file); rewriting every finished block after each window would cost O(blocks²)
writes. Activation chains are not stored: a resumed run recomputes them from the frozen blocks
(see WindowEngine.replay), which costs one forward pass and keeps checkpoints small however long
the calibration set is. Every file is written to a temporary name, fsynced and renamed, so at
any instant each file on disk is complete (or absent).
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
from ..distributed import rank_and_size

CHECKPOINT_FILE = "checkpoint.safetensors"


def checkpoint_path(folder: Path) -> Path:
    """One file per data-parallel rank, so that ranks never write the same path."""
    rank, size = rank_and_size()
    return Path(folder) / (CHECKPOINT_FILE if size == 1 else f"checkpoint-rank{rank}-of-{size}.safetensors")


def checkpoint_files(folder: Path) -> list[Path]:
    """Every checkpoint file, and the temporary file of a write a crash interrupted."""
    return sorted(Path(folder).glob("checkpoint*.safetensors*"))


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


def block_path(folder: Path, block: int) -> Path:
    path = checkpoint_path(folder)
    return path.with_name(f"{path.stem}.block{block}.safetensors")


def write_atomic(path: Path, layers: dict[str, dict[str, torch.Tensor]], meta: dict):
    tensors = {f"layer.{layer}/{key}": value for layer, entries in layers.items() for key, value in entries.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_layers(path: Path, fingerprint: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata, layers) of one checkpoint file made by the run `fingerprint` identifies."""
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
    return meta, layers


def block_of(layer: str) -> int:
    """The block index of a layer key ("3.self_attn.q_proj" -> 3)."""
    return int(layer.split(".", 1)[0])


def finished_blocks(layers: dict[str, dict[str, torch.Tensor]]) -> dict[int, dict]:
    """Blocks whose every layer holds its final integers ("q"), with those layers."""
    blocks: dict[int, dict] = {}
    for layer, entries in layers.items():
        blocks.setdefault(block_of(layer), {})[layer] = entries
    return {j: ls for j, ls in blocks.items() if all("q" in e for e in ls.values())}


def write_checkpoint(folder: Path, state: EngineState, fingerprint: str, on_disk: set[int] | None = None):
    """`on_disk`: blocks known to have their file already (a set the caller keeps across windows),
    so that each block file is written, or its header checked, once per run."""
    on_disk = set() if on_disk is None else on_disk
    finished = finished_blocks(state.layers)
    for j, layers in finished.items():  # block files first: the window checkpoint refers to them
        path = block_path(folder, j)
        if j not in on_disk and not (path.is_file() and read_fingerprint(path) == fingerprint):
            write_atomic(path, layers, {"fingerprint": fingerprint})
        on_disk.add(j)
    live = {k: v for k, v in state.layers.items() if block_of(k) not in finished}
    write_atomic(checkpoint_path(folder), live, {
        "fingerprint": fingerprint, "next_window": str(state.next_window), "report": json.dumps(state.report),
        "finished_blocks": json.dumps(sorted(finished))})


def read_fingerprint(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata().get("fingerprint")


def read_checkpoint(folder: Path, fingerprint: str) -> EngineState | None:
    path = checkpoint_path(folder)
    if not path.is_file():
        return None
    meta, layers = read_layers(path, fingerprint)
    for j in json.loads(meta.get("finished_blocks", "[]")):
        if not block_path(folder, j).is_file():
            raise CrossblockError(f"cannot resume from {path}: {block_path(folder, j).name}, which it needs, "
                                  "is missing (start over with --overwrite)")
        layers.update(read_layers(block_path(folder, j), fingerprint)[1])
    return EngineState(int(meta["next_window"]), layers, json.loads(meta["report"]))
