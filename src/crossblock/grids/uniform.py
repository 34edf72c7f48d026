"""The uniform min-max grid: Ŵ = scale * (q - zero), q in [0, 2**bits - 1], per output channel or
per group of input columns (the math is in quant/grid.py, shared with GPTQ and the exports)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch

from ..config import Config, setting
from ..errors import CrossblockError
from ..quant import grid as g
from .base import GRIDS

SCALE_DTYPES = ("float32", "float16", "bfloat16")


@GRIDS.register("uniform")
@dataclass
class UniformGrid(Config):
    flat_prefix = ""  # the default grid: plain names (--wbits, --group-size)
    bits: int = setting(4, "weight bits (2..8)", flat="wbits")
    group_size: int = setting(128, "weights per scale along the input; -1: per output channel")
    sym: bool = setting(False, "symmetric grid (zero point fixed at the middle)")
    scale_dtype: str | None = setting(None, "round scales to what a checkpoint stores (float16 for gptq); "
                                            "default: float32", choices=SCALE_DTYPES)

    def check(self):
        self.refuse(2 <= self.bits <= 8, f"bits must be in 2..8, got {self.bits}")
        self.refuse(self.group_size == -1 or self.group_size > 0,
                    f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")

    def check_windows(self, init: str, rounding: str | None):
        """Refuse an initialization or rounding this grid cannot run (any, here)."""

    def for_layer(self, local_name: str, index: int, count: int, width: int) -> "UniformGrid | None":
        """The grid of block `index`'s linear `local_name` (of `count` blocks); None: left in full
        precision. One grid for all, here."""
        return self

    def for_block(self, weights: dict) -> dict:
        """Grids that tie a block's layers together (nvfp4's shared global scale), by name: none here."""
        return {}

    def gptq_rules(self, w, clip_search: bool):
        """GPTQ's own rounding rules for this grid (engine/gptq.py); None: its uniform grid of bits / sym."""
        return None

    def finish(self, model, skip=()) -> dict | None:
        """After the stages: anything the grid adds to the model and to the report (nothing)."""
        return None

    def option(self, text: str) -> "UniformGrid":
        """This grid with another bit width (and group size): "3", or "3g64" (mixed precision's options)."""
        m = re.fullmatch(r"(\d+)(?:g(-?\d+))?", text.strip())
        if m is None:
            raise CrossblockError(f"invalid bits option {text!r}: a bit width (3) or bits and group size (3g64)")
        group = self.group_size if m[2] is None else int(m[2])
        return dataclasses.replace(self, bits=int(m[1]), group_size=group).validated()

    def bits_per_weight(self, width: int) -> float:
        """Stored bits per weight of a layer `width` inputs wide: the integers, one 16-bit scale per
        group and, asymmetric, one `bits`-bit zero point per group (packed, as gptq and
        compressed-tensors store them)."""
        return self.bits + (16 + (0 if self.sym else self.bits)) * self.num_groups(width) / width

    def check_widths(self, in_features: dict[str, int]):
        """Every quantized layer must be at least one group wide (a ragged last group is fine for
        fake-quant; the packed formats refuse it)."""
        if self.group_size != -1:
            too_narrow = [n for n, k in in_features.items() if k < self.group_size]
            if too_narrow:
                raise CrossblockError(
                    f"group_size {self.group_size} is larger than the input width of {too_narrow[0]} "
                    f"({in_features[too_narrow[0]]}); use a smaller group size or -1 (per channel)")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    @property
    def scale_torch_dtype(self) -> torch.dtype | None:
        return None if self.scale_dtype is None else getattr(torch, self.scale_dtype)

    def num_groups(self, in_features: int) -> int:
        return g.num_groups(in_features, self.group_size)

    def params(self, w, max_mult=None, min_mult=None):
        """(scale, zero), each (out, groups); the multipliers clip the range (learnable)."""
        return g.minmax_grid(w, self.bits, self.group_size, self.sym, max_mult, min_mult, self.scale_torch_dtype)

    def search_clip(self, w, importance=None):
        return g.search_clip(w, self.bits, self.group_size, self.sym, self.scale_torch_dtype, importance)

    def to_int(self, w, scale, zero, offset=None):
        """Integers (float, straight-through) of w on the grid, `offset` added before rounding."""
        return g.quantize_to_int(w, scale, zero, self.bits, self.group_size, offset)

    def fake_quantize(self, w, scale, zero, offset=None):
        return g.fake_quantize_weight(w, scale, zero, self.bits, self.group_size, offset)

    def scaled(self, w, scale):
        """W / s, (out, in): the weight in units of its group's step."""
        return g.ungroup(g.group_view(w, self.group_size) / scale[..., None], w.shape[1])

    def shift(self, v, zero):
        """v + zero, clamped to the integer range: the integers of a rounded W / s."""
        return g.ungroup((g.group_view(v, self.group_size) + zero[..., None]).clamp(0, self.qmax), v.shape[1])

    def decode(self, q, scale, zero):
        return g.dequantize(q, scale, zero, self.group_size)

    def rtn(self, w):
        """Round-to-nearest on the plain min/max grid: the baseline."""
        return g.fake_quantize(w, self.bits, self.group_size, self.sym)

    def frozen(self, q, scale, zero) -> g.QuantizedWeight:
        return g.QuantizedWeight(q.round().to(torch.uint8).cpu(), scale.detach().float().cpu(),
                                 zero.detach().float().cpu(), self.bits, self.group_size, self.sym)
