"""QuantLinear: a linear layer whose weight is fake-quantized with learnable parameters.

It wraps an existing nn.Linear (or GPT-2's Conv1D) without copying its weight and holds every
quantization parameter of that layer: its grid (a grids/ config), its rounding (a roundings/
config, which adds its own parameters), clipping multipliers and the activation quantizer. Once
frozen it keeps the integers (buffer `q`) and the grid's scales and zero points as parameters
(not trained unless a later stage asks), so a stage after the windows can still train them;
`restore()` writes the fake-quantized weight back into the original module, which then carries
`crossblock_qweight` for the exports.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .act import attach as attach_act_quant
from .grid import QuantizedWeight
from ..precision import exact


def is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2) stores the weight as (in, out).
    return type(module).__name__ == "Conv1D"


def weight_of(module: nn.Module) -> torch.Tensor:
    """The weight in (out, in) layout, sharing storage with the module."""
    return module.weight.t() if is_conv1d(module) else module.weight


DECODE_ROWS_ELEMENTS = 1 << 22  # weight_as decodes ~16 MiB of float32 at a time


class QuantLinear(nn.Module):
    wraps_linear = True  # model/adapter.py still finds the blocks of a model whose layers are wrapped
    restores_module = True  # restore_quantized puts the original module in its place

    def __init__(self, module: nn.Module, grid, rounding, lwc: bool = False,
                 generator: torch.Generator | None = None, clip_search: bool = False):
        super().__init__()
        # Not registered, so that its weight is no parameter of ours; `_apply` moves it with us,
        # and `weight`/`bias` read it, so the FP weight exists once, on the block's device.
        self.__dict__["original"] = module
        w = self.weight
        self.out_features, self.in_features = w.shape
        self.grid = grid
        self.rounding = rounding
        # "quant": trainable (soft rounding for adaround/lora); "hard": as it will be frozen;
        # "fp": the original layer; "rtn": round-to-nearest (the baseline)
        self.mode = "quant"
        self.act_quant: nn.Module | None = None
        # set by a stage that trains the grid of frozen integers (finetune): a module whose grid()
        # gives (scale, zero) for `q`, decoded from it instead of the layer's own scale and zero
        self.trained_grid: nn.Module | None = None
        # What is rounded and on which grid; GPTQ initialization replaces both.
        self.register_buffer("base", None, persistent=False)
        self.register_buffer("fixed_scale", None, persistent=False)
        self.register_buffer("fixed_zero", None, persistent=False)
        self.register_buffer("q", None, persistent=False)  # the integers, once frozen

        # Clipping multipliers of each group's max and min: 1 (the min/max grid of RTN) or, with
        # clip_search, the ratio of least weight error. With lwc they are learned (AutoRound's
        # learnable clipping, kept in [0.5, 1]); without, a search result is a fixed buffer.
        start = (grid.search_clip(w) if clip_search
                 else torch.ones(self.out_features, grid.num_groups(self.in_features), device=w.device))
        if lwc:
            self.max_mult = nn.Parameter(start.clone())
            self.min_mult = nn.Parameter(start.clone())
        elif clip_search:
            self.register_buffer("max_mult", start.clone(), persistent=False)
            self.register_buffer("min_mult", start.clone(), persistent=False)
        else:
            self.max_mult = self.min_mult = None
        self.rounding.add_params(self, generator)

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
    def base_weight(self) -> torch.Tensor:
        """What is rounded: the FP weight, or GPTQ's error-updated one."""
        return (self.weight if self.base is None else self.base).float()

    def grid_params(self):
        if self.fixed_scale is not None:
            return self.fixed_scale, self.fixed_zero
        return self.grid.params(self.base_weight(), self.max_mult, self.min_mult)

    def set_init(self, base: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor):
        """Start from a given quantized solution (GPTQ): round `base` on a fixed grid."""
        self.base, self.fixed_scale, self.fixed_zero = base.float(), scale.float(), zero.float()
        if self.max_mult is not None:  # a fixed grid has no range to clip
            del self.max_mult, self.min_mult
            self.max_mult = self.min_mult = None
        self.rounding.reset(self)

    @torch.no_grad()
    def start_clip(self, ratio: torch.Tensor):
        """Start each group's clipping at `ratio` (init imatrix: searched on the layer's inputs);
        with lwc it is learned from there."""
        ratio = ratio.to(self.weight.device)
        if isinstance(self.max_mult, nn.Parameter):
            self.max_mult.copy_(ratio)
            self.min_mult.copy_(ratio)
        else:
            for name in ("max_mult", "min_mult"):
                if name not in self._buffers:
                    delattr(self, name)
                self.register_buffer(name, ratio.clone(), persistent=False)
        self.rounding.reset(self)

    def integers(self, hard: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.rounding.integers(self, hard)

    def quantized_weight(self, hard: bool = False) -> torch.Tensor:
        if self.q is not None:
            # decoded at every use, not cached: a float32 copy of every frozen layer would take
            # twice a bf16 model's weights, and decoding costs ~1/1000 of the matmul it feeds
            if self.trained_grid is not None:  # a later stage trains the grid of the frozen integers
                return self.grid.decode(self.q, *self.trained_grid.grid())
            return self.grid.decode(self.q, self.scale, self.zero)
        return self.rounding.quantized_weight(self, hard)

    def weight_as(self, dtype: torch.dtype, hard: bool = False) -> torch.Tensor:
        """quantized_weight(hard) in `dtype`. A frozen layer decodes into it a slice of rows at a
        time: the whole float32 decode would be the largest temporary of a bf16 block's forward."""
        if self.q is None or self.trained_grid is not None or dtype == torch.float32:
            return self.quantized_weight(hard).to(dtype)
        out = torch.empty(self.q.shape, dtype=dtype, device=self.q.device)
        rows = max(1, DECODE_ROWS_ELEMENTS // self.q.shape[1])
        for lo in range(0, len(out), rows):
            part = slice(lo, lo + rows)
            out[part] = self.grid.decode(self.q[part], self.scale[part], self.zero[part])
        return out

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
        # the weight's grid math and rounding parameters (LoRA-Rounding's A·B) stay float32 under
        # the engine's bf16 autocast; only the matmul below runs in bf16
        with exact(x.device):
            if self.mode == "rtn":
                w = self.grid.rtn(self.weight).to(x.dtype)
            else:
                w = self.weight_as(x.dtype, hard=self.mode == "hard")
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    # -- training helpers -------------------------------------------------------------------
    @torch.no_grad()
    def project(self):
        """Keep parameters in their valid ranges after an optimizer step."""
        if self.max_mult is not None:
            self.max_mult.clamp_(0.5, 1.0)
            self.min_mult.clamp_(0.5, 1.0)
        self.rounding.project(self)

    # -- frozen integers ----------------------------------------------------------------------
    @torch.no_grad()
    def freeze(self):
        """Hard-round and keep the integers; the rounding's and clipping's parameters are spent."""
        q, scale, zero = self.integers(hard=True)
        self.set_frozen(self.grid.frozen(q, scale, zero))

    def set_frozen(self, frozen: QuantizedWeight):
        for name, _ in list(self.named_parameters(recurse=False)):
            delattr(self, name)
        if self.act_quant is not None:
            self.act_quant.freeze()
        # the initial solution is spent; GPTQ's frozen scales would otherwise alias fixed_scale
        self.base = self.fixed_scale = self.fixed_zero = None
        self.max_mult = self.min_mult = None
        dev = self.weight.device
        self.q = frozen.q.to(dev)
        self.scale = nn.Parameter(frozen.scale.to(dev), requires_grad=False)
        self.zero = nn.Parameter(frozen.zero.to(dev), requires_grad=False)

    @property
    def frozen(self) -> QuantizedWeight | None:
        """The finished integers as the exports write them (on the CPU), or None."""
        if self.q is None:
            return None
        return self.grid.frozen(self.q, self.scale, self.zero)

    @torch.no_grad()
    def restore(self) -> nn.Module:
        """Write the fake-quantized weight into the original module and return it."""
        assert self.q is not None, "freeze() first"
        module = self.original
        w = self.weight_as(module.weight.dtype)
        module.weight.data.copy_(w.t() if is_conv1d(module) else w)
        module.crossblock_qweight = self.frozen
        if self.act_quant is not None:
            # the original layer must keep quantizing its input, or the model would run A16
            attach_act_quant(module, self.act_quant)
        return module

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """Everything a resumed run needs to continue exactly: the integers and grid once frozen,
        else every learnable parameter and initialization buffer (never the FP weight)."""
        state = {k: v for k, v in [*self.named_parameters(), *self.named_buffers()] if v is not None}
        return {k: v.detach().cpu().contiguous() for k, v in state.items()}

    @torch.no_grad()
    def load_checkpoint_state(self, state: dict[str, torch.Tensor]):
        # learnable parameters and init buffers live with the layer
        state = {k: v.to(self.weight.device) for k, v in state.items()}
        if "q" in state:
            for k, v in state.items():
                if k.startswith("act_quant."):
                    self.state_target(k).copy_(v)
            self.set_frozen(self.grid.frozen(state["q"].cpu(), state["scale"].cpu(), state["zero"].cpu()))
            return
        if "fixed_scale" in state:
            self.set_init(state.get("base", self.weight), state["fixed_scale"], state["fixed_zero"])
        if "max_mult" in state and self.max_mult is None:  # a clipping searched on the inputs (init imatrix)
            self.start_clip(state["max_mult"])
        for k, v in state.items():
            if k in ("base", "fixed_scale", "fixed_zero"):
                continue
            self.state_target(k).copy_(v)

    def state_target(self, key: str) -> torch.Tensor:
        return self.get_parameter(key) if key in dict(self.named_parameters()) else self.get_buffer(key)


def restore_quantized(model: nn.Module):
    """Put the original modules back in place of every QuantLinear (and fused-experts wrapper),
    holding fake-quantized weights (the end of a pipeline: the user gets a plain transformers model)."""
    for name, m in list(model.named_modules()):
        if getattr(m, "restores_module", False):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, m.restore())
