"""Low-memory quantization: weights stream from disk to disk, one window of blocks at a time.

The model is a skeleton on the meta device (its buffers, e.g. rotary frequencies, are real).
A block's weights are read from the model's safetensors shards (memory-mapped) when a window
needs it, and the block is dropped back to meta once it is frozen and checkpointed; on the way
out its output tensors (dense fake-quant or packed, in the saved dtype: the format's own
`Format.tensors`, which the in-memory writer calls on the whole model) are written to a spill
file in the run's staging folder. At the end the output shards are assembled from the spill
files by copying bytes file to file, through transformers' own `save_pretrained` (so sharding,
tied-weight removal and key names are the in-memory path's) with its safetensors write replaced
by `spill.write_safetensors`, which produces the same bytes without holding a shard in memory. So the
finished model is never whole in memory: at any time RAM holds the blocks of one window (plus
look-ahead), one block being written, and the activation chains.

Checkpoints whose names transformers converts at load (its conversion mapping: e.g. Mixtral's,
Qwen2-MoE's and Qwen3-MoE's per-expert matrices merged into fused 3-D experts) are read through
that mapping's own converters, one block's tensors at a time (`Source.follow_conversions`). On the
way out, save_pretrained reverts the conversion (fused experts are saved per expert again): each
finished block is spilled as save_pretrained will write it, and the output writer hands
save_pretrained meta placeholders where its conversion would copy (`streamed_safetensors`).

What needs the whole model (the rotate, cfp and finetune stages, the gguf grid and format, a
conversion outside the blocks or one saved as strided pieces) is refused by `refuse_unsupported`
before any work.
"""
from __future__ import annotations

import contextlib
import copy
import gc
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from .engine.blocks import BlockStore
from .engine.chains import trim_heap
from .spill import Mapped, open_block_spill, open_spill, save_block_spill, save_spill, streamed_safetensors
from .errors import CrossblockError
from .model.loading import Source

RAM_FRACTION = 0.5   # automatic choice: stream when the weights exceed this share of available RAM
SPILL_DIR = "stream"  # in the staging folder: one file per finished block, one per other tensor


# -- choosing the path ---------------------------------------------------------------------------
def weights_bytes(model_path) -> int:
    return sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))


def resumed_path(out: Path, resume: bool, low_memory: bool | None) -> bool | None:
    """A resumed run continues on the path it started on, which its staging folder tells (a
    low-memory run keeps its finished blocks in the spill folder, an in-memory one in its
    checkpoint): taken when not asked for, refused with the flag to use when asked otherwise."""
    from .engine.checkpoint import checkpoint_files
    from .output import partial_dir
    work = partial_dir(out)
    if not resume or not checkpoint_files(work):
        return low_memory
    streamed = (work / SPILL_DIR).is_dir()
    if low_memory is not None and low_memory != streamed:
        raise CrossblockError(f"{work} holds a run started {'with' if streamed else 'without'} --low-memory, whose "
                              f"finished blocks are kept {'in its spill folder' if streamed else 'in its checkpoint'}: "
                              f"resume it with {'--low-memory' if streamed else '--no-low-memory'} (or leave the flag "
                              "out), or start over with --overwrite")
    return streamed


def available_ram() -> int:
    """MemAvailable from /proc/meminfo (bytes); psutil elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.virtual_memory().available


def choose(model_path, low_memory: bool | None, dtype: str = "float32", quiet: bool = False) -> bool:
    """`low_memory` as asked, or (None) whether the weights, loaded in `dtype`, would exceed
    RAM_FRACTION of the available RAM; an automatic choice of streaming is said on stderr."""
    if low_memory is not None:
        return low_memory
    if not Path(model_path).is_dir() or not any(Path(model_path).glob("*.safetensors")):
        return False  # a hub id or .bin weights: the in-memory path
    size = loaded_bytes(model_path, dtype)
    avail = available_ram()
    if size <= RAM_FRACTION * avail:
        return False
    if not quiet:
        print(f"crossblock: the weights take {size / 2**30:.1f} GiB in {dtype}, over {RAM_FRACTION:.0%} of the "
              f"{avail / 2**30:.1f} GiB of available RAM: streaming them block by block (--low-memory; "
              f"--no-low-memory to load the whole model)", file=sys.stderr)
    return True


def loaded_bytes(model_path, dtype: str) -> int:
    """Bytes of the weights once loaded in `dtype` ("auto": as stored)."""
    size = weights_bytes(model_path)
    if dtype == "auto":
        return size
    config = json.loads((Path(model_path) / "config.json").read_text())
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    width = {"float32": 4, "float16": 2, "bfloat16": 2}
    return size * width.get(str(dtype), 4) // width.get(str(stored), 4)


def refuse_unsupported(recipe, format: str, model):
    """Everything the low-memory path cannot do, refused before any work (one place)."""
    if getattr(recipe, "choose", None) is not None:  # auto.AutoRecipe: compares schedules on a copy of the model
        raise CrossblockError("--low-memory cannot run --recipe auto: it compares schedules on a copy of the "
                              "model's first blocks (name a recipe, or run without --low-memory)")
    for stage in recipe.stages:  # the store's own check (BlockStore.admit), before any work
        BlockStream.admit(stage)
    from .export import FORMATS, require_known_format
    if not require_known_format(format).streams:
        streamed = [name for name in FORMATS.names() if FORMATS[name].streams]
        raise CrossblockError(f"--low-memory writes {', '.join(streamed)}, not {format} (it needs the whole model)")
    if recipe.grid.kind_name != "uniform":
        raise CrossblockError(f"--low-memory quantizes on the uniform grid only, not {recipe.grid.kind_name} "
                              "(its finishing pass rounds the embeddings and head of the whole model)")
    source = model.crossblock_source
    missing = [k for k in model.state_dict() if k not in source.where and k not in source.converted
               and k not in source.real_buffers]
    if missing and missing[0] in source.unconverted:
        raise CrossblockError(f"--low-memory runs transformers' conversion of checkpoint tensors into {missing[0]} "
                              f"block by block, but it fails on the meta device ({source.unconverted[missing[0]]}): "
                              "run without --low-memory")
    if missing:  # a weight the model may lack (transformers initializes it): load_skeleton refused all others
        raise CrossblockError(f"--low-memory reads each weight from the checkpoint, under its model name or through "
                              f"transformers' conversion mapping for {type(model).__name__}, but {missing[0]} is "
                              f"found neither way: run without --low-memory")
    from .model.adapter import find_blocks
    prefix, _ = find_blocks(model)
    outside = [k for k in source.converted if block_index(k, prefix) is None]
    if outside:
        raise CrossblockError(f"--low-memory converts checkpoint tensors one block at a time, but transformers builds "
                              f"{outside[0]}, outside the blocks, from other checkpoint tensors: run without --low-memory")
    copied = saved_copies(model)
    if copied:
        raise CrossblockError(f"--low-memory writes each saved tensor as a byte range of a spill file, but transformers "
                              f"saves {copied[0]} as a strided piece of a model tensor (save_pretrained would copy a "
                              f"whole shard of them in memory): run without --low-memory")


def saved_copies(model) -> list[str]:
    """Checkpoint names that transformers' save-time conversion (save_pretrained reverts the
    load-time one, e.g. fused experts back to per-expert matrices) makes non-contiguous; found
    on the meta skeleton, so only names and layouts are computed."""
    return [k for k, t in reverted(model, dict(model.state_dict())).items() if not t.is_contiguous()]


def load_skeleton(path: Path, dtype, trust_remote_code: bool = False):
    """(model, stored dtype): the model with its parameters on the meta device (its buffers real,
    as transformers computes them) and `model.crossblock_source` to read the weights; the same
    config, dtype, tied weights and generation config as from_pretrained gives (api.load_model)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    stored = config.dtype
    if dtype == "auto":
        dtype = stored if isinstance(stored, torch.dtype) else getattr(torch, str(stored or "float32"))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.tie_weights()  # as from_pretrained does (from_config leaves lm_head apart)
    model.config.dtype = dtype
    source = Source(path)
    model._weight_conversions = source.follow_conversions(model)
    source.real_buffers = {k for k, t in model.state_dict().items() if t.device.type != "meta"}
    source.untie_distinct(model)
    source.tie(model)
    source.check_complete(model)
    model.crossblock_source = source
    return model, stored


def materialize(module: nn.Module, prefix: str, source: Source, dtype: torch.dtype):
    """Read `module`'s meta tensors (parameters, persistent buffers) from disk, in `dtype`."""
    keys = [k for k, t in module.state_dict().items() if t.device.type == "meta"]
    tensors = source.read_many([f"{prefix}{k}" for k in keys], dtype)
    module.load_state_dict({k: tensors[f"{prefix}{k}"] for k in keys}, strict=False, assign=True)
    module.requires_grad_(False)


def weight_sums(model, rows: int = 1024) -> dict[str, tuple[tuple, float]]:
    """name -> (shape, float64 sum) of every state-dict tensor of a skeleton as the model would
    hold it, read from disk `rows` rows at a time (never a whole embedding in memory); a NaN or
    Inf is refused as api.check_weights_finite refuses it. One pass for that check and the run's
    fingerprint."""
    source, dtype = model.crossblock_source, next(model.parameters()).dtype
    sums = {}
    for name, t in model.state_dict().items():
        if t.device.type != "meta":
            parts = [t]
        elif name in source.converted:  # built from several checkpoint tensors: one model tensor, as loaded
            parts = [source.read(name, dtype)]
        else:
            parts = source.chunks(name, rows)
        total = 0.0
        for c in parts:
            c = c.to(dtype) if c.is_floating_point() else c
            if c.is_floating_point() and not torch.isfinite(c).all():
                raise CrossblockError(f"model weight {name} contains NaN or Inf values")
            total += c.double().sum().item()
        sums[name] = (tuple(t.shape), total)
    return sums


# -- the blocks: read when a window needs them, written and dropped when frozen ------------------
class BlockStream(BlockStore):
    """The low-memory path's block store (engine/blocks.py): `fetch(j)` reads block j from the
    shards (`load`) if it is on meta, `leave(j, finished=True)` writes the frozen block to its spill
    file and drops it (`finish`). Also reads the non-block weights for the capture of the block-0
    inputs (`before_blocks`), and writes the output folder (`write_folder`)."""
    holds_whole_model = False
    asked_by = "--low-memory"

    def __init__(self, model, folder, format: str, save_dtype: torch.dtype, skip=(), main: bool = True):
        from .export import require_known_format
        from .model.adapter import find_blocks
        self.model, self.source = model, model.crossblock_source
        self.prefix, self.blocks = find_blocks(model)
        self.empty = [copy.deepcopy(b) for b in self.blocks]  # meta placeholders, for release
        self.dtype = next(model.parameters()).dtype
        self.spill = Path(folder) / SPILL_DIR
        self.format, self.save_dtype, self.skip, self.main = format, save_dtype, list(skip), main
        self.form = require_known_format(format)  # what it writes of each block, and its config
        self.info: dict[int, dict] = {}  # per finished block: act quantizers, unquantized weights, layer settings
        if main:
            self.spill.mkdir(parents=True, exist_ok=True)

    def fetch(self, j: int):
        if self.on_meta(j):
            self.load(j)

    def leave(self, j: int, finished: bool) -> bool:
        if finished:
            self.finish(j)
        else:
            self.blocks[j].to("cpu")
        return finished

    def on_meta(self, j: int) -> bool:
        return any(t.device.type == "meta" for t in self.blocks[j].state_dict().values())

    def load(self, j: int):
        block = copy.deepcopy(self.empty[j])
        materialize(block, f"{self.prefix}.{j}.", self.source, self.dtype)
        self.blocks[j] = block

    def finish(self, j: int):
        """Block j is frozen: its output tensors go to its spill file, its weights back to meta."""
        from .quant.linear import restore_quantized
        block = self.blocks[j].to("cpu")
        restore_quantized(block)
        block.to(self.save_dtype)  # as api.write_folder casts the whole model
        self.info[j] = self.block_info(j, block)
        if self.main:
            written = self.written(j, block)
            given = written.state()
            tmp = self.spill / f"block{j}.safetensors.tmp"
            save_block_spill(given, reverted(self.model, given), tmp, {
                "plain": list(written.plain), "packed": {layer: list(e) for layer, e in written.packed.items()}})
            os.replace(tmp, self.spill / f"block{j}.safetensors")
        self.blocks[j] = copy.deepcopy(self.empty[j])
        gc.collect()  # what the block's window left in reference cycles would wait for a full collection
        trim_heap()  # and hand the freed memory back to the OS now

    def block_info(self, j: int, block: nn.Module) -> dict:
        """What crossblock.json and the format's config need from a finished block."""
        from .export.common import unquantized_linears
        from .model.adapter import block_unquantized
        from .quant import act as act_quant
        name = f"{self.prefix}.{j}"
        acts = act_quant.record(block)
        return {"acts": acts and {**acts, "layers": {f"{name}.{k}": v for k, v in acts["layers"].items()}},
                "experts": any(getattr(m, "crossblock_qexperts", None) for m in block.modules()),
                "unquantized": block_unquantized(self.prefix, j, block, self.skip),
                "linears": [f"{name}.{n}" for n in unquantized_linears(block)]}

    def written(self, j: int, block: nn.Module):
        """What the format writes of finished block j (`Format.tensors`, as the in-memory writer
        computes it for the whole model); its layers' settings are kept for the format's config."""
        name, acts = f"{self.prefix}.{j}", self.info[j]["acts"]
        state = {f"{name}.{k}": v.detach().contiguous() for k, v in block.state_dict().items()}
        written = self.form.tensors(self.model, [(f"{name}.{n}" if n else name, m) for n, m in block.named_modules()],
                                    state, self.save_dtype, acts and {k: v for k, v in acts.items() if k != "layers"})
        self.info[j].update(settings={n: self.form.setting(qw) for n, (_, qw) in written.layers.items()},
                            reverted=written.reverted)
        return written

    @contextlib.contextmanager
    def before_blocks(self, ids: torch.Tensor):
        """The weights of the modules registered before the blocks (the embeddings) in memory,
        for the capture of the block-0 inputs of `ids` (which stops at the last block)."""
        saved = {}
        tokens = self.model.get_input_embeddings()
        for name, module in self.model.named_modules():
            if name == self.prefix:
                break
            metas = {k: t for k, t in [*module._parameters.items(), *module._buffers.items()]
                     if t is not None and t.device.type == "meta"}
            if metas:
                saved[name] = metas
                for k, t in metas.items():
                    key = f"{name}.{k}" if name else k
                    if module is tokens and k == "weight":
                        value = self.token_rows(key, t, ids)
                    else:
                        value = self.source.read(key, self.dtype if t.is_floating_point() else None)
                    setattr(module, k, nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value)
        try:
            yield
        finally:
            for name, metas in saved.items():  # back to meta: the very objects, so tied weights stay tied
                module = self.model.get_submodule(name)
                for k, t in metas.items():
                    setattr(module, k, t)

    def token_rows(self, key: str, t: torch.Tensor, ids: torch.Tensor, rows: int = 4096) -> torch.Tensor:
        """The embedding matrix with only the rows of the tokens in `ids` read: the capture looks
        up no other row, and the pages of torch.empty that are never written never take RAM
        (a 128k x 8192 embedding holds the calibration set's few thousand distinct tokens)."""
        weight = torch.empty(t.shape, dtype=t.dtype)
        needed = torch.unique(ids)
        with self.source.opened(self.source.where[key]) as f:
            part = f.get_slice(self.source.alias.get(key, key))
            for lo in range(0, t.shape[0], rows):
                sel = needed[(needed >= lo) & (needed < lo + rows)]
                if len(sel):
                    weight[sel] = part[lo:lo + rows][sel - lo].to(t.dtype)
        return weight

    def unquantized(self) -> list[dict]:
        return [w for j in sorted(self.info) for w in self.info[j]["unquantized"]]

    def activations(self) -> dict | None:
        found = [self.info[j]["acts"] for j in sorted(self.info) if self.info[j]["acts"]]
        if not found:
            return None
        layers = {k: v for a in found for k, v in a["layers"].items()}
        return {**{k: v for k, v in found[0].items() if k != "layers"}, "layers": dict(sorted(layers.items()))}

    # -- the output folder ---------------------------------------------------------------------
    def write_folder(self, tokenizer, folder: Path, act_scheme: dict | None):
        """config, generation config, tokenizer and weight shards, as export.save writes them
        for the in-memory model; returns what the format records in crossblock.json."""
        from .export.common import save_folder
        skeleton = self.model.to(self.save_dtype)  # meta: free; sets the config's dtype as save_pretrained reads it
        mapped = Mapped()  # the spill files and model shards the tensors below view
        state, packed, saved = {}, {}, {}
        by_param: dict[int, torch.Tensor] = {}
        blocks_done = set()
        for key, p in skeleton.state_dict(keep_vars=True).items():
            j = block_index(key, self.prefix)
            if j is not None:
                if j not in blocks_done:
                    blocks_done.add(j)
                    given, written, meta = open_block_spill(self.spill / f"block{j}.safetensors", mapped)
                    saved.update(written)
                    state.update({k: given[k] for k in meta["plain"]})
                    packed.update({layer: {k: given[k] for k in keys} for layer, keys in meta["packed"].items()})
                continue
            if id(p) not in by_param:  # tied weights (lm_head = embeddings) share one tensor, as in memory
                by_param[id(p)] = self.spill_outside(key, p, mapped)
            state[key] = by_param[id(p)]
        for entries in packed.values():
            state.update(entries)
        if any(i["reverted"] for i in self.info.values()):
            # as Format.tensors in memory: the whole state in the checkpoint's layout (the blocks' already is)
            outside = {k: v for k, v in state.items() if block_index(k, self.prefix) is None}
            state = {**reverted(skeleton, outside), **{k: v for k, v in state.items() if k not in outside}}
        with streamed_safetensors(mapped, saved):
            save_folder(skeleton, tokenizer, folder, state)
        del state, saved, mapped
        self.source.unchanged_all()  # what was copied from the model's own files is what the run read
        self.form.write_config(folder, self.contents(), act_scheme)
        return None

    def contents(self):
        """What the format's config is made of, as export.formats.contents_of finds it in memory."""
        from .export.common import routers
        from .export.formats import Contents
        from .model.adapter import is_linear
        blocks = sorted(self.info)
        inside = {n for j in blocks for n in self.info[j]["linears"]}
        full_precision = [n for n, m in self.model.named_modules()  # unquantized_linears' order, over the skeleton
                          if n in inside or (is_linear(m) and block_index(n, self.prefix) is None)]
        experts = any(self.info[j]["experts"] for j in blocks)
        return Contents({n: s for j in blocks for n, s in self.info[j]["settings"].items()}, full_precision,
                        routers(self.unquantized()) if experts else [])

    def spill_outside(self, key: str, p: torch.Tensor, mapped: Mapped) -> torch.Tensor:
        """A non-block tensor in the saved dtype: a view of the model's own file when it is
        stored there in that dtype, else of its own spill file (one tensor at a time)."""
        if p.device.type == "meta":
            stored, file = self.source.alias.get(key, key), self.source.where[key]
            if self.source.placeholder(stored).dtype == self.save_dtype:
                self.source.unchanged(file)  # its bytes are copied as they are now (`write_folder` checks again after)
                tensors, _ = open_spill(self.source.folder / file, mapped, only=stored)
                return tensors[stored]
        path = self.spill / f"outside.{key}.safetensors"
        if not path.is_file():
            t = p if p.device.type != "meta" else self.source.read(key)
            t = t.to(self.save_dtype) if t.is_floating_point() else t
            save_spill({key: t.contiguous()}, path.with_suffix(".tmp"), {})
            os.replace(path.with_suffix(".tmp"), path)
            del t
        tensors, _ = open_spill(path, mapped)
        return tensors[key]


def block_index(key: str, prefix: str) -> int | None:
    if not key.startswith(prefix + "."):
        return None
    head = key[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None


# -- transformers' save-time conversion -----------------------------------------------------
def reverted(model: nn.Module, state: dict) -> dict:
    """What save_pretrained makes of `state`: transformers' save-time conversion (the reverse of
    the load-time one: e.g. fused experts back to per-expert matrices, renamed keys back)."""
    from transformers.core_model_loading import revert_weight_conversion
    return revert_weight_conversion(model, state)
