"""Trained weights (EfficientQAT's Block-AP): the weights themselves move, W' = W + s·δ, with δ
unbounded and trained by Adam together with the grid (clipping), rounded straight through. Unlike
SignRound's offset (|δ| <= 0.5: a weight picks one of its two nearest grid points), a weight may
cross grid points. Measured in step units, δ's learning rate suits any weight magnitude."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ROUNDINGS
from .nearest import Nearest


@ROUNDINGS.register("weights")
@dataclass
class TrainedWeights(Nearest):
    trainable = True

    def add_params(self, layer, generator):
        layer.delta = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.float32))

    def offset(self, layer):
        return layer.delta
