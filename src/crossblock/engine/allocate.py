"""Mixed precision's bookkeeping: the units that get one grid, their stored size, and the choice of
one option per unit under a bits-per-weight budget.

A unit is what must share a grid: one linear layer, or, with `tie="fused"`, the layers a serving
engine runs as one matmul (q/k/v, gate/up: vLLM's fused modules, grids/nvfp4.py's FUSED), and
always every expert of one MoE layer (vLLM and llama.cpp store a layer's experts as one tensor of
one type). The choice minimizes the sum of the units' measured costs (engine/sensitivity.py) with
sum(size) <= budget: a multiple-choice knapsack, solved by dynamic programming over the budget cut
into `STEPS` slices, each option's size rounded up (so the answer never exceeds the budget); the
uniform assignments and the smallest one are candidates too, so the answer's cost is never above
that of any uniform assignment that fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CrossblockError
from ..grids.nvfp4 import FUSED
from ..model.adapter import block_experts, block_linears, find_blocks, is_skipped, skip_matches
from ..quant.experts import expert_params
from ..quant.linear import weight_of

STEPS = 1 << 16  # slices of the budget in the dynamic program: each size is rounded up by under 1/STEPS of it


@dataclass
class Unit:
    """Layers of block `block` that share one grid: local names and each one's (rows, width)."""
    block: int
    name: str                      # its name in reports: the layer's full name, or the fused ones joined
    members: list[str]
    shapes: list[tuple[int, int]]
    pinned: str | None = None      # the option a --pin gives it

    @property
    def weights(self) -> int:
        return sum(r * w for r, w in self.shapes)

    def bits(self, grid) -> float:
        """Stored bits of the unit on `grid` (scales and zero points counted)."""
        return sum(r * w * grid.bits_per_weight(w) for r, w in self.shapes)


def unit_key(local: str, experts: bool, tie: str) -> str:
    """The local name of the unit a layer belongs to."""
    parts = local.split(".")
    if "experts" in parts[:-1] or experts:  # per-expert linears or a fused experts module: one per MoE layer
        return ".".join(parts[:parts.index("experts") + 1]) if "experts" in parts else local
    parent, _, leaf = local.rpartition(".")
    family = next((f for f in FUSED if leaf in f), None) if tie == "fused" else None
    return f"{parent}.{'+'.join(family)}".lstrip(".") if family else local


def shapes_of(module: nn.Module, experts: bool) -> list[tuple[int, int]]:
    if experts:  # (E, out, in) parameters, quantized as (E * out, in)
        return [(p.shape[0] * p.shape[1], p.shape[2]) for p in expert_params(module).values()]
    return [tuple(weight_of(module).shape)]


def find_units(model: nn.Module, skip=(), tie: str = "fused") -> list[Unit]:
    """Every unit of the model's quantized layers, block by block, in the order of the layers."""
    prefix, blocks = find_blocks(model)
    units: list[Unit] = []
    for i, block in enumerate(blocks):
        found: dict[str, Unit] = {}
        layers = [(n, m, False) for n, m in block_linears(block)] + [(n, m, True) for n, m in block_experts(block)]
        for local, module, experts in layers:
            if is_skipped(skip, prefix, i, local):
                continue
            key = unit_key(local, experts, tie)
            unit = found.setdefault(key, Unit(i, f"{prefix}.{i}.{key}", [], []))
            unit.members.append(local)
            unit.shapes.extend(shapes_of(module, experts))
        units.extend(found.values())
    return units


def apply_pins(units: list[Unit], pins: list[str], prefix: str):
    """Pin the units a `pattern=option` names (patterns as --skip reads them); a pattern that names
    no layer, or one unit pinned to two options, is refused."""
    for pin in pins:
        pattern, _, option = pin.partition("=")
        hit = [u for u in units if any(skip_matches(pattern, f"{prefix}.{u.block}.{m}", m) for m in u.members)]
        if not hit:
            raise CrossblockError(f"pin {pin!r} matches no quantized layer (patterns as --skip reads them)")
        for u in hit:
            if u.pinned not in (None, option):
                raise CrossblockError(f"pins give {u.name} two options, {u.pinned} and {option} (its layers "
                                      f"{', '.join(u.members)} share one grid)")
            u.pinned = option


def bits_per_weight(units: list[Unit], grids: list) -> float:
    """The average stored bits per weight of `units` with unit k on `grids[k]`."""
    return sum(u.bits(g) for u, g in zip(units, grids)) / sum(u.weights for u in units)


def smallest(units: list[Unit], options: list[str], grid_of) -> list:
    """Each unit's grid of fewest stored bits (pinned units: their pin's)."""
    return [grid_of(u.pinned) if u.pinned else min(map(grid_of, options), key=u.bits) for u in units]


def choose(units: list[Unit], options: list[str], grid_of, cost: torch.Tensor, bpw: float) -> list[str]:
    """One option per unit (pinned units: their pin) with average bits per weight <= `bpw`, of least
    total `cost` ((units, options), additive over units). `grid_of(option)` is the option's grid;
    the budget must hold the smallest assignment (Bits.plan refuses it otherwise)."""
    budget = bpw * sum(u.weights for u in units)
    choices = [[u.pinned] if u.pinned else options for u in units]
    sizes = [[u.bits(grid_of(o)) for o in c] for u, c in zip(units, choices)]
    costs = [[0.0] if u.pinned else cost[k].tolist() for k, u in enumerate(units)]
    candidates = [[min(range(len(s)), key=s.__getitem__) for s in sizes]]  # the smallest: fits if anything does
    candidates += [[c.index(o) if o in c else 0 for c in choices] for o in options]  # uniform, pins kept
    candidates.append(knapsack(sizes, costs, budget))
    fits = [p for p in candidates if p is not None and sum(s[j] for s, j in zip(sizes, p)) <= budget]
    best = min(fits, key=lambda p: sum(c[j] for c, j in zip(costs, p)))
    return [c[j] for c, j in zip(choices, best)]


def knapsack(sizes: list[list[float]], costs: list[list[float]], budget: float) -> list[int] | None:
    """Index of the chosen option per item: least total cost with total size <= budget (sizes
    rounded up to 1/STEPS of the budget); None if nothing fits so rounded."""
    unit = budget / STEPS
    inf = float("inf")
    best = torch.zeros(STEPS + 1, dtype=torch.float64)  # least cost of the items so far in <= c slices
    picks = []
    for size, cost in zip(sizes, costs):
        new = torch.full_like(best, inf)
        arg = torch.zeros(STEPS + 1, dtype=torch.int16)
        for j, (s, c) in enumerate(zip(size, cost)):
            k = int(-(-s // unit))  # slices, rounded up
            if k > STEPS:
                continue
            cand = torch.full_like(best, inf)
            cand[k:] = best[:STEPS + 1 - k] + c
            better = cand < new
            new, arg = torch.where(better, cand, new), torch.where(better, torch.tensor(j, dtype=torch.int16), arg)
        best = new
        picks.append(arg)
    c = int(torch.argmin(best))
    if best[c] == inf:
        return None
    chosen = []
    for size, arg in zip(reversed(sizes), reversed(picks)):
        j = int(arg[c])
        chosen.append(j)
        c -= int(-(-size[j] // unit))
    return chosen[::-1]
