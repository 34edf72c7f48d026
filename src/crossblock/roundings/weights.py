"""Trained weights (EfficientQAT's Block-AP): the weights themselves move, W' = W + s·δ, with δ
unbounded and trained by Adam together with the grid (clipping), rounded straight through. Unlike
SignRound's offset (|δ| <= 0.5, signed steps: a weight picks one of its two nearest grid points),
a weight may cross grid points. Measured in step units, δ's learning rate suits any magnitude."""
from __future__ import annotations

from dataclasses import dataclass

from .base import ROUNDINGS, Rounding
from .signround import SignRound


@ROUNDINGS.register("weights")
@dataclass
class TrainedWeights(SignRound):
    def project(self, layer):
        pass  # unbounded: a weight may travel past its neighbouring grid points

    def optimizer(self, params, layers, iters, lr):
        return Rounding.optimizer(self, params, layers, iters, lr)  # Adam, not sign steps
