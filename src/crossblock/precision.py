"""Compute precision of the blocks and the model while quantizing: `auto`, `bf16` or `fp32`.

bf16 is torch autocast around block and model forwards (the window engine, the finetune stage):
matmuls run in bf16, everything that must stay exact does not. Float32 stays: the weight
quantizer's grid math and rounding parameters (decoded outside autocast, quant/linear.py), scales
and zero points, activation quantizers' ranges, GPTQ's Hessians and Cholesky (engine/gptq.py),
rotations (preprocess/online.py), losses and their reductions, optimizer state, and the stored
activation chains (blocks return float32 through their residual adds; run_all stores float32).

`auto` picks bf16 where bf16 matmul is native: CUDA (as before this setting existed) and CPUs with
AVX512-BF16 or AMX tiles (about 6x a float32 matmul on a Sapphire Rapids core), fp32 elsewhere:
without those units a bf16 matmul is emulated and slower than float32. `fp32` reproduces the
results of the code before autocast reached the CPU, to the bit.
"""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "bf16", "fp32")


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware through oneDNN (AVX512-BF16 or AMX)."""
    cpu = torch.cpu
    units = [getattr(cpu, f, None) for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return torch.backends.mkldnn.is_available() and any(f is not None and f() for f in units)


def resolve(precision: str, device) -> tuple[str, str]:
    """(bf16 or fp32, why) for a recipe's `precision` on `device`."""
    if precision != "auto":
        return precision, "asked for"
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16", "auto: CUDA"
    if kind == "cpu" and cpu_has_bf16_matmul():
        return "bf16", "auto: this CPU has native bf16 matmul (AVX512-BF16 / AMX)"
    return "fp32", f"auto: no native bf16 matmul on {'this CPU' if kind == 'cpu' else kind}"


def autocast(device, precision: str):
    """The context block and model forwards run in: bf16 autocast, or nothing (`precision` resolved)."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def exact(device):
    """Autocast off, for the math that must stay float32 inside an autocast region."""
    return torch.autocast(torch.device(device).type, enabled=False)
