"""The rounding registry and base class (roundings/__init__.py says what a rounding is)."""
from __future__ import annotations

import torch

from ..config import Config, Registry

ROUNDINGS = Registry("rounding")


class Rounding(Config):
    trainable = True  # whether it has parameters of its own (rtn has none)
    # flat spelling: a rounding's fields are settings named `<rounding>_<field>` (lora_rank), picked by --rounding

    def add_params(self, layer, generator: torch.Generator | None):
        pass

    def reset(self, layer):
        """Called when the layer's grid or base weight changes (GPTQ initialization)."""

    def integers(self, layer, hard: bool):
        """(q, scale, zero) for the layer's current parameters; q is float, differentiable unless hard."""
        raise NotImplementedError

    def quantized_weight(self, layer, hard: bool) -> torch.Tensor:
        q, scale, zero = self.integers(layer, hard)
        return layer.grid.decode(q, scale, zero)

    def penalty(self, layers, step: int, iters: int) -> torch.Tensor | None:
        """A term added to the window's loss at `step` (None: nothing)."""
        return None

    def project(self, layer):
        """Keep the layer's rounding parameters in their valid range after a step."""

    def optimizer(self, params, layers, iters: int, lr: float | None):
        """(optimizer, scheduler or None) for the window's parameters (rounding, clipping, steps).
        Adam moves each parameter by about lr per step: lr 1.5/iters keeps the total movement
        equal at any step budget (best at 15 and 60 steps on stories260k W2; a fixed 1e-3 left
        LoRA-Rounding at RTN's perplexity after 15 steps)."""
        return torch.optim.Adam(params, lr=lr or 1.5 / iters), None
