"""`bits` stage: mixed precision. Every unit of layers that must share a grid (engine/allocate.py:
one linear, fused q/k/v or gate/up, the experts of a MoE layer) gets one of the `options` (bit
widths of the recipe's grid, e.g. 2, 3, 4 or 3g64; or GGUF types, Q2_K, Q3_K, ..., where a bare
width names its k-quant), chosen by its measured cost to the model (engine/sensitivity.py) so
that the average stored bits per weight of the quantized layers is at most `bpw`. The stages
after it quantize each layer on its own grid.

    stages:
      - bits: {bpw: 3.0, options: ["2", "3", "4"], measure: fisher, pin: ["down_proj=4"]}
      - windows: {...}
    --bpw 3.0 --bits-options 2,3,4 --pin down_proj=4        # the same, as flags

Bits per weight (grids' `bits_per_weight`): the integers, one 16-bit scale per group and,
asymmetric, one `bits`-wide zero point per group, as gptq and compressed-tensors pack them; for
GGUF types, llama.cpp's size (Q3_K: 3.4375). Embeddings and the output head are not counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ..config import setting
from ..engine import allocate, sensitivity
from ..model.adapter import find_blocks
from .base import STAGES, Stage

TIES = ("fused", "none")


@STAGES.register("bits")
@dataclass
class Bits(Stage):
    """Mixed precision: each layer's grid chosen by measured sensitivity under a bits-per-weight budget."""
    needs_whole_model = True
    order = 25
    bpw: float = setting(3.0, "mixed precision: average stored bits per weight (scales and zero points counted) "
                              "of the quantized layers; each layer's grid is picked from --bits-options",
                         flat="bpw", off=None)
    options: list[str] = setting(factory=lambda: ["2", "3", "4"],
                                 help="the grids a layer may get: bit widths of the recipe's grid (2,3,4; with a group "
                                      "size: 3g64) or, on the gguf grid, GGUF types (Q2_K,Q3_K,Q4_K; a bit width "
                                      "there: its k-quant)")
    pin: list[str] = setting(factory=list, flat="pin",
                             help="layers given a fixed option, pattern=option (patterns as --skip reads them): "
                                  "down_proj=4,layers.0.*=4")
    measure: str = setting("fisher", "sensitivity: fisher (one backward pass per row), hessian (one forward pass; "
                                     "dense layers only), kl (exact: a forward pass per layer group and option) or "
                                     "gptq (fisher at each layer's output, of GPTQ's error in activation order: for "
                                     "the gptq preset; uniform grids, dense layers)",
                           choices=sensitivity.MEASURES)
    rows: int = setting(8, "calibration sequences the sensitivity is measured on (the last ones)")
    tie: str = setting("fused", "fused: q/k/v and gate/up share a grid, as vLLM runs them (compressed-tensors "
                                "needs it); none: every linear its own (fake, gguf). A MoE layer's experts always share one",
                       choices=TIES)

    def check(self):
        self.refuse(self.bpw > 0, f"bpw must be > 0, got {self.bpw}")
        self.refuse(len(self.options) >= 1 and len(set(self.options)) == len(self.options),
                    f"options must name distinct grids, got {self.options}")
        self.refuse(self.rows >= 1, f"rows must be >= 1, got {self.rows}")
        for pin in self.pin:
            pattern, eq, option = pin.partition("=")
            self.refuse(bool(eq and pattern and option), f"a pin is pattern=option (down_proj=4), got {pin!r}")

    def grids(self, grid) -> list:
        """The grid of every option and pin (refusing what `grid` cannot be)."""
        grids = [grid.option(o) for o in dict.fromkeys([*self.options, *(p.partition("=")[2] for p in self.pin)])]
        self.refuse(self.measure != "gptq" or all(hasattr(g, "gptq_rules") for g in grids),
                    f"measure gptq runs GPTQ at each option, which the {grid.kind_name} grid has not "
                    "(use measure fisher or kl)")
        return grids

    def option_grids(self, grid) -> list:
        """The grid of every option, in order: what any unpinned layer may get."""
        return [grid.option(o) for o in self.options]

    def plan(self, model, grid, skip) -> list[allocate.Unit]:
        """The units and their pins; refused before any work when even the smallest assignment
        exceeds the budget."""
        self.grids(grid)
        units = allocate.find_units(model, skip, self.tie)
        if self.measure in sensitivity.READS_INPUTS:  # refuses fused experts
            sensitivity.dense_modules(model, units, self.measure)
        allocate.apply_pins(units, self.pin, find_blocks(model)[0])
        for u in units:  # a pin's grid on its own layers (api.quantize checks the options on every layer)
            if u.pinned:
                grid.option(u.pinned).check_widths({u.name: min(w for _, w in u.shapes)})
        smallest = allocate.bits_per_weight(units, allocate.smallest(units, self.options, grid.option))
        self.refuse(smallest <= self.bpw, f"bpw {self.bpw} is below {smallest:.4f}, the smallest assignment's (every "
                                          "layer at its smallest option, pins kept): raise bpw or add a smaller option")
        return units

    def run(self, model, job):
        t0 = time.time()
        units = self.plan(model, job.grid, job.skip)
        grids = self.option_grids(job.grid)
        rows = job.ids[-min(self.rows, job.ids.shape[0]):]
        with job.blocks.whole_model(model, self, job.device):
            cost = sensitivity.costs(self.measure, model, units, grids, rows, job.device, job.precision,
                                     job.data.seed)
        picked = allocate.choose(units, self.options, job.grid.option, cost, self.bpw)
        chosen = [job.grid.option(o) for o in picked]
        job.grid = Assigned(job.grid, {(u.block, m): g for u, g in zip(units, chosen) for m in u.members})
        job.report["bits"] = self.record(units, picked, chosen, cost, job.grid.base, time.time() - t0)

    def record(self, units, picked, chosen, cost, grid, seconds: float) -> dict:
        """crossblock.json's account: every unit's option, size and sensitivity, and the uniform
        assignments' (every unit at one option, pins ignored) size and cost beside the chosen one's."""
        index = {o: j for j, o in enumerate(self.options)}

        def total(options):  # summed cost (a pin that is no option counts 0)
            return sum(float(cost[k, index[o]]) for k, o in enumerate(options) if o in index)

        uniform = {o: {"bpw": round(allocate.bits_per_weight(units, [grid.option(o)] * len(units)), 4),
                       "cost": total([o] * len(units))} for o in self.options}
        return {"bpw_asked": self.bpw, "bpw": round(allocate.bits_per_weight(units, chosen), 4),
                "measure": self.measure, "rows": self.rows, "options": list(self.options), "tie": self.tie,
                "cost": total(picked), "uniform": uniform, "seconds": round(seconds, 2),
                "units": [{"name": u.name, "layers": u.members, "option": o, "pinned": u.pinned is not None,
                           "bpw": round(u.bits(g) / u.weights, 4),
                           "sensitivity": {opt: float(cost[k, j]) for j, opt in enumerate(self.options)}}
                          for k, (u, o, g) in enumerate(zip(units, picked, chosen))]}


@dataclass
class Assigned:
    """The recipe's grid with each layer's chosen option: what the stages after `bits` quantize on
    (everything else is the recipe's grid's)."""
    base: Any
    layers: dict[tuple[int, str], Any]  # (block, local name) -> grid

    def for_layer(self, local_name: str, index: int, count: int, width: int):
        return self.layers.get((index, local_name), self.base).for_layer(local_name, index, count, width)

    def finish(self, model, skip=()) -> dict | None:
        finished = self.base.finish(model, skip)
        if finished and "types" in finished:  # gguf: each layer's type is its option's, not the mixture's
            for name in finished["types"]:
                # block layers have dotted names; "output" / "token_embd" keep the base grid's types
                qw = getattr(model.get_submodule(name), "crossblock_qweight", None) if "." in name else None
                if qw is not None:
                    finished["types"][name] = qw.kind
        return finished

    def __getattr__(self, name: str):
        if name in ("base", "layers"):
            raise AttributeError(name)
        return getattr(self.base, name)
