"""AdaRound (Nagel et al. 2020): q = floor(W/s) + h, h = rectified sigmoid of a learned V per weight,
pushed to 0 or 1 by an annealed regularizer; also the base of LoRA-Rounding (lora.py)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import setting
from .base import ROUNDINGS, Rounding

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def inverse_rectified_sigmoid(h: torch.Tensor) -> torch.Tensor:
    p = ((h - GAMMA) / (ZETA - GAMMA)).clamp(1e-4, 1 - 1e-4)
    return torch.log(p / (1 - p))


@dataclass
class SoftRounding(Rounding):
    """floor(W/s) + h with a soft h in [0, 1]; subclasses say where h comes from (`soft_offset`)."""
    reg: float = setting(0.01, "weight of the regularizer that pushes h to 0 or 1 (annealed beta 20 -> 2)",
                         flat="round_reg")
    ste: bool = setting(True, "train the hard rounding through a straight-through estimator; off: the soft "
                              "relaxation (needs many more steps)", flat="ste")

    def check(self):
        self.refuse(self.reg >= 0, f"reg must be >= 0, got {self.reg}")

    def soft_offset(self, layer, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def integers(self, layer, hard: bool):
        scale, zero = layer.grid_params()
        x = layer.grid.scaled(layer.base_weight(), scale)
        h = self.soft_offset(layer, x)
        if hard:
            h = (h >= 0.5).float()
        elif self.ste:  # the forward sees the rounding it will get; gradients flow through h
            h = (h >= 0.5).float() + h - h.detach()
        return layer.grid.shift(torch.floor(x) + h, zero), scale, zero

    def layer_penalty(self, layer, beta: float) -> torch.Tensor:
        """AdaRound's regularizer, mean over weights: pushes h towards 0 or 1."""
        h = self.soft_offset(layer, layer.grid.scaled(layer.base_weight(), layer.grid_params()[0]))
        return (1 - (2 * h - 1).abs().pow(beta)).mean()

    def penalty(self, layers, step, iters):
        # no regularizer for the first 20% of steps, then beta 20 -> 2
        warm = 0.2 * iters
        if step < warm:
            return self.reg * torch.zeros((), device=layers[0].weight.device)
        beta = 20 + (2 - 20) * (step - warm) / max(1.0, iters - warm)
        return self.reg * (sum(self.layer_penalty(m, beta) for m in layers) / len(layers))


@ROUNDINGS.register("adaround")
@dataclass
class AdaRound(SoftRounding):
    def add_params(self, layer, generator):
        layer.v = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.float32))
        self.reset(layer)

    @torch.no_grad()
    def reset(self, layer):
        x = layer.grid.scaled(layer.base_weight(), layer.grid_params()[0])
        layer.v.copy_(inverse_rectified_sigmoid(x - torch.floor(x)))

    def soft_offset(self, layer, x):
        return rectified_sigmoid(layer.v)
