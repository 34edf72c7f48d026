"""Packing crossblock's GGUF records into ggml's block bytes (the layouts the `gguf` package's
numpy dequantizers read; each helper names the block's fields in file order).

Input per tensor: q (out, in) unsigned integers, and `quant.gguf.codes` (d, dmin fp16 per block,
sc, m integers per sub-block). Output: uint8 (out, in / block * bytes per block).
"""
from __future__ import annotations

import numpy as np

from ..quant.gguf import GgufType


def f16_bytes(x: np.ndarray) -> np.ndarray:
    """(n,) fp16 -> (n, 2) little-endian bytes."""
    return x.astype("<f2").reshape(-1, 1).view(np.uint8)


def nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo & 15) | ((hi & 15) << 4)


def bit_planes(v: np.ndarray, width: int) -> np.ndarray:
    """(n, k * 32) values of `width` bits -> (n, 32) bytes, value k*32+b at bit width*k of byte b."""
    v = v.reshape(v.shape[0], -1, 32).astype(np.uint8)
    out = np.zeros((v.shape[0], 32), np.uint8)
    for k in range(v.shape[1]):
        out |= v[:, k] << np.uint8(width * k)
    return out


def crumbs_128(q: np.ndarray) -> np.ndarray:
    """2-bit values (n, 256) in halves of 128 -> (n, 64): Q2_K/Q3_K's qs."""
    return np.concatenate([bit_planes(q[:, h * 128:(h + 1) * 128] & 3, 2) for h in range(2)], axis=1)


def nibbles_64(q: np.ndarray) -> np.ndarray:
    """4-bit values (n, 256) in chunks of 64 -> (n, 128): chunk g's byte b = q[64g+b] | q[64g+32+b] << 4."""
    c = q.reshape(q.shape[0], -1, 2, 32)
    return nibbles(c[:, :, 0], c[:, :, 1]).reshape(q.shape[0], -1)


def k_scales_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: 8 scales and 8 mins of 6 bits -> 12 bytes."""
    lo = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    mid = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return np.concatenate([lo, mid, hi], axis=1).astype(np.uint8)


def q3k_scales(sc: np.ndarray) -> np.ndarray:
    """Q3_K: 16 scales stored as sc + 32 (6 bits) -> 12 bytes: low nibbles, then high crumbs."""
    u = (sc + 32).astype(np.uint8)
    low = nibbles(u[:, :8], u[:, 8:])
    high = np.zeros((u.shape[0], 4), np.uint8)
    for k in range(4):
        high |= ((u[:, 4 * k:4 * k + 4] >> 4) & 3) << np.uint8(2 * k)
    return np.concatenate([low, high], axis=1)


def pack_mxfp4(codes: np.ndarray, exponent_codes: np.ndarray) -> np.ndarray:
    """ggml's MXFP4 block (32 weights, 17 bytes): the E8M0 scale code, then byte j = code j | code
    j+16 << 4; E2M1 codes (sign in bit 3) are ggml's kvalues indices. (out, in) -> (out, in / 32 * 17)."""
    out_features = codes.shape[0]
    q = codes.reshape(-1, 32).astype(np.uint8)
    e = exponent_codes.reshape(-1, 1).astype(np.uint8)
    return np.concatenate([e, nibbles(q[:, :16], q[:, 16:])], axis=1).reshape(out_features, -1)


def pack(t: GgufType, q: np.ndarray, codes: dict[str, np.ndarray]) -> np.ndarray:
    out_features = q.shape[0]
    q = q.reshape(-1, t.block).astype(np.uint8)       # one row per block
    d = f16_bytes(codes["d"].reshape(-1))
    per_block = lambda k: codes[k].reshape(-1, t.subs).astype(np.int16)  # noqa: E731
    if t.name in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        parts = [d] + ([f16_bytes(codes["m"].reshape(-1))] if t.has_min else [])
        if t.bits == 5:
            parts.append(np.packbits(q >> 4, axis=1, bitorder="little"))
        parts.append(nibbles(q[:, :16], q[:, 16:]))
    elif t.name == "Q8_0":
        parts = [d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)]
    elif t.name == "Q2_K":
        scales = (per_block("sc") | (per_block("m") << 4)).astype(np.uint8)
        parts = [scales, crumbs_128(q), d, f16_bytes(codes["dmin"].reshape(-1))]
    elif t.name == "Q3_K":
        parts = [bit_planes(q >> 2, 1), crumbs_128(q), q3k_scales(per_block("sc")), d]
    elif t.name in ("Q4_K", "Q5_K"):
        parts = [d, f16_bytes(codes["dmin"].reshape(-1)), k_scales_6bit(per_block("sc"), per_block("m"))]
        if t.bits == 5:
            parts.append(bit_planes(q >> 4, 1))
        parts.append(nibbles_64(q))
    elif t.name == "Q6_K":
        c = q.reshape(q.shape[0], 2, 2, 64)
        ql = nibbles(c[:, :, 0], c[:, :, 1]).reshape(q.shape[0], -1)
        qh = np.concatenate([bit_planes(q[:, h * 128:(h + 1) * 128] >> 4, 2) for h in range(2)], axis=1)
        parts = [ql, qh, per_block("sc").astype(np.int8).view(np.uint8), d]
    else:
        raise ValueError(t.name)
    return np.concatenate(parts, axis=1).reshape(out_features, -1)
