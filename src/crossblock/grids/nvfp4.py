"""The nvfp4 grid: NVIDIA's FP4, as llm-compressor / compressed-tensors / vLLM store it.

    grid: {type: nvfp4}

E2M1 values, one FP8 E4M3 scale per 16 input columns and one FP32 global scale per tensor:
Ŵ = v * (scale / global), global = 448 * 6 / amax|W| (quant/fp4.py; grids/fp4.py: what runs on it).
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import GRIDS
from .fp4 import Fp4Grid


@GRIDS.register("nvfp4")
@dataclass
class Nvfp4Grid(Fp4Grid):
    group_size: int = 16   # fixed by the format
    sym: bool = True       # fixed by the format
