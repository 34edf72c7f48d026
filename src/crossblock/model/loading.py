"""Every model crossblock loads holds exactly its checkpoint's weights: a weight transformers
reports missing (it would be newly initialized: random values, or ones for a norm), unexpected
(in the files, but no part of the model) or of a mismatched shape is refused in one line that
names it, instead of being quantized, evaluated or saved as if it were the model's.

Tied weights (lm_head = embeddings) and buffers transformers computes (rotary inv_freq) are not
reported: transformers already leaves them out of its loading info, and the low-memory reader
(stream.py) applies transformers' own exception rules to what it finds."""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import CrossblockError
from ..spill import SAFETENSORS_DTYPES, read_header


class _DropLoadReport(logging.Filter):
    """transformers logs a multi-line LOAD REPORT table before it raises or returns; crossblock
    refuses the same findings in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def no_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def refuse_unloaded(where, missing=(), unexpected=(), mismatched=()):
    """One line naming the first weight (by name) that the checkpoint at `where` does not fill
    exactly; `mismatched`: (name, checkpoint shape, model shape)."""
    def more(found) -> str:
        return f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted(mismatched, key=lambda m: m[0])
    if missing:
        raise CrossblockError(f"{where}: weight {missing[0]}{more(missing)} is missing from the checkpoint "
                              "(transformers would make up its values); the files and config.json do not match")
    if mismatched:
        name, stored, expected = mismatched[0]
        raise CrossblockError(f"{where}: weight {name}{more(mismatched)} has shape {tuple(stored)} in the checkpoint, "
                              f"the model {tuple(expected)}; the files and config.json do not match")
    if unexpected:
        raise CrossblockError(f"{where}: weight {unexpected[0]}{more(unexpected)} in the checkpoint is no part of the "
                              "model its config.json describes; the files and config.json do not match")


def from_pretrained_exactly(cls, where, *args, **kwargs):
    """`cls.from_pretrained(*args, **kwargs)`, refused (refuse_unloaded) unless every weight of
    the model comes from the checkpoint and every checkpoint tensor goes into the model. A local
    safetensors checkpoint's files are checked first (named when unreadable), and a floating-point
    weight stored as integers is refused (from_pretrained would cast it), as on the low-memory path."""
    folder = Path(args[0]) if args and args[0] is not None and "gguf_file" not in kwargs else None
    source = Source(folder) if folder is not None and folder.is_dir() and weight_files(folder) else None
    with no_load_report():
        model, info = cls.from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    refuse_unloaded(where, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    if source is not None:
        source.follow_conversions(model)
        source.refuse_integers(model)
    return model


# -- a safetensors checkpoint's files, read one tensor at a time (stream.py's reader) -----------
class Source:
    """The model's safetensors shards: which file holds each tensor, read one tensor at a time.
    Model names differ from checkpoint names where transformers converts at load (its conversion
    mapping: renamed keys, and e.g. per-expert matrices merged into fused 3-D experts); those are
    read the way from_pretrained reads them (`follow_conversions`)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        indexed = index_map(self.folder)
        names = weight_files(self.folder)
        self.stats: dict[str, tuple] = {}  # file -> its identity when the run started (`unchanged`)
        held = {name: self.check_file(name) for name in names}
        self.where: dict[str, str] = {}
        for name, keys in held.items():
            self.where.update({k: name for k in keys if k not in self.where})
        # the index's file where it holds the key; one the index puts in the wrong file is read
        # from the file that holds it, as from_pretrained reads it
        self.where.update({k: f for k, f in indexed.items() if k in held[f]})
        self.real_buffers: set[str] = set()  # state-dict keys the skeleton already holds (buffers)
        self.alias: dict[str, str] = {}  # model name -> the checkpoint name it is stored under
        self.converted: dict[str, Conversion] = {}  # model name -> the conversion that builds it
        self.unconverted: dict[str, str] = {}  # model name -> why its conversion cannot run ahead of time
        self.unexpected: set[str] = set()  # checkpoint keys that are no part of the model
        self.mismatched: list[tuple] = []  # (name, checkpoint shape, model shape) found by follow_conversions
        self.model = None
        self.headers: dict[str, dict] = {}

    # -- the files: checked once, then read only as they were when the run started -------------
    def check_file(self, name: str) -> set[str]:
        """A shard's keys, once safetensors accepts its header (offsets, dtypes, the file fully
        covered), or one line naming the file; its identity is recorded for `unchanged`."""
        from safetensors import safe_open
        path = self.folder / name
        try:
            st = path.stat()
            with safe_open(str(path), framework="pt") as f:
                keys = set(f.keys())
        except Exception as e:  # noqa: BLE001 - OSError, safetensors' own error: an unreadable input
            raise CrossblockError(f"{path}: not a readable safetensors file ({first_line(e)})") from None
        self.stats[name] = identity(st)
        return keys

    def unchanged(self, name: str):
        """Refuse a shard that is not the file it was when the run started (replaced, rewritten,
        removed): blocks read before and after would come from two different checkpoints."""
        path = self.folder / name
        try:
            now = identity(path.stat())
        except OSError:
            now = None
        if now != self.stats[name]:
            raise CrossblockError(f"{path}: {'removed' if now is None else 'replaced or modified'} while this run was "
                                  "reading it, so the output would mix two checkpoints: run again once the model "
                                  "folder stays unchanged (--resume continues only from the same weights)")

    def unchanged_all(self):
        for name in self.stats:
            self.unchanged(name)

    @contextlib.contextmanager
    def opened(self, name: str):
        """safe_open of a shard, checked `unchanged` after reading (a replacement by rename is
        read from the old file by an open handle, and found here), a read error named."""
        from safetensors import safe_open
        path = self.folder / name
        try:
            with safe_open(str(path), framework="pt") as f:
                yield f
        except Exception as e:  # noqa: BLE001 - OSError, safetensors' own error
            if isinstance(e, CrossblockError):
                raise
            self.unchanged(name)
            raise CrossblockError(f"{path}: cannot read it ({first_line(e)})") from None
        self.unchanged(name)

    def follow_conversions(self, model: nn.Module):
        """Each checkpoint key renamed as from_pretrained renames it (transformers' rename_source_key
        over the model's conversion mapping): a plain renaming becomes an alias, a converter's
        sources are gathered per model tensor into a Conversion. Returns the transforms used, for the
        skeleton to record as from_pretrained records them (save_pretrained reverts the same ones)."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
        self.model = model
        transforms = get_model_conversion_mapping(model)
        renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
        converters = [t for t in transforms if isinstance(t, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        names, base = model.state_dict(), model.base_model_prefix
        conversions: dict[str, Conversion] = {}
        for key in sorted(self.where, key=dot_natural_key):  # from_pretrained's order: experts 0, 1, ..., 10
            target, pattern = rename_source_key(key, renamings, converters, base, names)
            if target not in names and key in names:
                target, pattern = rename_source_key(key, [], [], base, names)
            if target not in names:
                self.unexpected.add(key)  # as from_pretrained reports it
                continue
            if pattern is not None:
                conversions.setdefault(target, Conversion(by_pattern[pattern], target)).sources.append((pattern, key))
            elif target != key:
                self.where[target], self.alias[target] = self.where[key], key
        for target, conversion in conversions.items():
            try:
                built = conversion.run(self.model, self.placeholder)  # names only: on the meta device
            except Exception as e:  # noqa: BLE001 - an operation that needs values: refused (refuse_unsupported)
                self.unconverted[target] = f"{type(e).__name__}: {e}"
                self.mismatched.extend(uneven(conversion, self.placeholder))  # or sources of unequal shapes
                continue
            self.converted.update(dict.fromkeys(built, conversion))
            self.mismatched.extend((k, t.shape, names[k].shape) for k, t in built.items() if t.shape != names[k].shape)
        self.headers.clear()  # only the names needed them
        return [t for t in transforms if t.was_used()]

    def placeholder(self, key: str) -> torch.Tensor:
        """A checkpoint tensor's dtype and shape on the meta device, from its file's header."""
        file = self.where[key]
        if file not in self.headers:
            self.headers[file] = read_header(self.folder / file)[0]
        h = self.headers[file][key]
        if h["dtype"] not in SAFETENSORS_DTYPES:
            raise CrossblockError(f"{self.folder / file}: {key} is stored as {h['dtype']}, which crossblock does not "
                                  "read: run without --low-memory")
        return torch.empty(h["shape"], dtype=SAFETENSORS_DTYPES[h["dtype"]], device="meta")

    def check_complete(self, model: nn.Module):
        """Refuse, as the in-memory load does (model/loading.py), a weight of the model found in no
        checkpoint tensor, a checkpoint tensor of no model weight, or one of another shape.
        Run after `tie`: a tied weight stored under either name is found."""
        from types import SimpleNamespace
        state = model.state_dict()
        info = SimpleNamespace(unexpected_keys=set(self.unexpected), missing_keys={
            k for k in state if k not in self.where and k not in self.converted and k not in self.unconverted
            and k not in self.real_buffers})
        model._adjust_missing_and_unexpected_keys(info)  # transformers' own exceptions (e.g. old inv_freq keys)
        mismatched = list(self.mismatched)
        for k, t in state.items():
            if k in self.where and k not in self.real_buffers:
                stored = self.placeholder(self.alias.get(k, k)).shape
                if stored != t.shape:
                    mismatched.append((k, stored, t.shape))
        refuse_unloaded(self.folder, info.missing_keys, info.unexpected_keys, mismatched)
        self.refuse_integers(model)

    def refuse_integers(self, model: nn.Module):
        """Refuse a floating-point weight of the model stored as integers (or booleans):
        transformers casts them to floats without a word, so the model would be quantized,
        evaluated or saved with values that are not its own."""
        for k, t in model.state_dict().items():
            if not t.is_floating_point() or k in self.real_buffers:
                continue
            stored = [key for _, key in self.converted[k].sources] if k in self.converted else \
                [self.alias.get(k, k)] if k in self.where else []
            for key in stored:
                dtype = self.placeholder(key).dtype
                if not dtype.is_floating_point:
                    raise CrossblockError(f"{self.folder / self.where[key]}: weight {key} is stored as "
                                          f"{str(dtype).removeprefix('torch.')}, but "
                                          f"{'it is a floating-point weight' if k == key else f'the model weight {k} it builds is floating point'} "
                                          "(transformers would cast the integers silently); the files and config.json "
                                          "do not match")
        self.headers.clear()

    def untie_distinct(self, model: nn.Module, rows: int = 4096):
        """A tied pair (lm_head = embeddings) that the checkpoint stores under both names with
        different values (a config that says tied, files that are not) is untied, as from_pretrained
        unties it, so that the head written is the checkpoint's, as on the in-memory path. The two
        are compared `rows` rows at a time, in the model's dtype."""
        dtype = next(model.parameters()).dtype
        for target, origin in list(getattr(model, "all_tied_weights_keys", {}).items()):
            if target not in self.where or origin not in self.where:
                continue
            pairs = zip(self.chunks(target, rows), self.chunks(origin, rows))
            if all(a.to(dtype).equal(b.to(dtype)) for a, b in pairs):
                continue
            print(f"crossblock: {self.folder}: config.json ties {target} to {origin}, but the checkpoint holds both "
                  f"with different values: kept apart, as transformers keeps them", file=sys.stderr)
            parent, _, name = target.rpartition(".")
            module = model.get_submodule(parent) if parent else model
            tied = getattr(module, name)
            setattr(module, name, nn.Parameter(torch.empty_like(tied, device="meta"), requires_grad=tied.requires_grad))
            model.all_tied_weights_keys.pop(target)  # as from_pretrained: save_pretrained writes both

    def tie(self, model: nn.Module):
        """Tied weights (lm_head = embeddings) are stored once: the other name reads that one."""
        groups: dict[int, list[str]] = {}
        for k, t in model.state_dict(keep_vars=True).items():
            groups.setdefault(id(t), []).append(k)
        for keys in groups.values():
            stored = [k for k in keys if k in self.where]
            for k in keys:
                if stored and k not in self.where:
                    self.where[k] = self.where[stored[0]]
                    self.alias[k] = self.alias.get(stored[0], stored[0])

    def chunks(self, key: str, rows: int):
        """The tensor `rows` rows at a time, the file mapped only while one chunk is read (the
        pages of a mapping that stays open would stay resident: a whole embedding)."""
        file, key = self.where[key], self.alias.get(key, key)
        with self.opened(file) as f:
            shape = f.get_slice(key).get_shape()
        for lo in range(0, shape[0], rows) if shape else [None]:
            with self.opened(file) as f:
                part = f.get_slice(key)
                yield part[:] if lo is None else part[lo:lo + rows]

    def read(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One model tensor: read as stored, or built by its conversion."""
        if key in self.converted:
            return self.read_many([key], dtype)[key]
        return self.read_stored(key, dtype)

    def read_stored(self, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor as stored (`key`: a model name or a checkpoint name), copied out of the
        file's mapping: a tensor that stayed a view of it would keep the mapping, and every page
        of the shard read so far, resident (RSS grew with depth)."""
        file, key = self.where[key], self.alias.get(key, key)
        with self.opened(file) as f:
            t = f.get_tensor(key)
            t = t.to(dtype if dtype is not None and t.is_floating_point() else t.dtype, copy=True)
        return t

    def read_many(self, keys, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Several tensors; a conversion that builds several of them (one-to-many) runs once."""
        out, done, keys = {}, set(), set(keys)
        for key in keys:
            conversion = self.converted.get(key)
            if conversion is None:
                out[key] = self.read_stored(key, dtype)
            elif id(conversion) not in done:
                done.add(id(conversion))
                built = conversion.run(self.model, lambda k: self.read_stored(k, dtype))
                out.update({k: v for k, v in built.items() if k in keys})
        return out


def uneven(conversion, placeholder) -> list[tuple]:
    """(checkpoint key, its shape, the shape most of the other sources have) for each source of a
    conversion (e.g. one expert's matrix among a layer's) whose shape differs from the others'."""
    import collections
    shapes = {key: tuple(placeholder(key).shape) for _, key in conversion.sources}
    usual = collections.Counter(shapes.values()).most_common(1)[0][0]
    return [(key, shape, usual) for key, shape in shapes.items() if shape != usual]


class Conversion:
    """One model tensor (or several, for a one-to-many converter) that transformers builds from
    checkpoint tensors with a WeightConverter, e.g. a layer's fused experts from its per-expert
    matrices: the converter's own operations run on the sources, read when needed."""

    def __init__(self, converter, target: str):
        self.converter, self.target = converter, target
        self.sources: list[tuple[str, str]] = []  # (the converter's source pattern, checkpoint key), in load order

    def run(self, model, read) -> dict[str, torch.Tensor]:
        """model name -> tensor; `read(checkpoint key)` gives each source."""
        converter = copy.deepcopy(self.converter)  # as from_pretrained: a fresh instance per target
        for pattern, key in self.sources:
            converter.add_tensor(self.target, key, pattern, functools.partial(read, key))
        built = converter.convert(self.target, model=model, config=model.config)
        return {k: v[0] if isinstance(v, list) else v for k, v in built.items()}


INDEX_FILE = "model.safetensors.index.json"


def weight_files(folder: Path) -> list[str]:
    """The safetensors files from_pretrained reads: its index's, else model.safetensors (not a
    fake folder's crossblock_unfolded.safetensors, nor a leftover checkpoint.safetensors)."""
    indexed = index_map(folder)
    if indexed:
        return sorted(set(indexed.values()))
    return ["model.safetensors"] if (Path(folder) / "model.safetensors").is_file() else []


def index_map(folder: Path) -> dict[str, str]:
    """The index's weight_map (tensor -> file of the folder), {} without an index."""
    from ..export.schema import need, read_json
    path = Path(folder) / INDEX_FILE
    if not path.is_file():
        return {}
    files = read_json(path).get("weight_map")
    need(isinstance(files, dict) and all(isinstance(k, str) and isinstance(f, str) and f and Path(f).name == f
                                         for k, f in files.items()), path, "weight_map must map tensor names to "
                                                                             "file names of the folder")
    return files


def identity(st: os.stat_result) -> tuple:
    """What changes when a file is replaced (another inode) or rewritten (size, mtime)."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
