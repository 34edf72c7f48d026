"""Uniform integer grids for weights: per output channel or per group of input columns.

Conventions (shared by fake-quant, GPTQ and the packed exports):
- integers q are unsigned in [0, 2**bits - 1]; Ŵ = scale * (q - zero), computed in float32;
- asymmetric: scale = (max - min) / (2**bits - 1), zero = round(-min / scale);
- symmetric: scale = 2 * max|w| / (2**bits - 1), zero = 2**(bits - 1) (signed q - zero in
  [-2**(bits-1), 2**(bits-1) - 1], the compressed-tensors / GPTQ convention);
- min and max are taken with 0 included, so 0 is always on the grid;
- group_size -1 means one group per output channel; a group size that does not divide
  in_features leaves a smaller last group ("ragged"), which fake-quant handles and the packed
  formats refuse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp4, gguf


def num_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else -(-in_features // group_size)


def group_view(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(out, in) -> (out, groups, g). A ragged last group is padded by repeating its last
    column, which changes neither its min nor its max."""
    out, cin = w.shape
    g = cin if group_size == -1 else group_size
    pad = num_groups(cin, group_size) * g - cin
    if pad:
        w = torch.cat([w, w[:, -1:].expand(out, pad)], dim=1)
    return w.reshape(out, -1, g)


def ungroup(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, groups, g) -> (out, in), dropping a ragged group's padding. Per-group arithmetic
    broadcasts (out, groups, 1) over group_view instead of expanding scales to (out, in) first
    (one weight-sized copy per scale and zero point saved: a SmolLM2 layer's fake-quant forward
    6.0 -> 3.9 ms)."""
    t = t.reshape(t.shape[0], -1)
    return t if t.shape[1] == in_features else t[:, :in_features]


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def minmax_grid(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                max_mult: torch.Tensor | None = None, min_mult: torch.Tensor | None = None,
                scale_dtype: torch.dtype | None = None):
    """Scale and zero point of every group, shape (out, groups). The optional multipliers
    (learnable weight clipping) shrink the range; gradients flow into them through the scale.
    `scale_dtype` rounds scales to what a checkpoint stores (fp16 for GPTQ), so the packed
    integers dequantize to exactly the fake-quantized weights."""
    wg = group_view(w, group_size)
    wmax = wg.amax(-1).clamp(min=0)
    wmin = wg.amin(-1).clamp(max=0)
    if max_mult is not None:
        wmax = wmax * max_mult
        wmin = wmin * min_mult
    qmax = 2 ** bits - 1
    scale = (2 * torch.maximum(wmax, -wmin) if sym else wmax - wmin) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scale_dtype is not None:
        scale = scale + (scale.to(scale_dtype).float() - scale).detach()
    if sym:
        zero = torch.full_like(scale, 2 ** (bits - 1))
    else:
        zero = round_ste(-wmin / scale).clamp(0, qmax)
    return scale, zero


def quantize_to_int(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                    group_size: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Integers q (as float, differentiable via STE) for w on the grid; `offset` is a learnable
    rounding perturbation added before rounding (SignRound)."""
    x = group_view(w, group_size) / scale[..., None]
    if offset is not None:
        x = x + group_view(offset, group_size)
    if not needs_grad(w, scale, zero, offset):  # (freezing) the same integers in one weight-sized tensor
        return ungroup(x.round_().add_(zero[..., None]).clamp_(0, 2 ** bits - 1), w.shape[1])
    return ungroup((round_ste(x) + zero[..., None]).clamp(0, 2 ** bits - 1), w.shape[1])


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _RoundedWeight(torch.autograd.Function):
    """s * (clamp(round(W/s + offset) + z, 0, qmax) - z) on grouped views (out, groups, g),
    with the straight-through gradients autograd would give for offset, scale and zero (W
    itself gets none), but computed in place from one saved tensor (W/s + offset): autograd's
    graph of the same expression keeps about five weight-sized tensors per layer, and at batch 2
    it cost as much as the layers' matmuls."""

    @staticmethod
    def forward(ctx, wg, scale, zero, offset, qmax):
        s, z = scale[..., None], zero[..., None]
        x = wg / s
        if offset is not None:
            x += offset
        out = torch.round(x).add_(z).clamp_(0, qmax).sub_(z).mul_(s)
        ctx.save_for_backward(x, scale, zero, offset)
        ctx.qmax = qmax
        return out

    @staticmethod
    def backward(ctx, grad):
        x, scale, zero, offset = ctx.saved_tensors
        s, z = scale[..., None], zero[..., None]
        r = torch.round(x)
        q = r + z
        inside = (q >= 0) & (q <= ctx.qmax)  # where rounding passes gradients straight through
        gs = grad * s
        g_in = torch.where(inside, gs, 0)      # d out / d offset
        grad_scale = grad_zero = None
        if ctx.needs_input_grad[2]:            # d out / d z = -1 where clamped
            grad_zero = g_in.sum(-1) - gs.sum(-1)
        if ctx.needs_input_grad[1]:            # d out / d s = q - z, minus W/s where inside
            r.sub_(x)
            if offset is not None:
                r.add_(offset)                 # round(x) - W/s, as x = W/s + offset
            q.clamp_(0, ctx.qmax).sub_(z)
            grad_scale = torch.where(inside, r, q).mul_(grad).sum(-1)
        grad_offset = g_in if offset is not None and ctx.needs_input_grad[3] else None
        return None, grad_scale, grad_zero, grad_offset, None


def fake_quantize_weight(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                         group_size: int, offset: torch.Tensor | None = None) -> torch.Tensor:
    """dequantize(quantize_to_int(w, ...)) for a weight that takes no gradient, with the same
    bits and gradients, in a fraction of the time and memory."""
    og = None if offset is None else group_view(offset, group_size)
    out = _RoundedWeight.apply(group_view(w.detach(), group_size), scale, zero, og, 2 ** bits - 1)
    return ungroup(out, w.shape[1])


# Clipping ratios tried by `search_clip`: the full range down to 70% of it.
CLIP_RATIOS = tuple(1 - 0.025 * i for i in range(13))


@torch.no_grad()
def least_error_ratio(error_at, shape: tuple[int, int], device) -> torch.Tensor:
    """Per group, the ratio in CLIP_RATIOS of least `error_at(mult)`: a grid's summed squared
    error per group, (out, groups), with every group's range clipped by `mult`."""
    best_ratio = torch.ones(shape, device=device)
    best_err = torch.full_like(best_ratio, float("inf"))
    for ratio in CLIP_RATIOS:
        mult = torch.full_like(best_ratio, ratio)
        err = error_at(mult)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_ratio = torch.where(better, mult, best_ratio)
    return best_ratio


def squared_error(w: torch.Tensor, dq: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """(dq - w)^2, each input column weighted by its importance (the mean squared input that meets
    it: llama.cpp's importance matrix, the diagonal of GPTQ's Hessian) when one is given."""
    err = (dq - w) ** 2
    return err if importance is None else err * importance.to(err.device, err.dtype)


@torch.no_grad()
def search_clip(w: torch.Tensor, bits: int, group_size: int, sym: bool,
                scale_dtype: torch.dtype | None = None, importance: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the clipping ratio in CLIP_RATIOS whose round-to-nearest grid reproduces the
    weights with the least squared error (input-weighted with `importance`), shape (out, groups).
    Min/max grids waste levels on a group's extreme weight; at 2-3 bits a tighter range is
    usually closer overall."""
    w = w.float()

    def error_at(mult):
        scale, zero = minmax_grid(w, bits, group_size, sym, mult, mult, scale_dtype)
        dq = dequantize(quantize_to_int(w, scale, zero, bits, group_size), scale, zero, group_size)
        return group_view(squared_error(w, dq, importance), group_size).sum(-1)
    return least_error_ratio(error_at, (w.shape[0], num_groups(w.shape[1], group_size)), w.device)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    x = group_view(q, group_size)
    if not needs_grad(q, scale, zero):  # the same values in place: one weight-sized tensor, not three
        return ungroup(x.to(torch.float32, copy=True).sub_(zero[..., None]).mul_(scale[..., None]), q.shape[1])
    return ungroup(scale[..., None] * (x.float() - zero[..., None]), q.shape[1])


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """Round-to-nearest on the min/max grid: the RTN baseline."""
    scale, zero = minmax_grid(w.float(), bits, group_size, sym)
    return dequantize(quantize_to_int(w.float(), scale, zero, bits, group_size), scale, zero, group_size)


@dataclass
class QuantizedWeight:
    """A finished integer weight: what the packed exports write. Attached to each quantized
    nn.Linear (or Conv1D) as `module.crossblock_qweight` once quantization is done."""
    q: torch.Tensor        # uint8 (out, in), values in [0, 2**bits - 1]
    scale: torch.Tensor    # float32 (out, groups)
    zero: torch.Tensor     # float32 (out, groups), integral values
    bits: int
    group_size: int        # -1: per output channel
    sym: bool
    # "uniform", or a GGUF type (quant/gguf.py): then scale is each sub-block's step and zero
    # (out, groups, 3) holds (zero or low, d, dmin), and q decodes by that type's formula;
    # or "nvfp4" / "mxfp4" (quant/fp4.py): q are E2M1 codes, zero the global scale per group
    kind: str = "uniform"

    def dequantize(self) -> torch.Tensor:
        if self.kind in fp4.GROUP:
            return fp4.decode(self.q, self.scale, self.zero, self.group_size)
        if self.kind != "uniform":
            return gguf.decode(self.q, gguf.TYPES[self.kind], self.scale, self.zero)
        return dequantize(self.q, self.scale, self.zero, self.group_size)

    @property
    def ragged(self) -> bool:
        return self.kind == "uniform" and self.group_size != -1 and self.q.shape[1] % self.group_size != 0
