"""What a recipe will do, before it runs: its windows and their cost in block passes."""
from __future__ import annotations

from ..recipe import Recipe
from .reconstruct import LOSS_SAMPLES
from .schedule import Window, make_schedule

BACKWARD_COST = 2  # a backward pass costs about two forward passes


def window_cost(recipe: Recipe, w: Window) -> int:
    """Forward passes of one block over one calibration sequence, backward counted as 2."""
    depth = w.target - w.start + 1
    n = recipe.nsamples
    chains = 2 * n + (min(n, LOSS_SAMPLES) if recipe.rtn_reference else 0)  # FP, quantized (+ RTN reference)
    cost = chains * len(w.finished)
    if recipe.trains:
        cost += n * depth                                      # target, once per window
        cost += 2 * min(n, LOSS_SAMPLES) * depth               # loss before and after
        cost += recipe.iters * recipe.batch_size * depth * (1 + BACKWARD_COST)
        if recipe.target == "propagated" and w.target in w.finished:
            cost -= n                                          # the target is the FP chain's next value
    return cost


def schedule_cost(recipe: Recipe, num_blocks: int) -> int:
    """Block passes of the whole schedule on a model of `num_blocks` blocks."""
    return sum(window_cost(recipe, w) for w in make_schedule(num_blocks, recipe.window, recipe.stride, recipe.lookahead))


def plan_table(recipe: Recipe, num_blocks: int) -> str:
    windows = make_schedule(num_blocks, recipe.window, recipe.stride, recipe.lookahead)
    rows = [f"recipe {recipe.name}: W{recipe.wbits} g{recipe.group_size} {'sym' if recipe.sym else 'asym'}, "
            f"window {recipe.window} stride {recipe.stride} lookahead {recipe.lookahead}, "
            f"{recipe.iters} steps x batch {recipe.batch_size}, target {recipe.target}, loss {recipe.loss}",
            f"{'window':>6}  {'trains':>9}  {'loss after':>10}  {'finishes':>9}  {'block passes':>12}"]
    total = 0
    for i, w in enumerate(windows):
        cost = window_cost(recipe, w)
        total += cost
        rows.append(f"{i:>6}  {f'{w.start}-{w.end - 1}':>9}  {w.target:>10}  "
                    f"{f'{w.start}-{w.next_start - 1}':>9}  {cost:>12,}")
    rows.append(f"{len(windows)} windows, {total:,} block passes "
                f"({total / max(1, recipe.nsamples * num_blocks):.1f}x one forward of the model over the calibration set)")
    return "\n".join(rows)
