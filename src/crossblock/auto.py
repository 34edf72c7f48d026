"""`--recipe auto`: measure the window schedules on a prefix of the model, then run the best one.

Look-ahead and joint windows help some models and not others (LA/MB-PTQ: Llama-2-7B yes,
Mistral-7B and OPT no; SmolLM2: `block` wins), so instead of asking the user to run full
experiments, `auto` runs each candidate shape (block, la, mb, cbq; every one with the same
training settings, `best`'s unless overridden) on the first k blocks of the model, ranks them by
the last block's output error against FP (what `crossblock compare` prints) and quantizes the
whole model with the winner.

Budget: the candidates' planned cost (engine/plan.py, block passes) is at most `budget` times
the planned cost of the full run of the first candidate (`block`, the default schedule). The
prefix k is the deepest that fits with the full settings; when not even 2 blocks fit (a deep
model: 4 candidates on 2 of 30 blocks cost 32% of a full run), the comparison runs with 1/2,
1/3, ... 1/8 of the steps and calibration sequences instead (SmolLM2, 30 blocks, budget 0.15:
2 blocks at 20 steps x 2 on 42 sequences, 12.6% of the full run's block passes).

Reuse: when the comparison ran with the full settings and no stage runs before the windows, the
winner's first windows on the prefix are exactly its first windows on the whole model (same
blocks, inputs, seeds), so the full run continues from their state (the engine's resume path,
as after a checkpoint) instead of repeating them; its output equals a run of the winner alone.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass

from torch import nn

from .engine.checkpoint import EngineState
from .engine.plan import schedule_cost, window_costs
from .engine.schedule import make_schedule
from .errors import CrossblockError
from .model.adapter import find_blocks
from .recipe import PRESETS, Recipe

# the candidate window shapes; `+kl`: CBQ's KL term added to the loss
SHAPES: dict[str, dict] = {
    "block": dict(window=1, stride=1, lookahead=0),
    "la": dict(window=1, stride=1, lookahead=1),
    "mb": dict(window=2, stride=2, lookahead=0),
    "cbq": dict(window=2, stride=1, lookahead=0, target="homologous", loss="+kl"),
}
SHAPE_FLAT = ("window", "stride", "lookahead", "target")  # what auto chooses: not flags with --recipe auto
FIDELITIES = (1, 2, 3, 4, 6, 8)  # steps and calibration sequences divided by this, when the full ones do not fit
MIN_PREFIX = 2             # on one block every shape but cbq's target is the same schedule
DEFAULT_BUDGET = 0.15


@dataclass
class AutoRecipe(Recipe):
    """A recipe whose windows stage is chosen at run time among SHAPES; its own windows stage is
    the first candidate's (block) with the training settings every candidate shares."""
    label = "recipe"  # in error messages
    name: str = "auto"
    budget: float = DEFAULT_BUDGET  # the comparison's planned cost / the full run's

    @classmethod
    def build(cls, budget: float = DEFAULT_BUDGET, **flat) -> "AutoRecipe":
        """`best`'s training settings with flat overrides (anything but the window shape)."""
        fixed = sorted(set(flat) & set(SHAPE_FLAT))
        if fixed:
            raise CrossblockError(f"--recipe auto chooses {', '.join(fixed)} itself (drop the flag, or name a recipe)")
        base = Recipe.flat(**{**PRESETS["best"], **flat, "name": "auto"})
        if base.windows.train is None:
            raise CrossblockError("--recipe auto compares trained schedules: iters must be >= 1 and something must "
                                  "learn (a rounding or lwc)")
        auto = cls(**{f.name: getattr(base, f.name) for f in dataclasses.fields(Recipe)}, budget=budget)
        return auto.validated()

    def check(self):
        super().check()
        self.refuse(self.budget > 0, f"--auto-budget must be > 0 (a fraction of the full run's cost), got {self.budget}")
        self.refuse(self.windows.train is not None, "auto compares trained schedules (windows.train is missing)")

    def to_dict(self) -> dict:
        return {**super().to_dict(), "auto_budget": self.budget}

    def candidates(self) -> list[Recipe]:
        loss = self.windows.train.loss
        out = []
        for name, shape in SHAPES.items():
            shape = dict(shape)
            if shape.get("loss") == "+kl":
                shape["loss"] = loss if loss.endswith("+kl") else loss + "+kl"
            out.append(dataclasses.replace(self.with_flat(name=name, **shape), chosen_by=None))
        return out

    def plan_text(self, num_blocks: int) -> str:
        """What `choose` will measure on a model of `num_blocks` blocks (nothing runs)."""
        candidates = self.candidates()
        full = schedule_cost(candidates[0], num_blocks)
        blocks, f, measured, cost = measurement_plan(candidates, num_blocks, self.budget, full)
        return (f"auto: {', '.join(c.name for c in candidates)} on the first {blocks} blocks, "
                f"{measured[0].windows.train.iters} steps on {measured[0].data.nsamples} sequences: {cost:,} block "
                f"passes = {cost / full:.1%} of the full run (budget {self.budget:.0%}); the full run of "
                f"{candidates[0].name}:")

    # -- the choice ----------------------------------------------------------------------------
    def choose(self, quantize, model, tokenizer, ids, device=None, progress: bool = True):
        """(chosen recipe, engine state to continue from or None, report section); `quantize` is
        api.quantize (passed in: the API calls this module, not the other way round)."""
        num_blocks = len(find_blocks(model)[1])
        if num_blocks <= MIN_PREFIX:
            raise CrossblockError(f"--recipe auto needs a model of more than {MIN_PREFIX} blocks to compare schedules "
                                  f"on a prefix; this one has {num_blocks} (name a recipe)")
        candidates = self.candidates()
        full = schedule_cost(candidates[0], num_blocks)
        blocks, fidelity, measured, cost = measurement_plan(candidates, num_blocks, self.budget, full)
        reusable = fidelity == 1 and self.stages[0].quantizes  # nothing (rotate, cfp) runs before the windows
        rows, states, t_all = [], {}, time.time()
        for cand, meas in zip(candidates, measured):
            keep = common_windows(cand, blocks, num_blocks) if reusable else 0

            def on_window(state, name=cand.name, keep=keep):
                if state.next_window == keep:
                    states[name] = snapshot(state)

            t0 = time.time()
            rows_used = ids if fidelity == 1 else ids[:meas.data.nsamples]  # the full run's very sequences, or fewer
            report = run_prefix(quantize, model, tokenizer, meas, rows_used, blocks, device, progress, on_window)
            last = report["blocks"][-1]
            rows.append({"recipe": cand.name, **{k: v for k, v in cand.to_flat().items() if k in SHAPE_FLAT + ("loss",)},
                         "rel_mse": last["rel_mse"], "token_rel_mse": last["token_rel_mse"],
                         "blocks": blocks, "block_passes": schedule_cost(meas, blocks), "seconds": round(time.time() - t0, 1),
                         "reusable_windows": keep})
        best = min(rows, key=lambda r: r["rel_mse"])  # ties: the earlier (cheaper, default-first) shape
        chosen = candidates[[r["recipe"] for r in rows].index(best["recipe"])]
        state = states.get(chosen.name)
        reused = best["reusable_windows"] if state is not None else 0
        schedule = make_schedule(num_blocks, *(getattr(chosen.windows, a) for a in ("window", "stride", "lookahead")))
        replayed = sum(len(w.finished) for w in schedule[:reused])
        n = chosen.data.nsamples
        info = {
            "budget": self.budget, "full_block_passes": full, "prefix_blocks": blocks,
            "fidelity": {"divisor": fidelity, "nsamples": measured[0].data.nsamples,
                         "iters": measured[0].windows.train.iters},
            "compare_block_passes": cost, "compare_seconds": round(time.time() - t_all, 1),
            "candidates": rows, "chosen": chosen.name, "metric": "last prefix block's rel_mse against FP",
            "reused_windows": reused,
            "reused_block_passes": sum(c for _, c in window_costs(chosen, num_blocks)[:reused]),
            "replay_block_passes": replayed * sum(chosen.windows.chain_rows(chosen.activations.static, n,
                                                                         chosen.activations.calibrated).values()),
            "reuse": ("the chosen schedule's first windows continue from the comparison" if reused else
                      "none: " + ("the comparison ran with fewer steps and sequences than the full run" if fidelity > 1
                                  else "a stage runs before the windows" if not reusable
                                  else "the chosen schedule's first window differs on the prefix")),
        }
        chosen = dataclasses.replace(chosen, chosen_by={"auto": True, "chosen": chosen.name})
        return chosen, state, info


def measurement_plan(candidates: list[Recipe], num_blocks: int, budget: float, full: int):
    """(prefix blocks, fidelity divisor, the recipes as measured, their planned cost): the full
    settings on the deepest prefix that fits `budget` times `full` block passes (the full run's),
    else fewer steps and sequences."""
    allowed, cheapest = budget * full, None
    for f in FIDELITIES:
        measured = [c if f == 1 else reduced(c, f) for c in candidates]
        for k in range(num_blocks - 1, MIN_PREFIX - 1, -1):
            cost = sum(schedule_cost(m, k) for m in measured)
            if cost <= allowed:
                return k, f, measured, cost
            cheapest = cost
    enough = math.ceil(cheapest / full * 100 + 1e-9) / 100  # rounded up: the budget named must fit
    raise CrossblockError(f"--auto-budget {budget:g} is too small for this model: the cheapest comparison ({MIN_PREFIX} "
                          f"blocks, 1/{FIDELITIES[-1]} of the steps and sequences) costs {cheapest:,} block passes, "
                          f"{cheapest / allowed:.1f}x the budget: --auto-budget {enough:g} runs it (or name a recipe)")


def reduced(recipe: Recipe, f: int) -> Recipe:
    d, t = recipe.data, recipe.windows.train
    n = max(d.batch_size, d.nsamples // f)
    return recipe.with_flat(nsamples=n, iters=max(1, t.iters // f))


def common_windows(recipe: Recipe, prefix: int, num_blocks: int) -> int:
    """How many leading windows the schedule has alike on `prefix` blocks and on the whole model."""
    shape = [getattr(recipe.windows, a) for a in ("window", "stride", "lookahead")]
    n = 0
    for a, b in zip(make_schedule(prefix, *shape), make_schedule(num_blocks, *shape)):
        if a != b:
            break
        n += 1
    return n


def snapshot(state: EngineState) -> EngineState:
    """A copy the later windows cannot change (the engine keeps training live layers in place)."""
    layers = {k: {n: t.detach().clone() for n, t in v.items()} for k, v in state.layers.items()}
    return EngineState(state.next_window, layers, json.loads(json.dumps(state.report)))


@contextlib.contextmanager
def first_blocks(model, k: int):
    """The model seen with its first k blocks only (restored on exit)."""
    prefix, layers = find_blocks(model)
    parent, _, attr = prefix.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    keys = [key for key in ("num_hidden_layers", "n_layer") if hasattr(model.config, key)]
    saved = {key: getattr(model.config, key) for key in keys}
    setattr(owner, attr, nn.ModuleList(layers[:k]))
    for key in keys:
        setattr(model.config, key, k)
    try:
        yield model
    finally:
        setattr(owner, attr, layers)
        for key, value in saved.items():
            setattr(model.config, key, value)


def run_prefix(quantize, model, tokenizer, recipe: Recipe, ids, blocks: int, device, progress: bool,
               on_window) -> dict:
    """Quantize a copy of the model's first `blocks` blocks with `recipe`'s stages up to the windows."""
    with first_blocks(model, blocks):
        prefix = copy.deepcopy(model)
    prefix.crossblock_prefix = True  # its skip patterns were checked on the whole model (api.for_format)
    stages = [s for s in recipe.stages if s.kind_name != "finetune"]
    _, report = quantize(prefix, tokenizer, dataclasses.replace(recipe, stages=stages), ids, device=device,
                         progress=progress, on_window=on_window)
    return report

