"""llama.cpp's GGUF weight types as grids: the math shared by the gguf grid, its records and the
GGUF export. Each formula is what the `gguf` package's numpy dequantizers compute, in float32,
op for op, so a crossblock weight and the file's decoded tensor are equal bit for bit.

A row is cut into super-blocks of `block` weights (32 legacy, 256 K-quants) and those into
sub-blocks of `sub` weights; q are unsigned integers in [0, 2**bits - 1]. Per sub-block j:

- symmetric types (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K):  Ŵ = step_j * (q - z),  z = 2**(bits-1)
  (ggml stores the signed q - z);
- types with a min (Q4_1, Q5_1, Q2_K, Q4_K, Q5_K): Ŵ = step_j * q - low_j.

Legacy types (scale_bits 0): step = d, low = -m, with d and m fp16 per block (Q4_1: d*q + m,
and d*q - (-m) is the same float). K-quants: step_j = d * sc_j and low_j = dmin * m_j with d,
dmin fp16 per super-block and sc_j, m_j integers of `scale_bits` bits (signed for Q3_K and Q6_K,
where there is no min). fp16 d times an integer of at most 8 bits is exact in float32, so
sc_j = step_j / d exactly: the records keep (step, low, d, dmin), nothing else.

Parameters (round to nearest, llama.cpp's conventions, differentiable through straight-through
rounding so clipping can be learned):
- symmetric: the signed extreme x of the sub-block (largest |w|, after clipping) lands on the
  most negative level: step = x / -2**(bits-1) (Q8_0: step = max|w| / 127, as ggml);
- with a min: step = (max - min) / (2**bits - 1), low = -min (K-quants: min clamped to <= 0).
K-quants then quantize the sub-block steps (and lows) under the super-block's largest:
d = fp16(max_j step_j / smax), sc_j = clamp(round(step_j / d)).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GgufType:
    name: str
    block: int          # weights per (super-)block: the row width must be a multiple
    sub: int            # weights per sub-block (one step, one low)
    bits: int
    scale_bits: int     # 0: legacy (fp16 step per block); else sub-block scale integer width
    has_min: bool

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1

    @property
    def zero(self) -> int:
        return 2 ** (self.bits - 1)

    @property
    def subs(self) -> int:
        """Sub-blocks per super-block."""
        return self.block // self.sub

    @property
    def signed_scales(self) -> bool:
        return self.scale_bits > 0 and not self.has_min

    @property
    def bits_per_weight(self) -> float:
        """The stored size: values, a 16-bit step (and min) per block, sub-block scales (and mins)."""
        per_block = 16 * (1 + self.has_min) + self.subs * self.scale_bits * (1 + self.has_min)
        return self.bits + per_block / self.block


TYPES = {t.name: t for t in (
    GgufType("Q4_0", 32, 32, 4, 0, False), GgufType("Q4_1", 32, 32, 4, 0, True),
    GgufType("Q5_0", 32, 32, 5, 0, False), GgufType("Q5_1", 32, 32, 5, 0, True),
    GgufType("Q8_0", 32, 32, 8, 0, False),
    GgufType("Q2_K", 256, 16, 2, 4, True), GgufType("Q3_K", 256, 16, 3, 6, False),
    GgufType("Q4_K", 256, 32, 4, 6, True), GgufType("Q5_K", 256, 32, 5, 6, True),
    GgufType("Q6_K", 256, 16, 6, 8, False),
)}


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round forward, identity backward (as quant/grid.py's, which imports this module)."""
    return x + (torch.round(x) - x).detach()


def fp16_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounded to fp16 (what the file stores), identity backward."""
    return x + (x.to(torch.float16).float() - x).detach()


def sub_view(w: torch.Tensor, t: GgufType) -> torch.Tensor:
    """(out, in) -> (out, in / sub, sub); in must be a multiple of t.block."""
    return w.reshape(w.shape[0], -1, t.sub)


def super_view(x: torch.Tensor, t: GgufType) -> torch.Tensor:
    """(out, subs) -> (out, supers, subs per super)."""
    return x.reshape(x.shape[0], -1, t.subs)


def nonzero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x == 0, torch.ones_like(x), x)


def signed_extreme(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """hi if |hi| >= |lo| else lo (hi >= 0 >= lo)."""
    return torch.where(hi >= -lo, hi, lo)


def sub_scales(x: torch.Tensor, t: GgufType, signed: bool):
    """K-quants: per-sub-block values x (out, subs) as fp16 d per super-block times integers;
    returns (d repeated per sub-block, integers), both (out, subs)."""
    xs = super_view(x, t)
    levels = 2 ** (t.scale_bits - 1) if signed else 2 ** t.scale_bits - 1
    if signed:  # the signed extreme lands on -levels, as ggml's make_qx_quants
        ext = signed_extreme(xs.amax(-1, keepdim=True).clamp(min=0), xs.amin(-1, keepdim=True).clamp(max=0))
        d = fp16_ste(ext / -levels)
        ints = round_ste(xs / nonzero(d)).clamp(-levels, levels - 1)
    else:
        d = fp16_ste(xs.amax(-1, keepdim=True) / levels)
        ints = round_ste(xs / nonzero(d)).clamp(0, levels)
    return d.expand_as(xs).reshape(x.shape), ints.reshape(x.shape)


def params(w: torch.Tensor, t: GgufType, max_mult=None, min_mult=None):
    """(step, rest): step (out, subs); rest (out, subs, 3) = (z or low, d, dmin), d and dmin
    repeated over their super-block's sub-blocks (legacy: d = step). `max_mult`/`min_mult`
    (out, subs) clip each sub-block's max and min before anything is rounded."""
    wg = sub_view(w, t)
    hi, lo = wg.amax(-1), wg.amin(-1)
    if t.has_min and t.scale_bits:
        lo = lo.clamp(max=0)
    if not t.has_min:
        hi, lo = hi.clamp(min=0), lo.clamp(max=0)
    if max_mult is not None:
        hi, lo = hi * max_mult, lo * min_mult
    zeros = torch.zeros_like(hi)
    if not t.has_min:
        if t.name == "Q8_0":
            raw = torch.maximum(hi, -lo) / 127
        else:
            raw = signed_extreme(hi, lo) / -t.zero
        if t.scale_bits:
            d, sc = sub_scales(raw, t, signed=True)
            step = d * sc
        else:
            step = d = fp16_ste(raw)
        low, dmin = torch.full_like(hi, float(t.zero)), zeros
    else:
        raw = (hi - lo) / t.qmax
        if t.scale_bits:
            d, sc = sub_scales(raw, t, signed=False)
            dmin, mn = sub_scales(-lo, t, signed=False)
            step, low = d * sc, dmin * mn
        else:
            step = d = fp16_ste(raw)
            low, dmin = -fp16_ste(lo), zeros
    return step, torch.stack([low, d, dmin], dim=-1)


def to_int(w: torch.Tensor, t: GgufType, step, rest, offset=None) -> torch.Tensor:
    """Integers q (float, straight-through) of w; `offset` added before rounding."""
    s = nonzero(step)[..., None]
    x = sub_view(w, t) + (0 if not t.has_min else rest[..., 0, None])
    x = x / s
    if offset is not None:
        x = x + sub_view(offset, t)
    q = round_ste(x) + (rest[..., 0, None] if not t.has_min else 0)
    return q.clamp(0, t.qmax).reshape(w.shape)


def decode(q: torch.Tensor, t: GgufType, step, rest) -> torch.Tensor:
    """Ŵ in float32, the dequantizer's operations in its order."""
    qg = sub_view(q, t).float()
    s = step[..., None]
    if t.has_min:
        out = s * qg - rest[..., 0, None]
    else:
        out = s * (qg - rest[..., 0, None])
    return out.reshape(q.shape)


def codes(t: GgufType, step: torch.Tensor, rest: torch.Tensor) -> dict[str, torch.Tensor]:
    """What the file stores besides q: d, dmin fp16 (out, supers), sc, m integers (out, subs).
    Exact (see the module docstring); checked, since a wrong factor would write a different model."""
    low, d, dmin = rest.unbind(-1)
    first = slice(None, None, t.subs)
    out = {"d": d[:, first].to(torch.float16)}
    if t.scale_bits:
        out["sc"] = torch.where(d == 0, torch.zeros_like(step), step / nonzero(d))
        if t.has_min:
            out["dmin"] = dmin[:, first].to(torch.float16)
            out["m"] = torch.where(dmin == 0, torch.zeros_like(low), low / nonzero(dmin))
        for k in ("sc", "m"):
            if k in out:
                assert torch.equal(out[k], out[k].round()), f"{t.name}: sub-block {k} not integral"
                out[k] = out[k].to(torch.int16)
    elif t.has_min:
        out["m"] = (-low).to(torch.float16)
    return out
