"""Stages: the steps of a recipe, run in order on the model.

A stage is a registered Config (`STAGES`) with a `run(model, job)`: it reads only its own
settings and the `Job` (calibration ids, the recipe's grid, activations and data sections, the
device, checkpoints), changes the model in place and adds what it measured to `job.report`.
Quantized layers stay wrapped (frozen integers, their grid's scales still parameters) from the
stage that makes them to the end of the pipeline, so a later stage can train them. A new stage
is one file here and one `@STAGES.register` line.
"""
from .base import STAGES, Job, Stage, stage_classes
from .bits import Bits
from .cfp import Cfp
from .finetune import Finetune
from .rotate import Rotate
from .windows import Train, Windows

__all__ = ["STAGES", "Stage", "Job", "stage_classes", "Rotate", "Cfp", "Bits", "Windows", "Train", "Finetune"]
