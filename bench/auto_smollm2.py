#!/usr/bin/env python3
"""`--recipe auto` against the schedule it picks, run on its own, on SmolLM2-135M.

    OMP_NUM_THREADS=1 python bench/auto_smollm2.py --model $SMOLLM2 [--budget 0.15]

Protocol of bench/results/smollm2_w3g64_c128.md (W3 g64, 128 x 512 calibration tokens from
wiki.valid.tokens, seed 0, WikiText-2 test on the first 40 windows of 512 tokens, one torch
thread), with `best`'s training (60 steps x batch 2, token-mse). Two rows, run at the same time
(one thread each) so that they share the machine's load: `auto` and `best` (the `block` shape
with the same settings: the schedule SmolLM2's fixed-schedule table ranks first). When auto
chooses another shape, add that shape's row (`--rows best,la-60x2=la:--loss token-mse`) to
compare its wall time with.
"""
import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT  # noqa: E402
from run import run_row, write_table  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="auto_smollm2_w3g64")
    p.add_argument("--budget", type=float, default=0.15)
    p.add_argument("--rows", default="best", help="the fixed rows run beside auto (run.py's row syntax)")
    args = p.parse_args()
    # the protocol (run.py's flags): every row gets these, `best`'s steps included
    args.wbits, args.group_size, args.nsamples, args.seqlen, args.seed = 3, 64, 128, 512, 0
    args.iters, args.batch_size, args.eval_windows, args.abits, args.second_text = 60, 2, 40, 16, False
    rows = [f"auto=auto:--auto-budget {args.budget}", *args.rows.split(",")]
    work = ROOT / "bench" / "work" / args.name
    work.mkdir(parents=True, exist_ok=True)
    jsonl = ROOT / "bench" / "results" / f"{args.name}.jsonl"

    def one(row):
        t0 = time.time()
        result = run_row(row, args, work, work / f"{row.split('=')[0]}.log")
        out = work / result["row"] / "crossblock.json"
        if result["row"] == "auto":
            info = json.loads(out.read_text())
            result["auto"] = {k: info["auto"][k] for k in ("chosen", "prefix_blocks", "fidelity", "compare_seconds",
                                                          "compare_block_passes", "full_block_passes",
                                                          "reused_windows", "candidates")}
        print(f"{result['row']}: ppl {result['ppl']:.3f} wall {result['wall_s']} s ({time.time() - t0:.0f} s)",
              flush=True)
        return result

    with ThreadPoolExecutor(len(rows)) as pool:
        results = list(pool.map(one, rows))
    with open(jsonl, "a") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    write_table(jsonl, args)


if __name__ == "__main__":
    main()
