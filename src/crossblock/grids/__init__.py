"""Weight grids: where a quantized weight's values may lie, and how integers map to them.

A grid is a registered Config (`GRIDS`) with one interface that the window engine, GPTQ,
checkpoints and the exports use: `params` (scales and zero points of a weight, optionally
clipped), `fake_quantize` / `to_int` (round a weight onto them, with straight-through
gradients), `decode` (integers back to weights) and `frozen` (the record the exports write); `for_layer` (the
grid of one layer, e.g. a mixture's member), `for_block` (grids that tie a block's layers, nvfp4's
shared global scale), `check_windows` (initializations and roundings it cannot run) and `finish`
(after the stages) let a grid differ per layer; `option` (the same grid with another bit width or
type) and `bits_per_weight` (its stored size) are what mixed precision (stages/bits.py) chooses
among. A new grid is one file here and one `@GRIDS.register` line.

- uniform.py: min-max integers, per channel or group (the default);
- gguf.py: llama.cpp's GGUF types and mixtures (Q4_0 ... Q6_K, Q4_K_M, Q3_K_M);
- nvfp4.py, mxfp4.py: microscaling FP4 (E2M1 with E4M3 / E8M0 group scales; fp4.py shares them).
"""
from .base import GRIDS
from .gguf import GgufGrid  # registers the grid
from .mxfp4 import Mxfp4Grid  # registers the grid
from .nvfp4 import Nvfp4Grid  # registers the grid
from .uniform import UniformGrid  # registers the grid

__all__ = ["GRIDS", "GgufGrid", "Mxfp4Grid", "Nvfp4Grid", "UniformGrid"]
