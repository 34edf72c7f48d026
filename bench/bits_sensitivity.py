#!/usr/bin/env python3
"""Which sensitivity measure predicts the model's output (issue 30): on SmolLM2, every unit of layers
(q/k/v, o, gate/up, down of each block) rounded to nearest alone at every option, scored by the
exact KL of the final logits from FP and by the two proxies (fisher, hessian); the rank correlation
of each proxy with the exact measure, over all (unit, option) pairs and over the gains of one more
bit (what the allocation trades), and each measure's wall time.

    python bench/bits_sensitivity.py --name bits_sensitivity_smollm2 --options 2,3,4 --group-size 64 --rows 4

With `--errors gptq` every unit's error is GPTQ's (activation order, on the rows' own Hessian) in
place of round to nearest, in the exact measure too; the proxies are then `gptq` (the library's:
1/2 E[(g . e x)^2]) and its diagonal form 1/4 sum_i E[g_i^2] e_i H e_i^T (before session 17), with
`fisher` (round-to-nearest errors) beside them.

Writes bench/results/NAME.json (the tables) and NAME.md.
"""
import argparse
import contextlib
import json
import subprocess
import time

import torch

import crossblock as cb
from crossblock.api import calibration_ids
from crossblock.engine import allocate, sensitivity
from crossblock.precision import resolve
from crossblock.recipe import Data

from common import ROOT
from run import prepare_model


def correlations(table: torch.Tensor, reference: torch.Tensor, options: list[str]) -> dict:
    """Spearman of a (units, options) table with a reference one: over all costs, over the gains of
    one more bit (what the allocation trades) and over the units at each option."""
    gains = lambda t: t[:, :-1] - t[:, 1:]  # noqa: E731  what one more bit buys each unit
    return {"costs": round(sensitivity.rank_correlation(table, reference), 4),
            "gains": round(sensitivity.rank_correlation(gains(table), gains(reference)), 4),
            **{f"units at {o}": round(sensitivity.rank_correlation(table[:, j], reference[:, j]), 4)
               for j, o in enumerate(options)}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M built by prepare.py")
    p.add_argument("--options", default="2,3,4")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=4, help="calibration sequences each measure runs on")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--precision", default="auto")
    p.add_argument("--errors", choices=("rtn", "gptq"), default="rtn", help="each unit's error: round to nearest or GPTQ's")
    args = p.parse_args()
    torch.manual_seed(0)
    model_dir = args.model or prepare_model()
    model, tokenizer = cb.load_model(model_dir)
    model.eval().requires_grad_(False)
    ids = calibration_ids(tokenizer, None, Data(nsamples=args.rows, seqlen=args.seqlen, batch_size=1))  # built-in set
    grid = cb.Recipe.preset("rtn", group_size=args.group_size).grid
    options = args.options.split(",")
    grids = [grid.option(o) for o in options]
    units = allocate.find_units(model)
    precision = resolve(args.precision, "cpu")[0]
    tables, seconds = {}, {}
    proxies = ("hessian", "fisher") if args.errors == "rtn" else ("fisher", "gptq", "gptq-diag")
    for measure in (*proxies, "kl"):
        t0 = time.time()
        if measure == "gptq-diag":
            tables[measure] = gptq_diagonal_costs(model, units, grids, ids, precision)
        elif measure == "kl" and args.errors == "gptq":
            with gptq_errors(model, units, grids, ids, precision):
                tables[measure] = sensitivity.costs(measure, model, units, grids, ids, "cpu", precision)
        else:
            tables[measure] = sensitivity.costs(measure, model, units, grids, ids, "cpu", precision)
        seconds[measure] = round(time.time() - t0, 1)
        print(measure, seconds[measure], "s", flush=True)
    exact = tables["kl"]
    corr = {m: correlations(tables[m], exact, options) for m in proxies}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = ROOT / "bench" / "results" / args.name
    record = {"model": model_dir, "errors": args.errors, "options": options, "group_size": args.group_size, "rows": args.rows,
              "seqlen": args.seqlen, "precision": precision, "commit": commit, "seconds": seconds,
              "correlation": corr, "units": [u.name for u in units],
              "tables": {m: t.tolist() for m, t in tables.items()}}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    cols = list(corr["fisher"])
    lines = [f"# {args.name}", "",
             f"SmolLM2-135M-Instruct, units of layers that share a grid (q/k/v, o, gate/up, down; {len(units)} in all), "
             f"each {'rounded to nearest' if args.errors == 'rtn' else 'quantized by GPTQ'} alone at W{'/'.join(options)} "
             f"g{args.group_size} asym; measured on {args.rows} x "
             f"{args.seqlen} tokens of the built-in calibration set, {precision}, one thread. Spearman rank correlation of "
             "each proxy with the exact measure (mean KL(FP || Q) of the final logits):", "",
             "| measure | " + " | ".join(cols) + " | wall s |", "|---|" + "---|" * (len(cols) + 1)]
    for m in proxies:
        lines.append(f"| {m} | " + " | ".join(f"{corr[m][c]:.3f}" for c in cols) + f" | {seconds[m]} |")
    lines += ["| kl (exact) | " + " | ".join("1" for _ in cols) + f" | {seconds['kl']} |", "",
              f"Command (commit {commit}): `python bench/bits_sensitivity.py --name {args.name} --options {args.options} "
              f"--group-size {args.group_size} --rows {args.rows} --seqlen {args.seqlen} --errors {args.errors}`", "",
              "costs: all (unit, option) pairs; gains: cost(b) - cost(b+1) of every unit, what the allocation trades; "
              "units at b: the units ranked at one option. Tables: the .json beside this file."]
    notes = out.with_name(out.name + ".notes.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


@contextlib.contextmanager
def gptq_errors(model, units, grids, ids, precision):
    """sensitivity.error gives GPTQ's errors instead of round to nearest's (the exact measure on them)."""
    errors = sensitivity.gptq_errors(model, units, grids, ids, "cpu", precision)
    index = {(id(u), id(g)): (k, j) for k, u in enumerate(units) for j, g in enumerate(grids)}
    plain = sensitivity.error
    sensitivity.error = lambda model, unit, grid, count: [e for _, e in errors[index[id(unit), id(grid)]]]
    try:
        yield
    finally:
        sensitivity.error = plain


def gptq_diagonal_costs(model, units, grids, ids, precision) -> torch.Tensor:
    """The gptq measure's diagonal form (before session 17): 1/2 sum_i E[g_i^2] E[(e x)_i^2] per
    matrix (= 1/4 sum_i E[g_i^2] e_i H e_i^T), each output channel on its own."""
    errors = sensitivity.gptq_errors(model, units, grids, ids, "cpu", precision)
    modules = sensitivity.dense_modules(model, units, "gptq")
    tokens, grad_sq = 0, {id(m): 0 for m in modules}
    err_sq = {key: [0 for _ in pairs] for key, pairs in errors.items()}
    for inputs, grads, n in sensitivity.output_gradients(model, modules, ids, "cpu", precision, seed=0):
        with torch.no_grad():
            for key, g in grads.items():
                grad_sq[key] = grad_sq[key] + (g.float() ** 2).reshape(-1, g.shape[-1]).sum(0)
            for key, pairs in errors.items():
                for i, (module, e) in enumerate(pairs):
                    x = inputs[id(module)].float()
                    err_sq[key][i] = err_sq[key][i] + ((x @ e.t()) ** 2).reshape(-1, e.shape[0]).sum(0)
        tokens += n
    out = torch.zeros(len(units), len(grids), dtype=torch.float64)
    for (k, j), pairs in errors.items():
        for i, (module, _) in enumerate(pairs):
            out[k, j] += 0.5 * float(grad_sq[id(module)] @ err_sq[k, j][i]) / tokens / (tokens + len(ids))
    return out


if __name__ == "__main__":
    main()
