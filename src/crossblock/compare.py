"""Compare recipes cheaply before a full run: each one quantizes the same model (optionally cut to
its first N blocks) on the same calibration tokens, and the table ranks them by the output error
of the last block against the FP model, with the work each one cost.

Look-ahead and multi-block windows help some models and not others; on a prefix of the model
and a small calibration set the comparison costs a fraction of one full run. The last block's
relative MSE follows perplexity closely on full models (see bench/results); on a prefix it is a
proxy, to be confirmed with one full run of the winner.
"""
from __future__ import annotations

import time

from torch import nn

from .errors import CrossblockError
from .engine.plan import schedule_cost
from .model.adapter import find_blocks, refuse_unmatched_skip
from .recipe import Recipe


def keep_first_blocks(model, blocks: int):
    """Cut `model` to its first `blocks` decoder blocks, in place (the head stays); marked as a
    prefix, whose skip patterns were checked on the whole model (api.for_format)."""
    prefix, layers = find_blocks(model)
    if not 1 <= blocks <= len(layers):
        raise CrossblockError(f"--blocks must be in 1..{len(layers)} for this model, got {blocks}")
    parent, _, attr = prefix.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.ModuleList(layers[:blocks]))
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(model.config, key):
            setattr(model.config, key, blocks)
    model.crossblock_prefix = True
    return model


def compare(model_name: str, recipes: list[Recipe], calib, blocks: int | None = None, device: str | None = None,
            progress: bool = True, trust_remote_code: bool = False) -> list[dict]:
    """One row per recipe: last-block relative MSE against FP, block passes, seconds."""
    from .api import load_model, quantize
    rows = []
    for recipe in recipes:
        model, tokenizer = load_model(model_name, trust_remote_code=trust_remote_code)
        refuse_unmatched_skip(model, recipe.skip)
        if blocks is not None:
            keep_first_blocks(model, blocks)
        n = len(find_blocks(model)[1])
        t0 = time.time()
        _, report = quantize(model, tokenizer, recipe, calib, device=device, progress=progress)
        last = report["blocks"][-1]
        rows.append({"recipe": recipe.name, "blocks": n, "rel_mse": last["rel_mse"],
                     "token_rel_mse": last["token_rel_mse"],
                     "block_passes": schedule_cost(recipe, n),
                     "seconds": round(time.time() - t0, 1)})
    return rows


def compare_table(rows: list[dict]) -> str:
    best = min(r["rel_mse"] for r in rows)
    lines = [f"{'recipe':<16} {'last-block rel MSE':>18} {'x best':>7} {'per-token':>10} {'block passes':>13} "
             f"{'seconds':>8}"]
    for r in sorted(rows, key=lambda r: r["rel_mse"]):
        lines.append(f"{r['recipe']:<16} {r['rel_mse']:>18.4g} {r['rel_mse'] / best:>7.2f} {r['token_rel_mse']:>10.4g} "
                     f"{r['block_passes']:>13,} {r['seconds']:>8.1f}")
    return "\n".join(lines + [f"quantized blocks: {rows[0]['blocks']}; per-token: the mean over tokens of each "
                              "token's relative error (a massive first token can own most of the rel MSE)"])
