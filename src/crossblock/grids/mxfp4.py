"""The mxfp4 grid: the OCP Microscaling FP4 format, as compressed-tensors stores it.

    grid: {type: mxfp4}

E2M1 values and one power-of-two (E8M0) scale per 32 input columns: Ŵ = v * 2**e, e the group
max's exponent minus 2, rounded up once its mantissa reaches 1.75 (quant/fp4.py; grids/fp4.py:
what runs on it).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..config import setting
from .base import GRIDS
from .fp4 import Fp4Grid


@GRIDS.register("mxfp4")
@dataclass
class Mxfp4Grid(Fp4Grid):
    # fixed by the format, so not flags (flat=False): --grid mxfp4 is the whole flat spelling
    group_size: int = setting(32, "values per scale (the format's)", flat=False)
    sym: bool = setting(True, "symmetric (the format is)", flat=False)
