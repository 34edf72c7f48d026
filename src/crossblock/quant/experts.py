"""Fused mixture-of-experts weights: E expert matrices stored as one 3-D parameter.

transformers (5.x) stores a MoE layer's experts as parameters such as `gate_up_proj` (E, 2I, H)
and `down_proj` (E, H, I), each expert's matrix in (out, in) layout, and runs them in an
experts module called as `experts(hidden, top_k_index, top_k_weights)`. They are no Linear
modules, so they get their own wrappers, which reuse QuantLinear's grid and rounding code:
- QuantExpertWeight is a QuantLinear whose weight is the (E * out, in) view of one 3-D
  parameter. Groups run along input columns within a row, so every group, scale and zero point
  stays inside one expert: E independent matrices, quantized as one (the grid math, roundings,
  clipping, freezing and checkpoints are QuantLinear's, unchanged);
- QuantExperts replaces the experts module: it runs the module's own forward with each weight
  swapped for its fake-quantized tensor (`functional_call`), so gradients reach the rounding
  and clipping parameters and any experts implementation (eager, batched, grouped) works.
`ExpertInputs` records what each expert's matrices see (for GPTQ), optionally with every token
sent through every expert while the module's output keeps the real routing.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from .linear import QuantLinear


def expert_params(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's own 3-D parameters with one matrix per expert (leading dim = experts)."""
    params = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3}
    experts = {p.shape[0] for p in params.values()}
    return params if len(experts) == 1 else {}


def is_fused_experts(module: nn.Module) -> bool:
    """A module holding fused expert matrices in (E, out, in) layout. transformers marks the
    (E, in, out) layout with `is_transposed`; that one is not supported (reported instead)."""
    return bool(expert_params(module)) and not getattr(module, "is_transposed", False)


class QuantExpertWeight(QuantLinear):
    """One 3-D expert parameter as E stacked (out, in) matrices: a QuantLinear over the
    (E * out, in) view, never called as a layer (QuantExperts runs the experts)."""
    restores_module = False  # QuantExperts puts the experts module back

    def __init__(self, experts: nn.Module, param: str, grid, rounding, lwc=False, generator=None,
                 clip_search=False):
        self.__dict__["param_name"] = param
        super().__init__(experts, grid, rounding, lwc, generator, clip_search)

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.original, self.param_name)

    @property
    def num_experts(self) -> int:
        return self.param.shape[0]

    @property
    def weight(self) -> torch.Tensor:
        p = self.param
        return p.detach().reshape(-1, p.shape[-1])

    @property
    def bias(self):
        return None

    def forward(self, x):
        raise RuntimeError("expert weights run inside QuantExperts")

    def current_weight(self) -> torch.Tensor:
        """The 3-D weight as this mode gives it (fake-quantized, RTN or FP)."""
        if self.mode == "fp":
            return self.param
        w = self.grid.rtn(self.weight) if self.mode == "rtn" else self.quantized_weight(hard=self.mode == "hard")
        return w.reshape(self.param.shape)

    @torch.no_grad()
    def restore(self) -> nn.Module:
        assert self.q is not None, "freeze() first"
        self.param.data.copy_(self.quantized_weight().reshape(self.param.shape).to(self.param.dtype))
        qweights = getattr(self.original, "crossblock_qexperts", None) or {}
        self.original.crossblock_qexperts = {**qweights, self.param_name: self.frozen}
        return self.original


class QuantExperts(nn.Module):
    """Runs a fused experts module with its 3-D weights fake-quantized (one QuantExpertWeight
    each, in `weights`). `recorder`, when set, collects the experts' inputs (GPTQ)."""
    restores_module = True

    def __init__(self, experts: nn.Module, new_weight):
        super().__init__()
        self.__dict__["original"] = experts  # not registered: its parameters are not ours
        self.weights = nn.ModuleDict({n: new_weight(experts, n) for n in expert_params(experts)})
        self.recorder: ExpertInputs | None = None

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        if self.recorder is not None:
            self.recorder.observe(self.original, hidden_states, top_k_index, top_k_weights)
        modes = {m.mode for m in self.weights.values()}
        if modes == {"fp"}:
            return self.original(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        swapped = {n: m.current_weight().to(hidden_states.dtype) for n, m in self.weights.items()}
        return functional_call(self.original, swapped, (hidden_states, top_k_index, top_k_weights, *args), kwargs)

    def _apply(self, fn, recurse=True):
        self.original._apply(fn)
        return super()._apply(fn, recurse)

    @torch.no_grad()
    def restore(self) -> nn.Module:
        for m in self.weights.values():
            m.restore()
        return self.original


def eager_forward(experts: nn.Module):
    """The module's own per-expert loop, whatever `experts_implementation` the model uses
    (transformers' dispatcher keeps it as `__wrapped__`)."""
    forward = type(experts).forward
    return getattr(forward, "__wrapped__", forward)


class _LinearTap(TorchFunctionMode):
    """Calls `seen(param, expert, x)` for every F.linear whose weight is one expert's matrix."""

    def __init__(self, experts: nn.Module, seen):
        super().__init__()
        self.seen = seen
        self.slices = {(p[e].data_ptr(), tuple(p.shape[1:])): (n, e)
                       for n, p in expert_params(experts).items() for e in range(p.shape[0])}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, torch._C._nn.linear) and len(args) > 1 and torch.is_tensor(args[1]):
            hit = self.slices.get((args[1].data_ptr(), tuple(args[1].shape)))
            if hit is not None:
                self.seen(*hit, args[0])
        return func(*args, **kwargs)


class ExpertInputs:
    """What each expert's matrices receive during a statistics pass: `add(param, expert, x)` is
    called once per (parameter, expert, batch). With `all_experts`, every token goes through
    every expert (weights 1, output discarded) so rarely routed experts still get statistics;
    the block's output keeps the real routing either way."""

    def __init__(self, add, all_experts: bool = True):
        self.add, self.all_experts = add, all_experts

    @torch.no_grad()
    def observe(self, experts: nn.Module, hidden, top_k_index, top_k_weights):
        num = next(iter(expert_params(experts).values())).shape[0]
        if self.all_experts:
            tokens = hidden.reshape(-1, hidden.shape[-1])
            top_k_index = torch.arange(num, device=hidden.device).expand(len(tokens), num)
            top_k_weights = torch.ones(top_k_index.shape, dtype=hidden.dtype, device=hidden.device)
            hidden = tokens
        with _LinearTap(experts, self.add):
            eager_forward(experts)(experts, hidden, top_k_index, top_k_weights)
