#!/usr/bin/env python3
"""CFP with and without one fold: RTN WxAy perplexity on a few WikiText-2 test windows.

    OMP_NUM_THREADS=1 .venv/bin/python bench/cfp_folds.py --model $SMOLLM2 \
        --calib $CROSSBLOCK_SHARED/data/wikitext2/wiki.valid.tokens --name cfp_vo_smollm2_w4a4 --without v_proj

Runs the same RTN + CFP quantization twice in one process, once with the LINEAR_FOLDS pairs whose
source contains `--without` removed, and writes results/NAME.md with both perplexities.
"""
import shlex
import sys
import time
from pathlib import Path

import torch

import crossblock as cb
from crossblock.preprocess import fold
from common import ROOT, SHARED, parser


def run(args, drop: bool) -> tuple[float, float]:
    saved = dict(fold.LINEAR_FOLDS)
    if drop:
        for kind, pairs in saved.items():
            fold.LINEAR_FOLDS[kind] = tuple(p for p in pairs if args.without not in p[0])
    try:
        model, tok = cb.load_model(args.model)
        recipe = cb.Recipe.preset("rtn", wbits=args.wbits, abits=args.abits, group_size=args.group_size, cfp=True,
                                  nsamples=args.nsamples, seqlen=512, batch_size=8)
        t = time.time()
        model, _ = cb.quantize(model, tok, recipe, open(args.calib).read(), device="cpu", progress=False)
        test = (SHARED / "data" / "wikitext2" / "wiki.test.raw").read_text()
        return cb.evaluate(model, tok, test, seqlen=512, max_windows=args.eval_windows, progress=False), time.time() - t
    finally:
        fold.LINEAR_FOLDS.update(saved)


def main():
    p = parser(__doc__)
    p.add_argument("--without", required=True, help="drop the folds whose source name contains this")
    for flag, default in [("wbits", 4), ("abits", 4), ("group-size", 64), ("nsamples", 32), ("eval-windows", 5)]:
        p.add_argument(f"--{flag}", type=int, default=default)
    args = p.parse_args()
    torch.manual_seed(0)
    with_fold, without = run(args, drop=False), run(args, drop=True)
    lines = [f"# {args.name}", "",
             f"RTN W{args.wbits}A{args.abits} g{args.group_size} + CFP, calibration {args.nsamples} x 512 tokens "
             f"of `{Path(args.calib).name}`, WikiText-2 test ppl on the first {args.eval_windows} windows of 512, "
             f"torch threads {torch.get_num_threads()}. Command, from `bench/`:", "",
             f"    {shlex.join(['python', *sys.argv]).replace(args.model, '$SMOLLM2').replace(str(Path(args.calib).parent), '$CROSSBLOCK_SHARED/data/wikitext2')}", "",
             "| CFP folds | ppl | seconds |", "|---|---|---|",
             f"| all | {with_fold[0]:.2f} | {with_fold[1]:.0f} |",
             f"| all but `{args.without}` | {without[0]:.2f} | {without[1]:.0f} |"]
    out = ROOT / "bench" / "results" / f"{args.name}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
