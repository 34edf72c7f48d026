"""`cfp` stage: CBQ's coarse-to-fine preprocessing on the FP model (preprocess/), before any
quantization: outlier channels scaled into the layers that produce them, outlier weights
optionally truncated."""
from __future__ import annotations

from dataclasses import dataclass

from ..preprocess import cfp
from ..config import setting
from .base import STAGES, Stage


@STAGES.register("cfp")
@dataclass
class Cfp(Stage):
    """CBQ's coarse-to-fine preprocessing of the FP model (outlier channels and weights)."""
    needs_whole_model = True
    order = 20
    alpha: float = setting(0.7, "outlier channel c is divided by (max_c / max_non_outlier) ** alpha")
    weights: bool = setting(False, "also truncate outlier weights (CBQ; doubled SmolLM2's W4A16 ppl)")

    def check(self):
        self.refuse(0 < self.alpha <= 1, f"alpha must be in (0, 1], got {self.alpha}")

    def run(self, model, job):
        job.report["cfp"] = cfp(model, job.ids, self.alpha, self.weights, job.data.batch_size, job.skip,
                                job.device, job.progress)
