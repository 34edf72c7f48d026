"""Round to nearest: no parameters of its own (clipping may still be learned)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ROUNDINGS, Rounding


@ROUNDINGS.register("rtn")
@dataclass
class Nearest(Rounding):
    trainable = False

    def offset(self, layer):
        return None

    def integers(self, layer, hard: bool):
        scale, zero = layer.grid_params()
        return layer.grid.to_int(layer.base_weight(), scale, zero, self.offset(layer)), scale, zero

    def quantized_weight(self, layer, hard: bool):
        # hard rounding is all it has; the fused quantizer gives the same bits in less memory
        scale, zero = layer.grid_params()
        return layer.grid.fake_quantize(layer.base_weight(), scale, zero, self.offset(layer))
