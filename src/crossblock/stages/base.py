"""The stage registry, base class and the Job every stage gets (stages/__init__.py says more)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..config import Config, Registry
from ..engine.blocks import BlockStore

STAGES = Registry("stage")


def stage_classes() -> list[type]:
    """The registered stages in the order they run (`Stage.order`)."""
    return sorted(STAGES.classes.values(), key=lambda c: c.order)


class Stage(Config):
    quantizes = False  # whether it turns linear layers into quantized ones (one such stage per recipe)
    needs_whole_model = False  # whether it reads or changes every block at once (a store that streams
                               # blocks refuses it: BlockStore.admit; finetune asks job.blocks.whole_model)
    order = 0  # where it runs: stages run by increasing order (rotate 10, cfp 20, bits 25, windows 30, finetune 40)
    # The flat spelling (flags): every field is a setting named `<stage>_<field>` (`flat_prefix`); a
    # stage that does not quantize is turned on by its switch (its first field with an `off` value,
    # e.g. finetune's steps), or else by a boolean named after it (--rotate, --cfp).

    def run(self, model, job: "Job"):
        raise NotImplementedError


@dataclass
class Job:
    """What a running pipeline gives every stage besides its own settings."""
    ids: torch.Tensor                  # calibration token windows (nsamples, seqlen), all of them
    data: Any                          # recipe.data: nsamples, seqlen, seed, batch_size
    grid: Any                          # recipe.grid (after the bits stage: each layer's own, stages/bits.py)
    activations: Any                   # recipe.activations
    skip: list[str]
    device: torch.device | str = "cpu"
    progress: bool = True
    offload: str = "ram"
    checkpoint_dir: Path | None = None
    fingerprint: str | None = None     # identity of the run (model, recipe, calibration): checkpoints carry it
    resume: Any = None                 # the window engine's checkpoint to continue from
    on_window: Callable | None = None  # called with the engine state after every window
    blocks: BlockStore | None = None   # where the decoder blocks live (engine/blocks.py): InMemoryBlocks, or
                                       # stream.BlockStream on the low-memory path
    precision: str = "fp32"            # block and model compute: bf16 (autocast) or fp32, resolved (precision.py)
    report: dict = field(default_factory=dict)
