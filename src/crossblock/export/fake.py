"""The `fake` format: dense fake-quantized weights in a plain transformers folder. Anything goes;
activation quantizers are recorded in crossblock.json (api.write_folder), not here.

A run-time input rotation (the rotate stage's Hadamard before down_proj: y = (x H) Wᵀ) is folded
into the saved dense weight, W H^T, so that plain transformers computes the same function with
no hook. When activation quantizers must see x H, crossblock.load needs W itself: W Hᵀ H in floating
point is W only to about an ulp, and per-token 8-bit rounding of the activations turns such ulps into
flipped integers at ties (seen: 20-78% of a reload's logits off by > 2e-3 for 3 of 6 rotation seeds), so
those layers' W is also written, exactly, to UNFOLDED_FILE beside the model."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .common import save_folder
from .formats import FORMATS, Format, Written


UNFOLDED_FILE = "crossblock_unfolded.safetensors"


def folded_weights(modules) -> dict[str, torch.Tensor]:
    """name.weight -> W Hᵀ for every layer with a run-time input transform among `modules`
    ((full name, module) pairs)."""
    out = {}
    for name, m in modules:
        t = getattr(m, "crossblock_input_transform", None)
        if t is not None:
            out[f"{name}.weight"] = (m.weight.double() @ t.matrix().to(m.weight.device).T).to(m.weight.dtype)
    return out


@FORMATS.register("fake")
class Fake(Format):
    online_transforms = True  # folded into the dense weights
    loading = """Dense weights on the quantized grid (fake quantization): any tool that reads a transformers
model runs it.

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{out}")
# with crossblock's activation quantizers and run-time rotations attached, as evaluated:
import crossblock
model = crossblock.load("{out}")
```"""  # the model card's "Loading" section

    def accepts_grid(self, grid, model):
        pass  # dense weights: any grid

    def tensors(self, model, modules, state, dtype, act_scheme):
        """The dense state, each run-time input rotation folded into its layer's weight."""
        return Written({**state, **folded_weights(modules)}, {}, {})

    def write(self, model, tokenizer, out_dir, act_scheme, grid=None):
        written = self.written(model, act_scheme)
        save_folder(model, tokenizer, out_dir, written.state())
        rotated = [f"{n}.weight" for n, m in model.named_modules() if getattr(m, "crossblock_input_transform", None)]
        if rotated and act_scheme:  # W itself, exactly, beside W Hᵀ (module docstring)
            state = model.state_dict()
            save_file({name: state[name].contiguous() for name in rotated}, str(Path(out_dir) / UNFOLDED_FILE))
