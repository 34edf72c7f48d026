"""Activation quantizers for the inputs of quantized linear layers (fake-quant, STE).

- DynamicActQuant: every token (row of the last dimension) gets its own min/max grid at run
  time, asymmetric or symmetric, on the same integer conventions as the weights (quant/grid.py)
  and as compressed-tensors' dynamic per-token scheme. Nothing to learn.
- StaticActQuant: one step (and zero point) per tensor, calibrated on the range observed on
  calibration inputs, then learned (LSQ-style: straight-through rounding, the clamp passes
  gradient into the step). The step is step0 · exp(log_mult), so training moves it relative to
  its calibrated size: SignSGD's lr (1/iters, at most ×e^0.5 over a window) and Adam's 1e-3 suit
  any activation scale, and the engine needs no separate learning rate for it.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import all_reduce_
from .grid import dequantize, minmax_grid, quantize_to_int, round_ste


def act_scheme(bits: int, dynamic: bool, sym: bool) -> dict | None:
    """The export's description of an activation quantizer (see export/formats.py), or None."""
    if bits >= 16:
        return None
    return {"bits": bits, "dynamic": dynamic, "strategy": "token" if dynamic else "tensor", "symmetric": sym}


class DynamicActQuant(nn.Module):
    def __init__(self, bits: int, sym: bool):
        super().__init__()
        self.bits, self.sym = bits, sym

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = x.reshape(-1, x.shape[-1]).float()
            scale, zero = minmax_grid(rows, self.bits, -1, self.sym)
            xq = dequantize(quantize_to_int(rows, scale, zero, self.bits, -1), scale, zero, -1)
        return x + (xq.view(x.shape).to(x.dtype) - x).detach()

    def scheme(self) -> dict:
        return act_scheme(self.bits, True, self.sym)

    def freeze(self):
        pass


class StaticActQuant(nn.Module):
    def __init__(self, bits: int, sym: bool):
        super().__init__()
        self.bits, self.sym = bits, sym
        self.observing = False
        # non-persistent: a restored model's state dict stays that of the original model
        self.register_buffer("lo", torch.zeros(()), persistent=False)
        self.register_buffer("hi", torch.zeros(()), persistent=False)
        self.register_buffer("step0", torch.ones(()), persistent=False)
        self.register_buffer("zero", torch.zeros(()), persistent=False)
        self.log_mult = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def end_observing(self):
        # with data parallelism every rank saw a different shard: agree on the range
        all_reduce_(self.lo, dist.ReduceOp.MIN)
        all_reduce_(self.hi, dist.ReduceOp.MAX)
        scale, zero = minmax_grid(torch.stack([self.lo, self.hi]).view(1, 2), self.bits, -1, self.sym)
        self.step0.copy_(scale.view(()))
        self.zero.copy_(zero.view(()))
        self.observing = False

    def step(self) -> torch.Tensor:
        return self.step0 if self.log_mult is None else self.step0 * self.log_mult.exp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.lo.copy_(torch.minimum(self.lo, x.detach().min().float()))
            self.hi.copy_(torch.maximum(self.hi, x.detach().max().float()))
            return x
        s = self.step()
        q = (round_ste(x.float() / s) + self.zero).clamp(0, 2 ** self.bits - 1)
        return ((q - self.zero) * s).to(x.dtype)

    def scheme(self) -> dict:
        return act_scheme(self.bits, False, self.sym)

    @torch.no_grad()
    def freeze(self):
        """Fold the learned multiplier into the step; nothing is left to train."""
        if self.log_mult is not None:
            self.step0.mul_(self.log_mult.exp())
            del self.log_mult
            self.log_mult = None


def act_quantizer(bits: int, dynamic: bool, sym: bool) -> nn.Module:
    return DynamicActQuant(bits, sym) if dynamic else StaticActQuant(bits, sym)


@contextlib.contextmanager
def observing(quantizers: list[StaticActQuant]):
    """The quantizers pass inputs through and record their range; the grid is set on exit."""
    for q in quantizers:
        q.observing = True
    yield
    for q in quantizers:
        q.end_observing()


def quantize_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook that keeps a restored layer quantizing its input."""
    return (module.crossblock_act_quant(args[0]), *args[1:])


def attach(module: nn.Module, quantizer: nn.Module):
    """Make a plain Linear quantize its input with `quantizer` (a restored or loaded layer)."""
    module.crossblock_act_quant = quantizer
    module.register_forward_pre_hook(quantize_input)


# -- saved folders: the activation quantizers recorded in crossblock.json ----------------------
def record(model: nn.Module) -> dict | None:
    """The model's activation quantizers as JSON: the scheme, and per layer its static
    [step, zero point] (float32 values, exact through JSON) or None for dynamic ones."""
    layers = {n: m.crossblock_act_quant for n, m in model.named_modules() if hasattr(m, "crossblock_act_quant")}
    if not layers:
        return None
    static = lambda q: [q.step().item(), q.zero.item()] if isinstance(q, StaticActQuant) else None  # noqa: E731
    return {**next(iter(layers.values())).scheme(), "layers": {n: static(q) for n, q in sorted(layers.items())}}


def rebuild(model: nn.Module, recorded: dict):
    """Attach the quantizers `record` described to the loaded model's layers."""
    for name, static in recorded["layers"].items():
        module = model.get_submodule(name)
        if recorded["dynamic"]:
            quantizer = DynamicActQuant(recorded["bits"], recorded["symmetric"])
        else:
            quantizer = StaticActQuant(recorded["bits"], recorded["symmetric"])
            quantizer.step0.fill_(static[0])
            quantizer.zero.fill_(static[1])
            quantizer.freeze()
        attach(module, quantizer.to(module.weight.device))
