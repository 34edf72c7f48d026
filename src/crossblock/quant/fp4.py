"""Microscaling FP4 (E2M1) weight math: NVFP4 and MXFP4, as compressed-tensors 0.20.1 computes them.

An E2M1 value is one of ±{0, 0.5, 1, 1.5, 2, 3, 4, 6}; its 4-bit code is the magnitude's index
in that list, with bit 3 the sign (the nibble compressed-tensors, vLLM and llama.cpp pack).
A group of input columns shares one scale; Ŵ = v * step, step = scale / global, in float32:

- NVFP4: 16 columns per group; scale in FP8 E4M3, global one FP32 per tensor:
  global = 448 * 6 / amax|W|, scale = e4m3(amax_group / 6 * global) (0 -> 0.125, their eps);
- MXFP4: 32 columns per group; scale a power of two (E8M0: code 127 + exponent), global 1:
  exponent = floor(log2(amax_group rounded to a power of two)) - 2, where the rounding goes up
  once the mantissa reaches 1.75 (compressed-tensors' `round_to_power_2` with E2M1's mantissa).

Rounding to E2M1 (`round_e2m1`) is compressed-tensors' `cast_to_fp4`: clamp to ±6, nearest value,
ties to the even mantissa (0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4), and a negative input that
rounds to zero keeps its sign (-0.0, code 8). The weight divided by the step is rounded, as
their `_quantize_dequantize` does, so a fake-quantized weight is their dequantized one bit for bit.

Records (QuantizedWeight with kind "nvfp4" / "mxfp4"): q holds the codes (uint8), scale the
group scales as float32 (E4M3 values, or powers of two), zero the global scale broadcast to
(out, groups) (1 for MXFP4): one shape for every grid, so expert slicing and checkpoints need
nothing new.
"""
from __future__ import annotations

import torch

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_ZERO_SCALE = 0.125       # compressed-tensors' replacement of a zero E4M3 scale
MX_ELEM_EMAX = 2              # floor(log2(6)): MXFP4 maps a group's max near 4..6
GROUP = {"nvfp4": 16, "mxfp4": 32}


def table(device) -> torch.Tensor:
    return torch.tensor(E2M1, dtype=torch.float32, device=device)


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Nearest signed E2M1 value of x (float32), compressed-tensors' cast_to_fp4 (module doc).
    The values are multiples of 0.5 below 2, of 1 below 4 and of 2 up to 6, so |x| divided by
    that step (a power of two: exact) rounds half to even, as their ties go; the step is |x|'s
    power of two, halved and kept within 0.5..2. A few passes over the tensor: W4A4 runs this
    on every linear input."""
    a = x.float().abs().clamp_(max=E2M1_MAX)
    step = (a.view(torch.int32) & 0x7F800000).view(torch.float32).clamp_(1.0, 4.0).mul_(0.5)
    return a.div_(step).round_().mul_(step).copysign_(x)


def round_e2m1_ste(x: torch.Tensor) -> torch.Tensor:
    """round_e2m1 forward; identity backward inside ±6, zero outside (as a clamp passes it).
    Without gradients it is round_e2m1 itself (the sum below would turn a -0.0 into +0.0)."""
    if not (torch.is_grad_enabled() and x.requires_grad):
        return round_e2m1(x)
    c = x.clamp(-E2M1_MAX, E2M1_MAX)
    return round_e2m1(x.detach()) + (c - c.detach())  # forward exactly the E2M1 value


def to_codes(v: torch.Tensor) -> torch.Tensor:
    """E2M1 values -> 4-bit codes (uint8): magnitude index, sign in bit 3."""
    idx = torch.searchsorted(table(v.device), v.detach().abs().float().contiguous())
    return (idx | (torch.signbit(v.detach()).long() << 3)).to(torch.uint8)


def from_codes(q: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> E2M1 values (float32); code 8 is -0.0, as compressed-tensors unpacks it."""
    q = q.long()
    v = table(q.device)[q & 7]
    return torch.where((q & 8) != 0, -v, v)


def values(q: torch.Tensor) -> torch.Tensor:
    """A grid's integers, as either form arrives: codes (uint8, frozen) or values (float, to_int)."""
    return from_codes(q) if q.dtype == torch.uint8 else q.float()


def group_view(w: torch.Tensor, group: int) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, group)


def ungroup(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def step(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """(out, groups) step of each group: scale / global, the order compressed-tensors divides in."""
    return scale / zero


def global_scale(w: torch.Tensor) -> torch.Tensor:
    """NVFP4's per-tensor FP32 scale (compressed-tensors' generate_gparam), 0-dim."""
    amax = w.detach().abs().amax().float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(E4M3_MAX * E2M1_MAX / amax, nan=1.0, posinf=1.0, neginf=1.0)


def round_power_2(x: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' round_to_power_2 on float32 with E2M1's 1-bit mantissa: keep sign and
    exponent after adding 0.25 to the mantissa (up to the next power once it reaches 1.75)."""
    bits = x.float().contiguous().view(torch.int32)
    return ((bits + (1 << 21)) & (((1 << 9) - 1) << 23)).view(torch.float32)


def nvfp4_scales(amax: torch.Tensor, glob: torch.Tensor) -> torch.Tensor:
    """E4M3 group scales of group maxima `amax` (out, groups) under global scale `glob`;
    rounded straight through, so clipping multipliers in amax still learn."""
    s = (amax / E2M1_MAX * glob).clamp(max=E4M3_MAX)
    s8 = s.detach().to(torch.float8_e4m3fn).float() + (s - s.detach())
    return torch.where(s8.detach() == 0, torch.full_like(s8, E4M3_ZERO_SCALE), s8)


def mx_exponent(amax: torch.Tensor) -> torch.Tensor:
    """MXFP4's unbiased E8M0 exponent of each group max, within the codes 0..254 (255 is NaN)."""
    p2 = round_power_2(amax.detach())  # a power of two, or 0 (amax 0 or subnormal: log2 is -inf there)
    e = torch.where(p2 > 0, exponent_of(p2) - MX_ELEM_EMAX, torch.full_like(p2, -127.0))
    return e.clamp(-127, 127)


def exponent_of(p2: torch.Tensor) -> torch.Tensor:
    """log2 of powers of two (subnormals too), exactly: frexp's exponent, not a libm log2."""
    return (torch.frexp(p2).exponent - 1).float()


def mxfp4_scales(amax: torch.Tensor) -> torch.Tensor:
    """Power-of-two group scales; straight through, d scale / d amax = scale / amax (the scale
    moves in proportion to amax), so clipping multipliers still learn."""
    s = 2.0 ** mx_exponent(amax)
    ref = amax.detach().clamp(min=torch.finfo(torch.float32).tiny)
    return s + s.detach() * (amax - amax.detach()) / ref


def params(w: torch.Tensor, kind: str, max_mult=None, glob: torch.Tensor | None = None):
    """(scale, zero) of `kind` for w (out, in); `max_mult` (out, groups) clips each group's max
    (symmetric: the one multiplier); `glob`: NVFP4's global scale, default from w itself."""
    amax = group_view(w, GROUP[kind]).abs().amax(-1)
    if max_mult is not None:
        amax = amax * max_mult
    if kind == "mxfp4":
        scale = mxfp4_scales(amax)
        return scale, torch.ones_like(scale.detach())
    glob = global_scale(w) if glob is None else glob
    scale = nvfp4_scales(amax, glob)
    return scale, glob.expand(scale.shape).clone()


def to_values(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
              offset: torch.Tensor | None = None) -> torch.Tensor:
    """E2M1 values (float, straight-through) of w on the grid; `offset` (SignRound) is added to
    W / step before rounding."""
    x = group_view(w, group) / step(scale, zero)[..., None]
    if offset is not None:
        x = x + group_view(offset, group)
    return ungroup(round_e2m1_ste(x))


def decode(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """Ŵ = v * (scale / global), float32, from codes or values."""
    return ungroup(group_view(values(q), group) * step(scale, zero)[..., None])


def e8m0_codes(scale: torch.Tensor) -> torch.Tensor:
    """Power-of-two scales -> biased E8M0 codes (uint8), compressed-tensors' compress_mx_scale."""
    return (127 + exponent_of(scale.float())).to(torch.uint8)


def pack_codes(q: torch.Tensor) -> torch.Tensor:
    """(out, in) codes -> (out, in / 2) bytes, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_codes(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)
