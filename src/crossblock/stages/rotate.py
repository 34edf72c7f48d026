"""`rotate` stage: QuaRot-style orthogonal rotations of the FP model's hidden spaces (the math is in
preprocess/rotate.py), run before any other stage. The function is unchanged; per-token
activation quantizers no longer see outlier channels (SmolLM2 W4A4 g64: RTN 1,352 -> 110 ppl)."""
from __future__ import annotations

from dataclasses import dataclass

from ..preprocess.rotate import KINDS, rotate_model
from .base import STAGES, Stage


@STAGES.register("rotate")
@dataclass
class Rotate(Stage):
    needs_whole_model = True
    kind: str = "hadamard"        # hadamard (a construction for the size, else random-orthogonal) or random-orthogonal
    seed: int = 0                 # the random signs / matrices
    online: bool = True           # a run-time Hadamard before down_proj (its input has no weight to absorb one)

    def check(self):
        self.refuse(self.kind in KINDS, f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")

    def run(self, model, job):
        job.report["rotate"] = rotate_model(model, seed=self.seed, online_down_proj=self.online, kind=self.kind)
