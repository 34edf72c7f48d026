"""The `fake` format: dense fake-quantized weights in a plain transformers folder. Anything goes;
activation quantizers are recorded in crossblock.json (api.write_folder), not here.

A run-time input rotation (the rotate stage's Hadamard before down_proj: y = (x H) Wᵀ) is folded
into the saved dense weight, W H^T, so that plain transformers computes the same function with
no hook; crossblock.load unfolds it (W H^T H = W) when activation quantizers must see x H."""
from __future__ import annotations

import torch

from .common import save_folder
from .formats import FORMATS, Format


def folded_weights(model) -> dict[str, torch.Tensor]:
    """name.weight -> W Hᵀ for every layer with a run-time input transform."""
    out = {}
    for name, m in model.named_modules():
        t = getattr(m, "crossblock_input_transform", None)
        if t is not None:
            out[f"{name}.weight"] = (m.weight.double() @ t.matrix().to(m.weight.device).T).to(m.weight.dtype)
    return out


@FORMATS.register("fake")
class Fake(Format):
    online_transforms = True  # folded into the dense weights

    def accepts_grid(self, grid, model):
        pass  # dense weights: any grid

    def write(self, model, tokenizer, out_dir, act_scheme):
        folded = folded_weights(model)
        save_folder(model, tokenizer, out_dir, {**model.state_dict(), **folded} if folded else None)
