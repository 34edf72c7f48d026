"""Spill files and the streaming safetensors writer of the low-memory path (stream.py).

A finished block goes to a spill file (safetensors, with the block's layout in its metadata); the
output shards are then written by transformers' save_pretrained with its safetensors write replaced
by `write_safetensors`, which copies each tensor's bytes file to file from the spill file (or model
shard) it views, so no shard is ever whole in memory.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
from pathlib import Path

import torch

from .errors import CrossblockError


def save_spill(tensors: dict, path: Path, meta: dict):
    write_safetensors(tensors, path, metadata={"crossblock": json.dumps(meta)})


def save_block_spill(given: dict, saved: dict, path: Path, layout: dict):
    """A finished block's spill file: the tensors save_pretrained will write (`saved`, its
    conversion of `given`), each storage once with every saved tensor a view of one (the
    sharding counts a storage shared by views once, as in memory: e.g. the per-expert matrices
    of a fused parameter); and the tensors the writer hands to save_pretrained (`given`): views
    of those storages, or, where the conversion makes new tensors of them (fused experts split
    and copied), only their dtype and shape (it runs on the meta device at write time)."""
    storages, blobs = {}, {}

    def view(t):
        s = t.untyped_storage()
        if s.data_ptr() not in storages:
            storages[s.data_ptr()] = len(storages)
            blobs[f"storage.{len(blobs)}"] = torch.empty(0, dtype=torch.uint8).set_(s)
        return [storages[s.data_ptr()], DTYPE_NAMES[t.dtype], t.storage_offset(), list(t.shape), list(t.stride())]

    views = {k: view(t) for k, t in saved.items()}
    written = set(storages)
    inputs = {k: view(t) if t.untyped_storage().data_ptr() in written else [DTYPE_NAMES[t.dtype], list(t.shape)]
              for k, t in given.items()}
    save_spill(blobs, path, {**layout, "saved": views, "given": inputs})


def open_block_spill(path: Path, mapped: Mapped) -> tuple[dict, dict, dict]:
    """(given, saved, layout) of `save_block_spill`: views of the file's mapping, and meta
    tensors for what only has a dtype and shape."""
    blobs, meta = open_spill(path, mapped)

    def tensor(v):
        if len(v) == 2:
            return torch.empty(v[1], dtype=SAFETENSORS_DTYPES[v[0]], device="meta")
        i, dtype, offset, shape, stride = v
        return blobs[f"storage.{i}"].view(SAFETENSORS_DTYPES[dtype]).as_strided(shape, stride, offset)

    saved = {k: tensor(v) for k, v in meta.pop("saved").items()}
    given = {k: tensor(v) for k, v in meta.pop("given").items()}
    return given, saved, meta


def read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


class Mapped:
    """Files mapped privately into memory, for tensors that view them: the writer finds the file
    range a tensor views and copies it file to file (no page of the mapping is touched)."""

    def __init__(self):
        self.maps: list[tuple[int, int, Path, mmap.mmap]] = []  # (address, length, file, mapping)

    def map(self, path: Path) -> mmap.mmap | None:
        size = path.stat().st_size
        if not size:
            return None
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
        self.maps.append((torch.frombuffer(mm, dtype=torch.uint8).data_ptr(), size, path, mm))
        return mm

    def file_range(self, t: torch.Tensor) -> tuple[Path, int, int] | None:
        """(file, offset, length) of a contiguous tensor viewing a mapped file; None otherwise."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return None
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
        for address, size, path, _ in self.maps:
            if address <= start and start + nbytes <= address + size:
                return path, start - address, nbytes
        return None


def open_spill(path: Path, mapped: Mapped, only: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The file's tensors (`only` that one, if given) as views of a private memory map (no page
    is read until touched, and the writer never touches them: it copies file to file)."""
    header, start = read_header(path)
    meta = json.loads(header.pop("__metadata__", {}).get("crossblock", "{}"))
    if only is not None:
        header = {only: header[only]}
    mm = mapped.map(path)
    tensors = {}
    for key, h in header.items():
        lo, hi = h["data_offsets"]
        dtype = SAFETENSORS_DTYPES[h["dtype"]]
        if hi > lo:
            raw = torch.frombuffer(mm, dtype=torch.uint8, count=hi - lo, offset=start + lo)
            t = raw.view(dtype).view(h["shape"])
        else:
            t = torch.empty(h["shape"], dtype=dtype)
        tensors[key] = t
    return tensors, meta


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                      "U8": torch.uint8, "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32,
                      "U64": torch.uint64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


def safetensors_order(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The order safetensors lays tensors out in (by dtype, then name), asked of safetensors
    itself on one-element stand-ins."""
    from safetensors.torch import save
    raw = save({k: torch.zeros(1, dtype=t.dtype) for k, t in tensors.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


def write_safetensors(tensors: dict[str, torch.Tensor], filename, mapped: Mapped | None = None,
                      metadata: dict | None = None):
    """What safetensors.torch.save_file(tensors, filename, metadata) writes, byte for byte, each
    tensor's bytes copied from the file range it views (`mapped`), or written straight from its
    memory (save_file would first copy every tensor to bytes)."""
    order = safetensors_order(tensors)
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for key in order:
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    with open(filename, "wb") as out:
        out.write(struct.pack("<Q", len(text)) + text)
        for key in order:
            t = tensors[key]
            if t.device.type == "meta":
                raise CrossblockError(f"low-memory writer: no bytes for {key} (a spill file does not hold it)")
            found = mapped.file_range(t) if mapped is not None else None
            if found is None:
                out.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
                continue
            path, start, nbytes = found
            with open(path, "rb") as src:
                copy_range(src, out, start, nbytes)


def copy_range(src, dst, start: int, nbytes: int):
    """Copy bytes file to file in the kernel, not through this process's memory."""
    dst.flush()
    while nbytes:
        done = os.copy_file_range(src.fileno(), dst.fileno(), nbytes, start)
        if done == 0:
            raise CrossblockError(f"spill file {src.name} is shorter than its header says")
        start, nbytes = start + done, nbytes - done


@contextlib.contextmanager
def streamed_safetensors(mapped: Mapped, saved: dict[str, torch.Tensor]):
    """transformers' save_pretrained writing each shard with write_safetensors, and its save-time
    conversion run on the tensors it is given, where a tensor it converts into new ones is a meta
    placeholder: each such result is the block spill's tensor of that name (`saved`), so no
    converted copy of the whole model is made."""
    import transformers.modeling_utils as mu
    original_save, original_revert = mu.safe_save_file, mu.revert_weight_conversion

    def revert(model, state):
        out = original_revert(model, state)
        missing = [k for k, t in out.items() if t.device.type == "meta" and k not in saved]
        if missing:
            raise CrossblockError(f"low-memory writer: save_pretrained saves {missing[0]}, which no spill file holds")
        return {k: saved[k] if t.device.type == "meta" else t for k, t in out.items()}

    mu.safe_save_file = lambda tensors, filename, metadata=None: write_safetensors(tensors, filename, mapped, metadata)
    mu.revert_weight_conversion = revert
    try:
        yield
    finally:
        mu.safe_save_file, mu.revert_weight_conversion = original_save, original_revert
