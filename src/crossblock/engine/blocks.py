"""Where the decoder blocks live between the windows that use them: one small interface.

The window engine asks a BlockStore for a block before a window uses it (`fetch`) and hands it
back after (`leave`); it never knows where the block was. Two stores:

- `InMemoryBlocks`: the whole model is in memory; a block visits the device for its windows and
  goes back to where the user put it.
- `stream.BlockStream` (--low-memory): the model is a skeleton on the meta device; a block is read
  from the checkpoint's shards when a window needs it, and written to a spill file and dropped
  once it is frozen. Its quantized layers then exist only in their checkpoint block file, which
  is why `leave` says whether the block was dropped (a resumed run reads them back from there).

A stage that reads or changes every block at once declares `needs_whole_model` and asks the store
for the whole model (`whole_model`); `admit` is the one check of that declaration, and a store
that never holds every block refuses such a stage there (api.quantize asks it for every stage
before any work, `stream.refuse_unsupported` before even loading the model).
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import CrossblockError


class BlockStore:
    blocks: nn.ModuleList      # the model's blocks; a store may replace an entry (a block read from disk)
    holds_whole_model = True   # whether every block can be in memory at once
    asked_by = ""              # how the user chose this store, for refusals (e.g. "--low-memory")

    def fetch(self, j: int):
        """Block j in memory (where it lives between windows), before a window uses it."""
        raise NotImplementedError

    def leave(self, j: int, finished: bool) -> bool:
        """Block j is done with for this window (`finished`: frozen, and checkpointed: no later
        window trains it). True when the store dropped it from memory: its quantized layers are
        then only in its checkpoint block file."""
        raise NotImplementedError

    def before_blocks(self, ids: torch.Tensor):
        """A context in which the modules before the blocks (the embeddings) can run on `ids`,
        for the capture of the block-0 inputs."""
        return contextlib.nullcontext()

    @classmethod
    def admit(cls, stage):
        """Refuse a stage this store cannot run (`Stage.needs_whole_model`: checked here only)."""
        if stage.needs_whole_model and not cls.holds_whole_model:
            name = stage.kind_name
            raise CrossblockError(f"{cls.asked_by} cannot run the {name} stage: it needs the whole model in memory "
                                  f"(run without {cls.asked_by}, or drop {name} from the recipe)")

    @contextlib.contextmanager
    def whole_model(self, model: nn.Module, stage, device):
        """`model` with every block on `device` for `stage` (which declares `needs_whole_model`),
        moved back to where it was afterwards."""
        if not stage.needs_whole_model:
            raise TypeError(f"the {stage.kind_name} stage asks for the whole model: declare needs_whole_model = True")
        self.admit(stage)
        home = next(model.parameters()).device
        model.to(device)
        try:
            yield
        finally:
            model.to(home)


class InMemoryBlocks(BlockStore):
    """Every block in memory; between its windows a block stays where the user put it (usually
    the CPU), recorded when a window first fetches it."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self.home: dict[int, torch.device] = {}

    def fetch(self, j: int):
        self.home.setdefault(j, next(self.blocks[j].parameters()).device)

    def leave(self, j: int, finished: bool) -> bool:
        self.blocks[j].to(self.home[j])
        return False
