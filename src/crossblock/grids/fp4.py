"""What the microscaling FP4 grids (nvfp4.py, mxfp4.py) share: E2M1 values times a scale per
group of input columns (the math, compressed-tensors' convention, is in quant/fp4.py).

The integers a rounding sees are E2M1 values (float, straight-through); the frozen record keeps
their 4-bit codes. Round to nearest, SignRound (its offset is added to W / step before rounding
to the nearest E2M1 value), trained weights, learnable clipping (one multiplier of each group's
max: the grid is symmetric) and GPTQ run on it; AdaRound and LoRA-Rounding choose between
floor(W / step) and the next integer, which is no E2M1 neighbour, so they are refused.
"""
from __future__ import annotations

import torch

from ..config import Config
from ..errors import CrossblockError
from ..quant import fp4
from ..quant.grid import QuantizedWeight, least_error_ratio, squared_error

SOFT_ROUNDINGS = ("adaround", "lora")


class Fp4Grid(Config):
    """Subclasses set `group_size` and `sym` fields (one allowed value each: the format's)."""
    group_size: int
    sym: bool
    bits = 4
    scale_torch_dtype = None  # the scales are the format's own (E4M3 / E8M0), never rounded to another
    fixed_global: float | None = None  # nvfp4: a global scale shared with other layers (Nvfp4Grid.for_block)

    @property
    def group(self) -> int:
        return fp4.GROUP[self.kind_name]

    def check(self):
        name = self.kind_name
        self.refuse(self.group_size == self.group,
                    f"{name} has one scale per {self.group} weights: group_size must be {self.group}, "
                    f"got {self.group_size} (other groups: the uniform grid)")
        self.refuse(self.sym is True, f"{name} is symmetric (E2M1 values have a sign, no zero point): sym must be "
                                      "true (asymmetric: the uniform grid)")

    # -- what a recipe may combine with this grid ------------------------------------------
    def check_windows(self, init: str, rounding: str | None):
        if rounding in SOFT_ROUNDINGS:
            raise CrossblockError(f"invalid {self.kind_name} grid: rounding {rounding} picks floor(W/step) or the "
                                  "next integer, which are not E2M1 neighbours; use signround, weights or rtn")

    def check_widths(self, in_features: dict[str, int]):
        odd = [n for n, k in in_features.items() if k % self.group]
        if odd:
            raise CrossblockError(f"{self.kind_name} needs every quantized layer's input width to be a multiple of "
                                  f"{self.group}: {odd[0]} has {in_features[odd[0]]} (skip it with --skip)")

    def for_layer(self, local_name: str, index: int, count: int, width: int):
        return self

    def for_block(self, weights: dict) -> dict:
        """nvfp4 ties vLLM's fused layers (Nvfp4Grid.for_block); mxfp4 has nothing to tie."""
        return {}

    def finish(self, model, skip=()) -> dict | None:
        return None

    def option(self, text: str):
        raise CrossblockError(f"the {self.kind_name} grid has one format: mixed precision chooses among the uniform "
                              "grid's bit widths or GGUF types (--bits-options)")

    def bits_per_weight(self, width: int) -> float:
        """4-bit values and one 8-bit scale per group (nvfp4's one global scale per tensor not counted)."""
        return 4 + 8 / self.group

    # -- the grid interface (grids/__init__.py) ------------------------------------------------
    def num_groups(self, in_features: int) -> int:
        return in_features // self.group

    def params(self, w, max_mult=None, min_mult=None):
        """(scale, zero): group scales and the global scale per group; min_mult is unused (symmetric)."""
        return fp4.params(w, self.kind_name, max_mult, self.global_scale(w))

    def global_scale(self, w) -> torch.Tensor | None:
        """nvfp4: the shared global scale if one was set, else w's own; mxfp4: None."""
        if self.kind_name != "nvfp4":
            return None
        if self.fixed_global is not None:
            return torch.tensor(self.fixed_global, dtype=torch.float32, device=w.device)
        return fp4.global_scale(w)

    def to_int(self, w, scale, zero, offset=None):
        """E2M1 values (float, straight-through) of w; `offset` added to W / step before rounding."""
        return fp4.to_values(w, scale, zero, self.group, offset)

    def fake_quantize(self, w, scale, zero, offset=None):
        return self.decode(self.to_int(w, scale, zero, offset), scale, zero)

    def decode(self, q, scale, zero):
        return fp4.decode(q, scale, zero, self.group)

    def rtn(self, w):
        w = w.float()
        return self.fake_quantize(w, *self.params(w))

    @torch.no_grad()
    def search_clip(self, w, importance=None, glob=None):
        """Per group, the clipping ratio (1 .. 0.7) of least squared weight error (input-weighted
        with `importance`)."""
        w = w.float()
        glob = self.global_scale(w) if glob is None else glob

        def error_at(mult):
            dq = self.fake_quantize(w, *fp4.params(w, self.kind_name, mult, glob))
            return fp4.group_view(squared_error(w, dq, importance), self.group).sum(-1)
        return least_error_ratio(error_at, (w.shape[0], self.num_groups(w.shape[1])), w.device)

    def gptq_rules(self, w, clip_search: bool):
        """GPTQ's two steps on this grid (engine/gptq.py): a group's (scale, zero) from its columns
        as error feedback left them, each (out,); one column rounded on them. NVFP4's global scale
        stays the one of the whole weight before GPTQ."""
        glob = self.global_scale(w)

        def group_grid(cols):
            ratio = self.search_clip(cols, glob=glob) if clip_search else None
            scale, zero = fp4.params(cols, self.kind_name, ratio, glob)
            return scale[:, 0], zero[:, 0]

        def column(col, scale, zero):
            step = fp4.step(scale, zero)
            return fp4.round_e2m1(col / step) * step

        return group_grid, column

    def frozen(self, q, scale, zero) -> QuantizedWeight:
        codes = q.to(torch.uint8) if q.dtype == torch.uint8 else fp4.to_codes(fp4.round_e2m1(q.detach().float()))
        return QuantizedWeight(codes.cpu(), scale.detach().float().cpu(), zero.detach().float().cpu(),
                               self.bits, self.group, True, kind=self.kind_name)
