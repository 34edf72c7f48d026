"""SignRound (Cheng et al., AutoRound): a learned offset in [-0.5, 0.5] per weight added before
rounding, moved by signed gradient steps with a linearly decaying learning rate."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import ROUNDINGS
from .nearest import Nearest

# Below 15 steps a step of 1/iters flips whole layers' rounding at once (stories260k W2
# per-channel, 5 steps: 127 -> 33 ppl; 10 steps: 27.3 -> 24.3; 15+ unchanged).
MAX_OFFSET_STEP = 1 / 15


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad): SignRound's optimizer."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


@ROUNDINGS.register("signround")
@dataclass
class SignRound(Nearest):
    trainable = True

    def add_params(self, layer, generator):
        layer.offset = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.float32))

    def offset(self, layer):
        return layer.offset

    @torch.no_grad()
    def project(self, layer):
        layer.offset.clamp_(-0.5, 0.5)

    def optimizer(self, params, layers, iters, lr):
        # AutoRound's lr 1/iters for everything (clipping, activation steps), but the offsets move
        # at most MAX_OFFSET_STEP per step (capping clipping's step too was worse: W2 5 steps 261)
        offsets = {id(m.offset) for m in layers if getattr(m, "offset", None) is not None}
        base = lr or 1.0 / iters
        groups = [{"params": [p for p in params if id(p) in offsets], "lr": lr or min(base, MAX_OFFSET_STEP)},
                  {"params": [p for p in params if id(p) not in offsets], "lr": base}]
        opt = SignSGD([g for g in groups if g["params"]], lr=base)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / iters)
