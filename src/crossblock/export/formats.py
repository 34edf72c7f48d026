"""What each export format can represent, checked before quantization starts.

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
from collections.abc import Iterable

import torch
from torch import nn

from ..config import Registry
from ..errors import CrossblockError


def values_per_word_run(bits: int) -> int:
    """Smallest count of `bits`-bit values filling whole int32 words (8 for 4-bit, 32 for 3-bit)."""
    return 32 // math.gcd(32, bits)


class Format:
    """A checkpoint format: what it can store (`accepts`, checked before quantization starts and
    again on the finished layers), the scale dtype its readers hold, and how it is written. A new
    format is one file in export/ and one `@FORMATS.register` line."""
    bits: tuple[int, ...] = ()
    online_transforms = False  # whether it can keep a run-time input rotation (rotate's down_proj Hadamard)
    packed = False  # it stores quantized layers as integers: a model with none cannot be written
    # the save check (api.check_reload): the written folder, read back, gives the model's logits to
    # this share of the largest logit (float order of the dequantization; a packing bug is far above)
    reload_tolerance: float = 1e-4

    def unreadable(self, folder) -> str | None:
        """Why a valid folder of this format cannot be read back here (the save check is skipped,
        saying so), or None."""
        return None

    def stored_scale_dtype(self, save_dtype: torch.dtype) -> torch.dtype | None:
        """The dtype its scales are stored in (None: no packed scales)."""
        return None

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

    def accepts_online_transforms(self, present: bool):
        """Raise CrossblockError if the model (about to) carry a run-time input rotation that this
        format cannot store; checked before quantization (from the recipe) and at save."""
        if present and not self.online_transforms:
            raise CrossblockError(f"{self.kind_name} export cannot store rotate's run-time Hadamard before "
                                  "down_proj: use --no-rotate-online (rotations folded into weights only), "
                                  "format fake or compressed-tensors")

    def write(self, model: nn.Module, tokenizer, out_dir, act_scheme: dict | None, grid: dict | None = None):
        """`grid`: what the grid's finishing pass recorded (crossblock.json's "grid"), if anything."""
        raise NotImplementedError


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


def act_args(act_scheme: dict):
    """The compressed-tensors QuantizationArgs of an act_scheme dict (imports compressed_tensors)."""
    from compressed_tensors.quantization import QuantizationArgs
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
