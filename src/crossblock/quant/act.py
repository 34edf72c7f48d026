"""Activation quantizers for the inputs of quantized linear layers (fake-quant, STE).

- DynamicActQuant: every token (row of the last dimension) gets its own min/max grid at run
  time, asymmetric or symmetric, on the same integer conventions as the weights (quant/grid.py)
  and as compressed-tensors' dynamic per-token scheme. Nothing to learn.
- StaticActQuant: one step (and zero point) per tensor, calibrated on the range observed on
  calibration inputs, then learned (LSQ-style: straight-through rounding, the clamp passes
  gradient into the step). The step is step0 · exp(log_mult), so training moves it relative to
  its calibrated size: SignSGD's lr (1/iters, at most ×e^0.5 over a window) and Adam's 1e-3 suit
  any activation scale, and the engine needs no separate learning rate for it.
- Fp4ActQuant: NVFP4 / MXFP4 inputs (W4A4), as compressed-tensors' NVFP4 / MXFP4 schemes run them:
  E2M1 values with one scale per 16 / 32 values along the last dimension, computed at run time by
  the weight grids' math (quant/fp4.py). NVFP4 also has one FP32 global scale per tensor, static:
  448 * 6 / amax of the calibration inputs (compressed-tensors' convention, the reciprocal of the
  NVFP4 spec's amax / (6 * 448); stored as `input_global_scale`). Nothing to learn.
- Fp8ActQuant: FP8 E4M3 per token at run time (compressed-tensors' FP8_DYNAMIC inputs, W4A8 with
  FP4 weights): step = amax_row / 448, x / step rounded to float8_e4m3fn.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from ..distributed import all_reduce_
from . import fp4
from .grid import dequantize, minmax_grid, quantize_to_int, round_ste

# activation types (recipe.Activations.type): integers, or a float format of a fixed width
FLOAT_TYPES = {"nvfp4": 4, "mxfp4": 4, "fp8": 8}
TYPES = ("int", *FLOAT_TYPES)
FP8_MAX = 448.0


def act_scheme(bits: int, dynamic: bool, sym: bool, type: str = "int") -> dict | None:
    """The export's description of an activation quantizer (see export/formats.py), or None.
    Float types name themselves ("type"); integer schemes keep the keys they always had."""
    if bits >= 16:
        return None
    if type == "nvfp4":  # dynamic group scales, a static global scale: compressed-tensors' "local"
        return {"type": type, "bits": 4, "dynamic": "local", "strategy": "tensor_group", "group_size": 16,
                "symmetric": True}
    if type == "mxfp4":
        return {"type": type, "bits": 4, "dynamic": True, "strategy": "group", "group_size": 32, "symmetric": True}
    if type == "fp8":
        return {"type": type, "bits": 8, "dynamic": True, "strategy": "token", "symmetric": True}
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


class Fp4ActQuant(nn.Module):
    """NVFP4 / MXFP4 inputs (module docstring); `glob` is NVFP4's calibrated global scale."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind, self.group = kind, fp4.GROUP[kind]
        self.observing = False
        # non-persistent: a restored model's state dict stays that of the original model
        self.register_buffer("amax", torch.zeros(()), persistent=False)
        self.register_buffer("glob", torch.ones(()), persistent=False)

    @torch.no_grad()
    def end_observing(self):
        all_reduce_(self.amax, dist.ReduceOp.MAX)  # data parallel: every rank's shard
        self.glob.copy_(fp4.global_scale(self.amax))
        self.observing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self.amax.copy_(torch.maximum(self.amax, x.detach().abs().amax().float()))
            return x
        with torch.no_grad():
            rows = x.reshape(-1, x.shape[-1]).float()
            scale, zero = fp4.params(rows, self.kind, glob=self.glob if self.kind == "nvfp4" else None)
            xq = fp4.decode(fp4.to_values(rows, scale, zero, self.group), scale, zero, self.group)
        return straight_through(x, xq.view(x.shape).to(x.dtype))

    def scheme(self) -> dict:
        return act_scheme(4, True, True, self.kind)

    def recorded(self):
        """What crossblock.json keeps of this layer's quantizer: NVFP4's global scale."""
        return [self.glob.item()] if self.kind == "nvfp4" else None

    def freeze(self):
        pass


class Fp8ActQuant(nn.Module):
    """FP8 E4M3 per token, dynamic (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            rows = x.reshape(-1, x.shape[-1]).float()
            step = rows.abs().amax(-1, keepdim=True) / FP8_MAX
            step = torch.where(step == 0, torch.finfo(torch.float32).eps, step)  # compressed-tensors' eps
            xq = (rows / step).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * step
        return straight_through(x, xq.view(x.shape).to(x.dtype))

    def scheme(self) -> dict:
        return act_scheme(8, True, True, "fp8")

    def freeze(self):
        pass


def straight_through(x: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """xq forward, identity backward; without gradients xq itself (x + (xq - x) may round, and
    loses -0.0), so the float formats equal compressed-tensors' fake quantization bit for bit."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return xq
    return x + (xq - x).detach()


def act_quantizer(bits: int, dynamic: bool, sym: bool, type: str = "int") -> nn.Module:
    if type in fp4.GROUP:
        return Fp4ActQuant(type)
    if type == "fp8":
        return Fp8ActQuant()
    return DynamicActQuant(bits, sym) if dynamic else StaticActQuant(bits, sym)


def calibrated(quantizers) -> list[nn.Module]:
    """Those of `quantizers` that observe calibration inputs (static steps, NVFP4's global scale)."""
    return [q for q in quantizers if hasattr(q, "end_observing")]


@contextlib.contextmanager
def observing(quantizers: list[nn.Module]):
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
    [step, zero point] (float32 values, exact through JSON), NVFP4's [global scale], or None for
    dynamic ones."""
    layers = {n: m.crossblock_act_quant for n, m in model.named_modules() if hasattr(m, "crossblock_act_quant")}
    if not layers:
        return None
    def static(q):
        if isinstance(q, StaticActQuant):
            return [q.step().item(), q.zero.item()]
        return q.recorded() if isinstance(q, Fp4ActQuant) else None
    return {**next(iter(layers.values())).scheme(), "layers": {n: static(q) for n, q in sorted(layers.items())}}


def rebuild(model: nn.Module, recorded: dict):
    """Attach the quantizers `record` described to the loaded model's layers."""
    kind = recorded.get("type", "int")
    for name, static in recorded["layers"].items():
        module = model.get_submodule(name)
        if kind != "int":
            quantizer = act_quantizer(recorded["bits"], True, True, kind)
            if static is not None:  # nvfp4: [global scale]
                quantizer.glob.fill_(static[0])
        elif recorded["dynamic"]:
            quantizer = DynamicActQuant(recorded["bits"], recorded["symmetric"])
        else:
            quantizer = StaticActQuant(recorded["bits"], recorded["symmetric"])
            quantizer.step0.fill_(static[0])
            quantizer.zero.fill_(static[1])
            quantizer.freeze()
        attach(module, quantizer.to(module.weight.device))
