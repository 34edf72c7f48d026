"""CBQ's LoRA-Rounding: V = logit(frac(W/s)) + A1·A2 with A2 = 0 at start, so the soft weight starts
at the unrounded weight and hard rounding at init equals RTN. Only (d_out + d_in)·r parameters
train; the per-weight logit term is recomputed from the current W/s, never stored."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import setting
from .base import ROUNDINGS
from .adaround import SoftRounding, inverse_rectified_sigmoid, rectified_sigmoid


@ROUNDINGS.register("lora")
@dataclass
class LoraRound(SoftRounding):
    rank: int = setting(4, "rank of the low-rank term A1·A2")

    def check(self):
        super().check()
        self.refuse(self.rank >= 1, f"rank must be >= 1, got {self.rank}")

    def add_params(self, layer, generator):
        a1 = torch.randn(layer.out_features, self.rank, generator=generator) / self.rank ** 0.5
        layer.lora_a = nn.Parameter(a1.to(layer.weight.device))
        layer.lora_b = nn.Parameter(torch.zeros(self.rank, layer.in_features, device=layer.weight.device))

    def soft_offset(self, layer, x):
        frac = (x - torch.floor(x)).detach()
        return rectified_sigmoid(inverse_rectified_sigmoid(frac) + layer.lora_a @ layer.lora_b)
