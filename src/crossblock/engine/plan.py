"""What a recipe will do, before it runs: its windows and their cost in block passes."""
from __future__ import annotations

from .schedule import LOSS_SAMPLES, Window, make_schedule

BACKWARD_COST = 2  # a backward pass costs about two forward passes


def window_cost(recipe, w: Window, first_new: int | None = None) -> int:
    """Forward passes of one block over one calibration sequence, backward counted as 2.
    Blocks first_new..end-1 (default: all the window trains) are wrapped in this window."""
    stage, static, observed = recipe.windows, recipe.activations.static, recipe.activations.calibrated
    depth = w.target - w.start + 1
    n = recipe.data.nsamples
    chains = sum(stage.chain_rows(static, n, observed).values())  # FP, quantized (+ RTN reference)
    cost = chains * len(w.finished)
    if stage.needs_block_input(observed):  # each new block's input, then a pass for GPTQ / imatrix / observed inputs
        per_block = stage.init_reads_inputs + observed
        cost += sum(n * (j - w.start + per_block) for j in range(w.start if first_new is None else first_new, w.end))
    if stage.trains(static):
        train = stage.train
        cost += n * depth                                      # target, once per window
        cost += train.iters * recipe.data.batch_size * depth * (1 + BACKWARD_COST)
        cost += min(n, LOSS_SAMPLES) * depth                   # loss before training
        if not w.finishes_through_target:
            cost += min(n, LOSS_SAMPLES) * depth               # loss after (else: read off the advanced chain)
        if train.target == "propagated" and w.target in w.finished:
            cost -= n                                          # the target is the FP chain's next value
    return cost


def window_costs(recipe, num_blocks: int) -> list[tuple[Window, int]]:
    """Every window of the schedule with its cost in block passes."""
    stage = recipe.windows
    costs, wrapped = [], 0
    for w in make_schedule(num_blocks, stage.window, stage.stride, stage.lookahead):
        costs.append((w, window_cost(recipe, w, max(w.start, wrapped))))
        wrapped = max(wrapped, w.end)
    return costs


def schedule_cost(recipe, num_blocks: int) -> int:
    """Block passes of the whole schedule on a model of `num_blocks` blocks."""
    return sum(cost for _, cost in window_costs(recipe, num_blocks))


def plan_table(recipe, num_blocks: int) -> str:
    windows = window_costs(recipe, num_blocks)
    rows = [f"recipe {recipe.name}: {recipe.summary()}",
            f"{'window':>6}  {'trains':>9}  {'loss after':>10}  {'finishes':>9}  {'block passes':>12}"]
    total = 0
    for i, (w, cost) in enumerate(windows):
        total += cost
        rows.append(f"{i:>6}  {f'{w.start}-{w.end - 1}':>9}  {w.target:>10}  "
                    f"{f'{w.start}-{w.next_start - 1}':>9}  {cost:>12,}")
    rows.append(f"{len(windows)} windows, {total:,} block passes "
                f"({total / max(1, recipe.data.nsamples * num_blocks):.1f}x one forward of the model over the calibration set)")
    return "\n".join(rows)
