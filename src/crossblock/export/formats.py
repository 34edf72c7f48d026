"""The export formats' registry and their common interface (`Format`): what each can represent
(checked before quantization starts), what it writes, and how it is read back.

- fake: dense fake-quantized weights; anything goes.
- compressed-tensors (compressed_tensors.py): 2, 4 or 8 bits. compressed-tensors 0.20 packs any width 1..8 densely
  into int32, but for widths that do not divide 32 (3, 5, 6, 7) that dense layout differs
  from the `32 // bits` values per word of earlier releases, vLLM and llama.cpp's converter,
  so only the widths every reader agrees on are written. Groups must divide in_features.
  The transformers loader only handles nn.Linear, so GPT-2 style Conv1D models are refused.
- gptq (gptq.py): 2, 3, 4 or 8 bits (what transformers' GPTQConfig and vLLM's gptq accept). qweight
  packs along in_features and qzeros along out_features with no padding, so both must hold
  whole int32 words. Asymmetric GPTQ v1 cannot store a zero point of 0 (it stores zero - 1);
  that depends on the data and is checked at save time.
"""
from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import Registry
from ..errors import CrossblockError
from ..quant.grid import QuantizedWeight
from ..quant.linear import is_conv1d
from .common import (build_model, load_dense, model_dtype, plain_config, read_config, read_tensors, routers,
                     save_folder, skeleton, unquantized_linears)


def values_per_word_run(bits: int) -> int:
    """Smallest count of `bits`-bit values filling whole int32 words (8 for 4-bit, 32 for 3-bit)."""
    return 32 // math.gcd(32, bits)


@dataclass
class Written:
    """What a format writes for a set of modules (the whole model, or one finished block of the
    low-memory path): the same function (`Format.tensors`) gives both writers their tensors."""
    plain: dict[str, torch.Tensor]  # the state dict's tensors written as they are (full names)
    packed: dict[str, dict[str, torch.Tensor]]  # per quantized layer: the tensors replacing its weight (full keys)
    layers: dict[str, tuple[nn.Module | None, QuantizedWeight]]  # the quantized layers, as the format names them
    reverted: bool = False  # `plain` is in the checkpoint's layout already (transformers' save-time conversion)

    def state(self) -> dict[str, torch.Tensor]:
        """The state dict save_pretrained gets: the plain tensors, then each layer's packed ones."""
        return {**self.plain, **{k: v for entries in self.packed.values() for k, v in entries.items()}}


@dataclass
class Contents:
    """What config.json's quantization_config is made of, gathered from the whole model (in
    memory) or block by block (low-memory path)."""
    settings: dict[str, tuple]  # each quantized layer, as written -> Format.setting of its record
    full_precision: list[str]  # the linear layers left unquantized, in module order
    routers: list[str]  # MoE routers (left unquantized) of a model whose experts are quantized, else []


class Format:
    """A checkpoint format and all its I/O: what it can store (`accepts`, checked before
    quantization starts and again on the finished layers), the tensors it writes for a set of
    modules (`tensors`: the in-memory writer calls it on the whole model, the low-memory path on
    each finished block), its config.json block (`write_config`) and how its folders are told
    apart and read back (`recognizes`, `load`). A new format is one file in export/ with one
    `@FORMATS.register` class, imported in export/__init__.py (docs/architecture.md)."""
    bits: tuple[int, ...] = ()
    online_transforms = False  # whether it can keep a run-time input rotation (rotate's down_proj Hadamard)
    packed = False  # it stores quantized layers as integers: a model with none cannot be written
    streams = True  # --low-memory writes it block by block (False: it needs the whole model at once)
    quant_method: str | None = None  # config.json's quantization_config["quant_method"] of its folders
    file: str | None = None  # the one file it writes instead of an HF folder (gguf's model.gguf), if any
    # the save check (api.check_reload): the written folder, read back, gives the model's logits to
    # this share of the largest logit (float order of the dequantization; a packing bug is far above)
    reload_tolerance: float = 1e-4
    # the per-layer grids of mixed precision (the bits stage) it stores: "any"; "fused": layers a serving
    # engine runs as one matmul (q/k/v, gate/up) must share one; "none": one setting for the whole model
    mixed = "any"
    # the model card's "Loading" section ({out}: the folder's name)
    loading = """```python
import crossblock
model = crossblock.load("{out}")  # dense, exactly the evaluated weights
```"""

    def unreadable(self, folder) -> str | None:
        """Why a valid folder of this format cannot be read back here (the save check is skipped,
        saying so), or None."""
        return None

    def stored_scale_dtype(self, save_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype its scales are stored in (None: no packed scales)."""
        return None

    # -- what it accepts ---------------------------------------------------------------------
    def accepts_grid(self, grid, model: nn.Module):
        """Raise CrossblockError if it cannot store this grid kind or model (before any work);
        the packed formats store the uniform grid only."""
        if grid.kind_name != "uniform":
            raise CrossblockError(f"{self.kind_name} export cannot store the {grid.kind_name} grid "
                                  f"({GRIDS_HINT.get(grid.kind_name, 'use fake')})")

    def accepts(self, bits: int, group_size: int, sym: bool, in_features: set[int], out_features: set[int],
                has_conv1d: bool, act_scheme: dict | None, fused_experts: list[str] = ()):
        """Raise CrossblockError, naming the format and the setting, if it cannot store this
        (`fused_experts`: names of the 3-D MoE expert parameters to be quantized)."""

    def accepts_mixed(self, tie: str):
        """Raise CrossblockError if it cannot store per-layer grids tied as `tie` (the bits stage's)."""
        if self.mixed == "none":
            raise CrossblockError(f"{self.kind_name} export stores one grid for the whole model, not mixed precision "
                                  "(--bpw): use compressed-tensors, gguf or fake")
        if self.mixed == "fused" and tie != "fused":
            raise CrossblockError(f"{self.kind_name} export needs q/k/v and gate/up on one grid (vLLM runs each as one "
                                  f"matmul): drop bits tie {tie} (--bits-tie fused)")

    def accepts_activations(self, grid_kind: str, act_scheme: dict | None):
        """Raise CrossblockError if it cannot store this activation scheme with weights of this
        grid kind (the packed formats that store integer activations check them in `accepts`)."""

    def accepts_online_transforms(self, present: bool):
        """Raise CrossblockError if the model (about to) carry a run-time input rotation that this
        format cannot store; checked before quantization (from the recipe) and at save."""
        if present and not self.online_transforms:
            raise CrossblockError(f"{self.kind_name} export cannot store rotate's run-time Hadamard before "
                                  "down_proj: use --no-rotate-online (rotations folded into weights only), "
                                  "format fake or compressed-tensors")

    def check_layer(self, name: str, qweight: QuantizedWeight):
        """Raise CrossblockError if this finished layer's values cannot be stored (e.g. gptq's zero
        points of 0); its settings were checked by `accepts`."""

    def check_layers(self, layers: dict[str, tuple[nn.Module | None, QuantizedWeight]], act_scheme: dict | None):
        """Raise CrossblockError if the finished layers' settings cannot be stored (`accepts`, once
        per setting, on the layers as they are)."""
        check_layers(self.kind_name, layers, act_scheme=act_scheme)

    def check_model(self, model: nn.Module, layers: dict[str, tuple[nn.Module | None, QuantizedWeight]]):
        """Whole-model refusals and warnings of the in-memory writer, on the layers `tensors` found."""
        if self.packed and not layers:
            raise CrossblockError(f"{self.kind_name} export needs a quantized model, but no layer carries "
                                  "integer weights")

    # -- what it writes ------------------------------------------------------------------------
    def setting(self, qweight: QuantizedWeight) -> tuple:
        """What the config tells layers apart by (one config group per setting)."""
        return qweight.bits, qweight.group_size, qweight.sym

    def layers(self, model: nn.Module, modules) -> dict[str, tuple[nn.Module | None, QuantizedWeight]]:
        """The quantized layers among `modules` ((full name, module) pairs), as the format writes
        them: by default every layer carrying `crossblock_qweight`. `model`: the whole model, or the
        low-memory path's skeleton (its conversion mapping names what is saved)."""
        return {name: (m, m.crossblock_qweight) for name, m in modules
                if getattr(m, "crossblock_qweight", None) is not None}

    def layer_tensors(self, name: str, qweight: QuantizedWeight, dtype: torch.dtype,
                      act_scheme: dict | None) -> dict[str, torch.Tensor]:
        """The tensors (local names) that replace quantized layer `name`'s dense weight, from its
        frozen record; `dtype`: the saved model's. Packed formats define it."""
        raise NotImplementedError

    def tensors(self, model: nn.Module, modules, state: dict[str, torch.Tensor], dtype: torch.dtype,
                act_scheme: dict | None) -> Written:
        """What is written for `modules` ((full name, module) pairs) whose state dict, under full
        names, is `state`: the one function of the in-memory writer (the whole model) and the
        low-memory path (each finished block, `model` its skeleton). A packed format drops each
        quantized layer's dense weight for its `layer_tensors`; layers stored apart from any
        module (module None: fused MoE experts, per expert) are named in the checkpoint's layout,
        so the state is put in that layout first."""
        if not self.packed:
            return Written(state, {}, {})
        modules = list(modules)
        layers = self.layers(model, modules)
        reverted = any(m is None for m, _ in layers.values())
        if reverted:
            from transformers.core_model_loading import revert_weight_conversion
            state = revert_weight_conversion(model, state)
        self.check_layers(layers, act_scheme)
        plain, packed = dict(state), {}
        for name, (_, qw) in layers.items():
            self.check_layer(name, qw)
            del plain[f"{name}.weight"]
            packed[name] = {f"{name}.{k}": v.detach().cpu().contiguous()
                            for k, v in self.layer_tensors(name, qw, dtype, act_scheme).items()}
        return Written(plain, packed, layers, reverted)

    def write_config(self, folder, contents: Contents, act_scheme: dict | None):
        """Add the format's quantization_config to the written config.json (none: a dense folder)."""

    def write(self, model: nn.Module, tokenizer, out_dir, act_scheme: dict | None, grid: dict | None = None):
        """The in-memory writer: `tensors` of the whole model, save_pretrained, `write_config`;
        returns what the format records in crossblock.json (a dict, or None). `grid`: what the
        grid's finishing pass recorded (crossblock.json's "grid"), if anything."""
        written = self.written(model, act_scheme)
        save_folder(model, tokenizer, out_dir, written.state())
        self.write_config(out_dir, contents_of(model, self, written), act_scheme)

    def written(self, model: nn.Module, act_scheme: dict | None) -> Written:
        written = self.tensors(model, model.named_modules(), model.state_dict(), model_dtype(model), act_scheme)
        self.check_model(model, written.layers)
        return written

    # -- how it is read back -------------------------------------------------------------------
    def recognizes(self, folder: Path, quantization: dict | None) -> bool:
        """Whether `folder` (config.json's quantization_config: `quantization`, None if absent) is
        one of this format's: by its own file, else by quant_method (none: a dense folder)."""
        if self.file is not None:
            return (folder / self.file).is_file()
        if quantization is None:
            return self.quant_method is None
        return (self.quant_method is not None and isinstance(quantization, dict)
                and quantization.get("quant_method") == self.quant_method)

    def activations(self, path, model: nn.Module) -> dict | None:
        """The activation quantizers a folder of this format describes itself (in act.record's
        form), for folders without crossblock.json (written by another tool); None: none."""
        return None

    def read(self, quantization: dict, tensors: dict[str, torch.Tensor],
             layout: nn.Module) -> dict[str, QuantizedWeight]:
        """A packed folder's integer weights, per layer (taken out of `tensors`); `layout`: the
        model's module tree on the meta device. Packed formats define it."""
        raise NotImplementedError

    def load(self, path, device: str = "cpu", dtype: torch.dtype | None = None, trust_remote_code: bool = False):
        """The folder as a transformers model with dense weights (`read`'s integers decoded exactly
        as the fake-quant model computes them, `crossblock_qweight` re-attached)."""
        if not self.packed:
            return load_dense(path, device, dtype, trust_remote_code)
        config = plain_config(path, trust_remote_code)
        if dtype is not None:
            config.dtype = dtype
        tensors = read_tensors(path)
        qweights = self.read(read_config(path)["quantization_config"], tensors, skeleton(config, trust_remote_code))
        return build_model(config, {k: v.to(config.dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                           qweights, device, trust_remote_code, where=path)


def contents_of(model: nn.Module, form: Format, written: Written) -> Contents:
    """The in-memory model's Contents (the low-memory path gathers them per block)."""
    from ..model.adapter import unquantized_weights
    experts = any(getattr(m, "crossblock_qexperts", None) for m in model.modules())
    return Contents({name: form.setting(qw) for name, (_, qw) in written.layers.items()}, unquantized_linears(model),
                    routers(unquantized_weights(model)) if experts else [])


FORMATS = Registry("export format")
GRIDS_HINT = {"gguf": "GGUF types are written by --format gguf, or densely by fake"}


def require_known_format(fmt: str) -> Format:
    if fmt not in FORMATS:
        raise CrossblockError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS.names())}")
    return FORMATS[fmt]()


def check_format(fmt: str, bits: int, group_size: int, sym: bool, in_features_list: Iterable[int], *,
                 out_features_list: Iterable[int] = (), has_conv1d: bool = False,
                 act_scheme: dict | None = None, fused_experts: Iterable[str] = ()):
    """Raise CrossblockError, naming the format and the setting, if `fmt` cannot store
    weights quantized this way."""
    form = require_known_format(fmt)
    if form.bits and bits not in form.bits:
        raise CrossblockError(f"{fmt} export cannot store {bits}-bit weights "
                              f"(bits must be one of {', '.join(map(str, form.bits))})")
    form.accepts(bits, group_size, sym, set(in_features_list), set(out_features_list), has_conv1d, act_scheme,
                 list(fused_experts))


def check_layers(fmt: str, layers: dict[str, tuple[nn.Module | None, QuantizedWeight]], **kwargs):
    """check_format on the layers as they are, once per (bits, group_size, sym) setting."""
    other = sorted({qw.kind for _, qw in layers.values()} - {"uniform"})
    if other:
        raise CrossblockError(f"{fmt} export cannot store GGUF-type layers ({', '.join(other)}): "
                              "use --format gguf, or fake")
    by_setting = defaultdict(list)
    for module, qw in layers.values():
        by_setting[(qw.bits, qw.group_size, qw.sym)].append((module, qw))
    for (bits, group_size, sym), members in by_setting.items():
        check_format(fmt, bits, group_size, sym, [qw.q.shape[1] for _, qw in members],
                     out_features_list=[qw.q.shape[0] for _, qw in members],
                     has_conv1d=any(is_conv1d(module) for module, _ in members if module is not None), **kwargs)


def check_groups(fmt: str, group_size: int, in_features: set[int]):
    if group_size != -1 and group_size <= 0:
        raise CrossblockError(f"{fmt} export needs group_size -1 (per channel) or a positive integer, "
                              f"got {group_size}")
    ragged = sorted(k for k in in_features if group_size != -1 and k % group_size)
    if ragged:
        raise CrossblockError(f"{fmt} export needs group_size to divide every layer's in_features: "
                              f"group_size {group_size} leaves a ragged last group for in_features {ragged[0]}")


def check_whole_words(bits: int, what: str, sizes: set[int]):
    """GPTQ packs without padding: each packed dimension must fill whole int32 words."""
    run = values_per_word_run(bits)
    odd = sorted(k for k in sizes if k % run)
    if odd:
        raise CrossblockError(f"gptq export packs {bits}-bit values into whole int32 words along {what}, "
                              f"which must be a multiple of {run}; {odd[0]} is not")


def refuse_act_scheme(fmt: str, act_scheme: dict | None):
    if act_scheme is not None:
        raise CrossblockError(f"{fmt} export cannot record activation quantization (act_scheme); "
                              "use compressed-tensors")


# act_scheme keys -> compressed-tensors QuantizationArgs fields
ACT_KEYS = {"bits": "num_bits", "dynamic": "dynamic", "strategy": "strategy",
            "symmetric": "symmetric", "group_size": "group_size"}
# float activation types (quant/act.py) -> the compressed-tensors preset whose input_activations they run
ACT_PRESETS = {"nvfp4": "NVFP4", "mxfp4": "MXFP4", "fp8": "FP8_DYNAMIC"}


def act_args(act_scheme: dict):
    """The compressed-tensors QuantizationArgs of an act_scheme dict (imports compressed_tensors):
    a float type's are its preset's own (NVFP4: tensor_group 16, dynamic "local", E4M3 scales;
    MXFP4: group 32, dynamic; FP8_DYNAMIC: token, dynamic), so llm-compressor's names hold."""
    from compressed_tensors.quantization import QuantizationArgs
    if "type" in act_scheme:
        kind = act_scheme["type"]
        if kind not in ACT_PRESETS:
            raise CrossblockError(f"compressed-tensors export: unknown activation type {kind!r} "
                                  f"(known: {', '.join(ACT_PRESETS)})")
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
        return preset_name_to_scheme(ACT_PRESETS[kind], ["Linear"]).input_activations
    unknown = sorted(set(act_scheme) - set(ACT_KEYS))
    if unknown:
        raise CrossblockError(f"compressed-tensors export: unknown act_scheme key {unknown[0]!r} "
                              f"(known: {', '.join(ACT_KEYS)})")
    if act_scheme.get("dynamic") is not True:
        # Static activation quantization would need calibrated input scales in the checkpoint.
        raise CrossblockError("compressed-tensors export records only dynamic activation quantization: "
                              "act_scheme needs dynamic: true")
    try:
        return QuantizationArgs(type="int", **{ACT_KEYS[k]: v for k, v in act_scheme.items()})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        reason = str(e).splitlines()[-1].strip()
        raise CrossblockError(f"compressed-tensors export: invalid act_scheme {act_scheme}: {reason}") from None


def check_act_scheme(act_scheme: dict | None):
    if act_scheme is not None:
        act_args(act_scheme)
