"""QuantLinear: a linear layer whose weight is fake-quantized with learnable parameters.

It wraps an existing nn.Linear (or GPT-2's Conv1D) without copying its weight, holds every
learnable quantization parameter of that layer (rounding offsets, clipping multipliers,
activation steps), and, when frozen, the final integers. `restore()` writes the fake-quantized
weight back into the original module, which then carries `crossblock_qweight`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .act import attach as attach_act_quant
from .grid import (QuantizedWeight, dequantize, fake_quantize, fake_quantize_weight, group_view, minmax_grid, num_groups,
                   quantize_to_int, search_clip, ungroup)

ROUNDINGS = ("rtn", "signround", "adaround", "lora")

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores the weight as (in, out).
    return type(module).__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) layout, sharing storage with the module."""
    return module.weight.t() if is_conv1d(module) else module.weight


class QuantLinear(nn.Module):
    def __init__(self, module: nn.Module, bits: int, group_size: int, sym: bool,
                 rounding: str = "rtn", lwc: bool = False, lora_rank: int = 4,
                 generator: torch.Generator | None = None, ste: bool = True,
                 scale_dtype: torch.dtype | None = None, clip_search: bool = False):
        super().__init__()
        if rounding not in ROUNDINGS:
            raise ValueError(f"unknown rounding {rounding!r}")
        # Not registered, so that its weight is no parameter of ours; `_apply` moves it with us,
        # and `weight`/`bias` read it, so the FP weight exists once, on the block's device.
        self.__dict__["original"] = module
        w = self.weight
        self.out_features, self.in_features = w.shape
        self.bits, self.group_size, self.sym = bits, group_size, sym
        self.scale_dtype = scale_dtype
        self.rounding = rounding
        self.ste = ste  # adaround/lora: hard forward + straight-through, instead of soft weights
        # "quant": trainable (soft rounding for adaround/lora); "hard": as it will be frozen;
        # "fp": the original layer; "rtn": round-to-nearest (the baseline)
        self.mode = "quant"
        self.act_quant: nn.Module | None = None
        self.frozen: QuantizedWeight | None = None  # the integers, always on the CPU (for exports)
        self.register_buffer("frozen_weight", None, persistent=False)  # their dequantized weight
        # What is rounded and on which grid; GPTQ initialization replaces both.
        self.register_buffer("base", None, persistent=False)
        self.register_buffer("fixed_scale", None, persistent=False)
        self.register_buffer("fixed_zero", None, persistent=False)

        groups = num_groups(self.in_features, group_size)
        dev = w.device
        # Clipping multipliers of each group's max and min: 1 (the min/max grid of RTN) or, with
        # clip_search, the ratio of least weight error. With lwc they are learned (AutoRound's
        # learnable clipping, kept in [0.5, 1]); without, a search result is a fixed buffer.
        start = (search_clip(w, bits, group_size, sym, scale_dtype) if clip_search
                 else torch.ones(self.out_features, groups, device=dev))
        if lwc:
            self.max_mult = nn.Parameter(start.clone())
            self.min_mult = nn.Parameter(start.clone())
        elif clip_search:
            self.register_buffer("max_mult", start.clone(), persistent=False)
            self.register_buffer("min_mult", start.clone(), persistent=False)
        else:
            self.max_mult = self.min_mult = None
        if rounding == "signround":
            self.offset = nn.Parameter(torch.zeros_like(w, dtype=torch.float32))
        elif rounding == "adaround":
            self.v = nn.Parameter(torch.zeros_like(w, dtype=torch.float32))
            self.reset_adaround()
        elif rounding == "lora":
            # V = logit(frac(W/s)) + A1 @ A2 with A2 = 0: h starts at the fractional part, i.e.
            # at the unrounded weight, and hard rounding at init equals RTN. The logit term is
            # recomputed from the current W/s, so no d_out x d_in state is stored.
            a1 = torch.randn(self.out_features, lora_rank, generator=generator) / lora_rank ** 0.5
            self.lora_a = nn.Parameter(a1.to(dev))
            self.lora_b = nn.Parameter(torch.zeros(lora_rank, self.in_features, device=dev))

    @property
    def weight(self) -> torch.Tensor:
        return weight_of(self.original).detach()

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self.original.bias is None else self.original.bias.detach()

    def _apply(self, fn, recurse=True):
        self.original._apply(fn)
        return super()._apply(fn, recurse)

    # -- grid and weights -------------------------------------------------------------------
    def _base(self) -> torch.Tensor:
        return (self.weight if self.base is None else self.base).float()

    def grid(self):
        if self.fixed_scale is not None:
            return self.fixed_scale, self.fixed_zero
        return minmax_grid(self._base(), self.bits, self.group_size, self.sym, self.max_mult, self.min_mult,
                           self.scale_dtype)

    def set_init(self, base: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """Start from a given quantized solution (GPTQ): round `base` on a fixed grid."""
        self.base, self.fixed_scale, self.fixed_zero = base.float(), scale.float(), zero.float()
        if self.max_mult is not None:  # a fixed grid has no range to clip
            del self.max_mult, self.min_mult
            self.max_mult = self.min_mult = None
        if self.rounding == "adaround":
            self.reset_adaround()

    def reset_adaround(self):
        with torch.no_grad():
            x = self.scaled(self.grid()[0])
            self.v.copy_(inverse_rectified_sigmoid(x - torch.floor(x)))

    def scaled(self, scale: torch.Tensor) -> torch.Tensor:
        """W / s, (out, in): the weight in units of its group's step."""
        return ungroup(group_view(self._base(), self.group_size) / scale[..., None], self.in_features)

    def soft_offset(self, x: torch.Tensor) -> torch.Tensor | None:
        """h in [0, 1] added to floor(x) by AdaRound and LoRA-Rounding; None for other modes."""
        if self.rounding == "adaround":
            return rectified_sigmoid(self.v)
        if self.rounding == "lora":
            frac = (x - torch.floor(x)).detach()
            return rectified_sigmoid(inverse_rectified_sigmoid(frac) + self.lora_a @ self.lora_b)
        return None

    def integers(self, hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q, scale, zero) for the current parameters; q is float, differentiable unless hard."""
        if self.rounding in ("rtn", "signround"):
            scale, zero, offset = self.direct_rounding()
            return quantize_to_int(self._base(), scale, zero, self.bits, self.group_size, offset), scale, zero
        scale, zero = self.grid()
        x = self.scaled(scale)
        h = self.soft_offset(x)
        if hard:
            h = (h >= 0.5).float()
        elif self.ste:  # the forward sees the rounding it will get; gradients flow through h
            h = (h >= 0.5).float() + h - h.detach()
        q = group_view(torch.floor(x) + h, self.group_size) + zero[..., None]
        q = ungroup(q.clamp(0, 2 ** self.bits - 1), self.in_features)
        return q, scale, zero

    def direct_rounding(self):
        """(scale, zero, offset) of the roundings with no soft relaxation: RTN (offset None) and
        SignRound (its learned offset)."""
        return (*self.grid(), self.offset if self.rounding == "signround" else None)

    def quantized_weight(self, hard: bool = False) -> torch.Tensor:
        if self.frozen_weight is not None:
            return self.frozen_weight
        if self.rounding in ("rtn", "signround"):  # hard rounding is all they have
            scale, zero, offset = self.direct_rounding()
            return fake_quantize_weight(self._base(), scale, zero, self.bits, self.group_size, offset)
        q, scale, zero = self.integers(hard=hard)
        return dequantize(q, scale, zero, self.group_size)

    def transformed_input(self, x: torch.Tensor) -> torch.Tensor:
        """x as the wrapped layer reads it: after its run-time rotation (preprocess/online.py), if any."""
        t = getattr(self.original, "crossblock_input_transform", None)
        return x if t is None else t(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.transformed_input(x)  # the original's pre-hooks do not run inside the wrapper
        if self.mode == "fp":
            return F.linear(x, self.weight, self.bias)
        if self.act_quant is not None:
            x = self.act_quant(x)
        if self.mode == "rtn":
            w = fake_quantize(self.weight, self.bits, self.group_size, self.sym).to(x.dtype)
        else:
            w = self.quantized_weight(hard=self.mode == "hard").to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    # -- training helpers -------------------------------------------------------------------
    def rounding_penalty(self, beta: float) -> torch.Tensor:
        """AdaRound's regularizer, mean over weights: pushes h towards 0 or 1."""
        h = self.soft_offset(self.scaled(self.grid()[0]))
        if h is None:
            return torch.zeros((), device=self.weight.device)
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    @torch.no_grad()
    def project(self):
        """Keep parameters in their valid ranges after an optimizer step."""
        if self.max_mult is not None:
            self.max_mult.clamp_(0.5, 1.0)
            self.min_mult.clamp_(0.5, 1.0)
        if self.rounding == "signround":
            self.offset.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def freeze(self):
        """Hard-round, keep the integers, drop every learnable parameter."""
        q, scale, zero = self.integers(hard=True)
        self.set_frozen(QuantizedWeight(q.round().to(torch.uint8).cpu(), scale.detach().float().cpu(),
                                        zero.detach().float().cpu(), self.bits, self.group_size, self.sym))

    def set_frozen(self, frozen: QuantizedWeight):
        self.frozen = frozen
        self.frozen_weight = frozen.dequantize().to(self.weight.device)
        for name, _ in list(self.named_parameters(recurse=False)):
            delattr(self, name)
        if self.act_quant is not None:
            self.act_quant.freeze()
        # the initial solution is spent; GPTQ's frozen scales would otherwise alias fixed_scale
        self.base = self.fixed_scale = self.fixed_zero = None

    @torch.no_grad()
    def restore(self) -> nn.Module:
        """Write the fake-quantized weight into the original module and return it."""
        assert self.frozen is not None, "freeze() first"
        module = self.original
        w = self.frozen_weight.to(module.weight.dtype)
        module.weight.data.copy_(w.t() if is_conv1d(module) else w)
        module.crossblock_qweight = self.frozen
        if self.act_quant is not None:
            # the original layer must keep quantizing its input, or the model would run A16
            attach_act_quant(module, self.act_quant)
        return module

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs to continue exactly: the integers once frozen, else
        every learnable parameter and initialization buffer (never the FP weight)."""
        state = {k: v for k, v in [*self.named_parameters(), *self.named_buffers()]
                 if k != "frozen_weight" and v is not None}
        if self.frozen is not None:
            state.update(q=self.frozen.q, scale=self.frozen.scale, zero=self.frozen.zero)
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]):
        # learnable parameters and init buffers live with the layer; the integers stay on the CPU
        state = {k: v if k in ("q", "scale", "zero") else v.to(self.weight.device) for k, v in state.items()}
        if "fixed_scale" in state:
            self.set_init(state.get("base", self.weight), state["fixed_scale"], state["fixed_zero"])
        for k, v in state.items():
            if k in ("q", "scale", "zero", "base", "fixed_scale", "fixed_zero"):
                continue
            target = self.get_parameter(k) if k in dict(self.named_parameters()) else self.get_buffer(k)
            target.copy_(v)
        if "q" in state:
            self.set_frozen(QuantizedWeight(state["q"], state["scale"], state["zero"],
                                            self.bits, self.group_size, self.sym))
