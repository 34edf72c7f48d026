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

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CrossblockError
from ..distributed import rank_and_size

CHECKPOINT_FILE = "checkpoint.safetensors"
STAGE_SECTIONS = ("finetune",)  # checkpoint sections of stages other than the windows (not block layers)


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
    # finished blocks whose layers are only in their block files (not in `layers`): those the block
    # store dropped (engine/blocks.py), or all of them in a `lazy` read; and how to read one of them
    # when the block is needed again
    released: list[int] = field(default_factory=list)
    read_block: Callable[[int], dict] | None = None


def fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def block_path(folder: Path, block: int) -> Path:
    path = checkpoint_path(folder)
    return path.with_name(f"{path.stem}.block{block}.safetensors")


def digest(meta: dict, tensors: dict[str, tuple]) -> str:
    """Binds a file's metadata to its tensors' names, shapes and dtypes: a tampered or
    truncated-and-patched checkpoint (say, an edited next_window) no longer matches."""
    h = hashlib.sha256(json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True).encode())
    for key in sorted(tensors):
        h.update(f"{key}:{tensors[key]}".encode())
    return h.hexdigest()


def layout(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()}


def write_atomic(path: Path, layers: dict[str, dict[str, torch.Tensor]], meta: dict):
    tensors = {f"layer.{layer}/{key}": value for layer, entries in layers.items() for key, value in entries.items()}
    tmp = path.with_name(path.name + ".tmp")
    meta = dict(meta, digest=digest(meta, layout(tensors)))
    save_file(tensors, str(tmp), metadata=meta)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def corrupt(path: Path, why: str) -> CrossblockError:
    return CrossblockError(f"cannot resume from {path}: {why} (start over with --overwrite)")


def read_layers(path: Path, fingerprint: str) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    """(metadata, layers) of one checkpoint file made by the run `fingerprint` identifies."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("fingerprint") != fingerprint:
                raise CrossblockError(
                    f"cannot resume from {path}: it was made with a different model, recipe or calibration "
                    "data (start over with --overwrite, or resume with the original settings)")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise corrupt(path, f"not a readable checkpoint ({str(e).strip().splitlines()[0] if str(e).strip() else e})") from None
    if meta.get("digest") != digest(meta, layout(tensors)):
        raise corrupt(path, "its metadata does not match its tensors (a damaged or edited file)")
    layers = {}
    for key, value in tensors.items():
        layer, _, name = key.removeprefix("layer.").partition("/")
        if not (key.startswith("layer.") and name and (layer.split(".", 1)[0].isdigit() or layer in STAGE_SECTIONS)):
            raise corrupt(path, f"unexpected tensor {key!r}")
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise corrupt(path, f"tensor {key} holds NaN or Inf")
        layers.setdefault(layer, {})[name] = value
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
        "finished_blocks": json.dumps(sorted({*finished, *state.released}))})


def read_fingerprint(path: Path) -> str | None:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata().get("fingerprint")


def read_checkpoint(folder: Path, fingerprint: str, lazy: bool = False) -> EngineState | None:
    """The state to continue from; `lazy` (the low-memory path, whose store drops finished
    blocks): finished blocks' layers are read only when the engine needs the block
    (`EngineState.read_block`), not all at once."""
    path = checkpoint_path(folder)
    if not path.is_file():
        return None
    meta, layers = read_layers(path, fingerprint)
    try:
        next_window, finished, report = (int(meta["next_window"]), json.loads(meta["finished_blocks"]),
                                         json.loads(meta["report"]))
    except (KeyError, ValueError, RecursionError):
        raise corrupt(path, "its metadata is incomplete or malformed") from None
    report = report if isinstance(report, dict) else {}
    windows, blocks = report.get("windows"), report.get("blocks", [])
    if not (isinstance(windows, list) and next_window == len(windows) > 0 and isinstance(finished, list)
            and all(type(j) is int and j >= 0 for j in finished) and isinstance(blocks, list)
            and all(isinstance(b, dict) for b in blocks)
            and ("blocks" not in report or len(blocks) == len(finished)
                                      and sorted(finished) == sorted(b["block"] for b in blocks if type(b.get("block")) is int))):
        raise corrupt(path, "its next window, finished blocks and report disagree")
    for j in finished:
        if not block_path(folder, j).is_file():
            raise CrossblockError(f"cannot resume from {path}: {block_path(folder, j).name}, which it needs, "
                                  "is missing (start over with --overwrite)")
        if not lazy:
            layers.update(read_layers(block_path(folder, j), fingerprint)[1])
    if lazy:
        return EngineState(next_window, layers, report, released=sorted(finished),
                           read_block=lambda j: read_layers(block_path(folder, j), fingerprint)[1])
    return EngineState(next_window, layers, report)
