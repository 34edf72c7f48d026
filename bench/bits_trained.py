#!/usr/bin/env python3
"""What trained rounding leaves per unit and option (issue 30): the measures cost each option by
its round-to-nearest (fisher) or GPTQ (gptq) error, but the default recipe trains its rounding
(SignRound + LWC per window, then an end-to-end finetune). This script takes the uniform models
the default recipe made at each option (bench/run.py rows, fake format) and costs every unit's
*trained* error e = W_fp - W_trained the way the gptq measure costs GPTQ's: 1/2 E[(g . e x)^2]
at the layer's output (g the gradient of log p(y), y sampled from FP; the same 8 calibration rows
and sampling seed the bits stage uses). Beside it: the library's fisher (RTN errors) and the same
output form of RTN's errors, so the effect of training is separated from the effect of the form.

    # the table: every unit, every option, three measures; rank correlations and trained/RTN ratios
    python bench/bits_trained.py table --name smollm2_bits_trained \
        --trained 2g128=bench/work/smollm2_bits_trained/t-w2g128,3g128=...,4g128=...
    # a mixed row allocated by the trained table (an oracle: it needs the uniform runs first)
    python bench/bits_trained.py quantize --name smollm2_bits_trained --row o-mixed3.16 \
        --flags "--group-size 128 --bpw 3.1608 --bits-options 2g128,3g128,4g128"

    # compensation: KL to FP (8 windows of each text) of the trained model with one layer put back
    # to FP or to RTN, and of FP with that layer alone trained or RTN
    python bench/bits_trained.py swap --name smollm2_bits_trained \
        --trained 3g128=bench/work/smollm2_bits_trained/t-w3g128 --layers 11.mlp.down_proj,28.mlp.down_proj

Options not in the table (e.g. 8g128) are costed by the RTN output form (at 8 bits trained and
RTN errors are both ~0). The quantize row runs the default recipe in-process with the bits
stage's cost table replaced by the trained one; everything else is bench/run.py's row.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import crossblock as cb
from crossblock.api import calibration_ids
from crossblock.data.calibration import calibration_source
from crossblock.engine import allocate, sensitivity
from crossblock.model.adapter import find_blocks
from crossblock.precision import resolve
from crossblock.recipe import Data

import run
from bits_sensitivity import correlations
from common import ROOT

ROWS, SEED = 8, 0  # the bits stage's defaults: the last 8 calibration rows, the data seed


def calib_rows(tokenizer, nsamples=128, seqlen=512):
    text = calibration_source([str(run.CALIB)])[0]  # as `crossblock quantize --calib` reads it
    ids = calibration_ids(tokenizer, text, Data(nsamples=nsamples, seqlen=seqlen, seed=SEED))
    return ids[-ROWS:]


def trained_errors(model, units, model_dir) -> list[list[torch.Tensor]]:
    """Per unit: W_fp - W_trained of each member matrix, from a fake-format folder."""
    state = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        state.update(load_file(str(f)))
    prefix = find_blocks(model)[0]
    out = []
    for u in units:
        errs = []
        for module, local, p, _ in sensitivity.members(model, u):
            w = state[f"{prefix}.{u.block}.{local}.weight"].float()
            errs.append(sensitivity.as_rows(p.data.float() - w, module, False))
        out.append(errs)
    return out


def output_costs(model, units, errors, rows, precision) -> torch.Tensor:
    """1/2 E[(g . e x)^2] per unit and option (sensitivity.output_costs, the gptq measure's form);
    errors[j][k] = unit k's member errors at option j, in sensitivity.members' order."""
    pairs = {(k, j): list(zip([m for m, *_ in sensitivity.members(model, u)], per_unit[k]))
             for j, per_unit in enumerate(errors) for k, u in enumerate(units)}
    return sensitivity.output_costs(model, sensitivity.dense_modules(model, units, "trained"), pairs,
                                    (len(units), len(errors)), rows, "cpu", precision, SEED)


def table(args):
    model_dir = args.model or run.prepare_model()
    model, tokenizer = cb.load_model(model_dir)
    model.eval().requires_grad_(False)
    rows = calib_rows(tokenizer)
    precision = resolve("auto", "cpu")[0]
    units = allocate.find_units(model)
    trained = dict(pair.split("=", 1) for pair in args.trained.split(","))
    options = list(trained)
    grid = cb.Recipe().grid
    count = len(find_blocks(model)[1])
    rtn = [[sensitivity.error(model, u, grid.option(o), count) for u in units] for o in options]
    t0 = time.time()
    tables = {"trained": output_costs(model, units, [trained_errors(model, units, trained[o]) for o in options],
                                      rows, precision),
              "rtn-output": output_costs(model, units, rtn, rows, precision),
              "fisher": sensitivity.costs("fisher", model, units, [grid.option(o) for o in options], rows, "cpu",
                                          precision, SEED)}
    corr = {m: correlations(tables[m], tables["trained"], options) for m in ("fisher", "rtn-output")}
    ratio = tables["trained"] / tables["rtn-output"]
    kinds = sorted({u.name.rsplit(".", 1)[-1] for u in units})
    ratios = {o: {kind: round(float(ratio[[k for k, u in enumerate(units) if u.name.endswith("." + kind)], j].median()), 4)
                  for kind in kinds} for j, o in enumerate(options)}
    record = {"model": model_dir, "trained": trained, "options": options, "rows": ROWS, "precision": precision,
              "commit": commit(), "seconds": round(time.time() - t0, 1), "correlation with trained": corr,
              "median trained / rtn-output by kind": ratios, "units": [u.name for u in units],
              "tables": {m: t.tolist() for m, t in tables.items()}}
    out = ROOT / "bench" / "results" / f"{args.name}_table.json"
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: record[k] for k in ("correlation with trained", "median trained / rtn-output by kind",
                                             "seconds")}, indent=1))


def quantize(args):
    """One bench/run.py row (the default recipe) whose bits stage allocates by the trained table."""
    record = json.loads((ROOT / "bench" / "results" / f"{args.name}_table.json").read_text())
    known = record["options"]
    trained = torch.tensor(record["tables"]["trained"], dtype=torch.float64)

    def costs(measure, model, units, grids, rows, device, precision, seed=0):
        assert [u.name for u in units] == record["units"], "the table's units are not this model's"
        count = len(find_blocks(model)[1])
        cols = []
        for o, grid in zip(asked, grids):
            if o in known:
                cols.append(trained[:, known.index(o)])
            else:  # RTN's error in the same output form (at 8 bits both are ~0)
                errs = [[sensitivity.error(model, u, grid, count) for u in units]]
                cols.append(output_costs(model, units, errs, rows, precision)[:, 0])
        return torch.stack(cols, 1)

    flags = shlex.split(args.flags)
    asked = flags[flags.index("--bits-options") + 1].split(",")
    sensitivity.costs = costs
    model_dir = args.model or run.prepare_model()
    work = ROOT / "bench" / "work" / args.name
    out = work / args.row
    argv = ["quantize", "--model", model_dir, "--calib", str(run.CALIB), "--out", str(out), "--wbits", "3",
            "--group-size", "64", "--nsamples", "128", "--seqlen", "512", "--seed", "0", "--batch-size", "2",
            "--iters", "60", "--quiet", "--overwrite", *flags]
    from crossblock.cli import main as cli
    rc = cli(argv)
    if rc:
        raise SystemExit(f"quantize failed ({rc})")
    info = json.loads((out / "crossblock.json").read_text())
    ns = argparse.Namespace(seqlen=512, eval_windows=40, model=model_dir, kl=True, figures={})
    log = work / f"{args.row}.log"
    second = {"ppl_tinystories": run.evaluate(out, ns, log, run.SECOND)}
    result = run.scored(ns, {"row": args.row, "ppl": run.evaluate(out, ns, log), **second,
                             "wall_s": info["wall_seconds"], "peak_rss_mib": info["peak_rss_mib"],
                             "stage_s": info.get("stage_seconds"), "commit": commit(),
                             "command": f"python bench/bits_trained.py quantize --name {args.name} --row {args.row} "
                                        f"--flags {shlex.quote(args.flags)}"})
    with open(ROOT / "bench" / "results" / f"{args.name}.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    print(result, flush=True)


def swap(args):
    """The isolated cost of a trained layer against its cost in the trained model (printed, with
    the commit; the notes quote it)."""
    import torch.nn.functional as F

    from crossblock.data.text import read_texts, tokenize
    model_dir = args.model or run.prepare_model()
    model, tokenizer = cb.load_model(model_dir)
    model.eval().requires_grad_(False)
    fp = {k: v.clone() for k, v in model.state_dict().items()}
    option, folder = args.trained.split("=", 1)
    trained = {k: v for f in sorted(Path(folder).glob("*.safetensors")) for k, v in load_file(str(f)).items() if k in fp}
    prefix, blocks = find_blocks(model)
    grid = cb.Recipe().grid.option(option)
    windows = {name: tokenize(tokenizer, read_texts([path]), enough=8 * 512)[:8 * 512].view(8, 512)
               for name, path in (("wiki", run.TEST), ("stories", run.SECOND))}
    precision = resolve("auto", "cpu")[0]

    def log_probs(ids):
        return F.log_softmax(sensitivity.logits(model, ids, "cpu", precision), -1)

    with torch.no_grad():
        reference = {name: [log_probs(r) for r in w] for name, w in windows.items()}

        def kl(state) -> dict:
            model.load_state_dict(state)
            return {name: round(float(sum(F.kl_div(log_probs(r), ref, log_target=True, reduction="sum")
                                          for r, ref in zip(w, reference[name]))
                                      / sum(ref.shape[0] for ref in reference[name])), 4)
                    for name, w in windows.items()}

        print(commit(), "trained", kl({**fp, **trained}), flush=True)
        for layer in args.layers.split(","):
            key = f"{prefix}.{layer}.weight"
            block, local = int(layer.split(".")[0]), layer.split(".", 1)[1]
            w = fp[key].float()
            rtn = grid.for_layer(local, block, len(blocks), w.shape[1]).rtn(w).to(fp[key].dtype)
            for label, state in ((f"trained, {layer} FP", {**fp, **trained, key: fp[key]}),
                                 (f"trained, {layer} RTN", {**fp, **trained, key: rtn}),
                                 (f"FP, {layer} trained", {**fp, key: trained[key]}),
                                 (f"FP, {layer} RTN", {**fp, key: rtn})):
                print(label, kl(state), flush=True)
        model.load_state_dict(fp)


def commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("table", "quantize", "swap"))
    p.add_argument("--name", required=True)
    p.add_argument("--model", default=None, help="default: SmolLM2-135M built by prepare.py")
    p.add_argument("--trained", help="option=fake-model-folder,... (table; swap: one)")
    p.add_argument("--layers", help="block.local names, e.g. 11.mlp.down_proj (swap)")
    p.add_argument("--row", help="the row's name (quantize)")
    p.add_argument("--flags", help="the row's crossblock quantize flags (quantize)")
    args = p.parse_args()
    {"table": table, "quantize": quantize, "swap": swap}[args.mode](args)


if __name__ == "__main__":
    sys.exit(main())
