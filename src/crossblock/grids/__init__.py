"""Weight grids: where a quantized weight's values may lie, and how integers map to them.

A grid is a registered Config (`GRIDS`) with one interface that the window engine, GPTQ,
checkpoints and the exports use: `params` (scales and zero points of a weight, optionally
clipped), `fake_quantize` / `to_int` (round a weight onto them, with straight-through
gradients), `decode` (integers back to weights) and `frozen` (the record the exports write). A
new grid is one file here and one `@GRIDS.register` line.
"""
from .base import GRIDS
from .uniform import UniformGrid  # registers the grid

__all__ = ["GRIDS", "UniformGrid"]
