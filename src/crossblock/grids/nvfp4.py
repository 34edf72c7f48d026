"""The nvfp4 grid: NVIDIA's FP4, as llm-compressor / compressed-tensors / vLLM store it.

    grid: {type: nvfp4}

E2M1 values, one FP8 E4M3 scale per 16 input columns and one FP32 global scale per tensor:
Ŵ = v * (scale / global), global = 448 * 6 / amax|W| (quant/fp4.py; grids/fp4.py: what runs on it).
vLLM runs q/k/v and gate/up as one matmul with one global scale (it keeps the largest of the
shards'), so those layers share one, from their joint amax, as llm-compressor's
`update_fused_layer_weight_global_scales` does (`for_block`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import setting
from .base import GRIDS
from ..quant import fp4
from .fp4 import Fp4Grid

# layers vLLM fuses into one matmul (its packed_modules_mapping), by local name under one parent
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"))


@GRIDS.register("nvfp4")
@dataclass
class Nvfp4Grid(Fp4Grid):
    # fixed by the format, so not flags (flat=False): --grid nvfp4 is the whole flat spelling
    group_size: int = setting(16, "values per scale (the format's)", flat=False)
    sym: bool = setting(True, "symmetric (the format is)", flat=False)

    def for_block(self, weights: dict[str, torch.Tensor]) -> dict[str, "Nvfp4Grid"]:
        """The grid of each named linear of one block (name -> (out, in) weight): layers that vLLM
        fuses share the global scale of their joint amax; the others keep their own."""
        grids = {}
        for name, w in weights.items():
            parent, _, leaf = name.rpartition(".")
            family = next((f for f in FUSED if leaf in f), (leaf,))
            members = [weights[m] for m in (f"{parent}.{x}" if parent else x for x in family) if m in weights]
            grid = Nvfp4Grid(self.group_size, self.sym)
            grid.fixed_global = float(fp4.global_scale(torch.stack([m.detach().abs().amax() for m in members])))
            grids[name] = grid
        return grids
