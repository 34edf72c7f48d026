"""SmolLM2-135M: RTN W4A4 g64 with and without `rotate_model` (issue 16), smollm2_w4a4_g64 protocol.

WikiText-2 test perplexity (`wiki.test.raw`, first 40 windows of 512 tokens), calibration 32 x 512
tokens from `wiki.valid.tokens` (seed 0), batch 8, one torch thread. Rows, one after another,
named METHOD[-rotate][-cfp] with METHOD rtn, gptq or best (the preset, its own 60 x 2 steps): the
`rotate` and `cfp` stages of the recipe. `fp-rotate` is the rotated FP model (must match FP 28.74)
and records the mean and worst max/RMS per token of the inputs of every block linear on one
calibration window before and after rotation. Everything stays float32 in memory (no save and reload).

    python bench/rotate_smollm2.py --model $SMOLLM2 [--abits 4] [--rows fp-rotate rtn rtn-rotate gptq-rotate-cfp best-rotate ...]
"""
import argparse
import json
import sys
import time

import torch

from common import ROOT, SHARED

sys.path.insert(0, str(ROOT / "src"))
import crossblock as cb  # noqa: E402
from crossblock.api import calibration_ids  # noqa: E402
from crossblock.data.text import read_texts  # noqa: E402
from crossblock.model.adapter import block_linears, find_blocks  # noqa: E402
from crossblock.preprocess.rotate import rotate_model  # noqa: E402


@torch.no_grad()
def outliers(model, ids) -> dict:
    ratios, hooks = [], []

    def record(module, args):
        x = args[0].flatten(0, -2).float()
        ratios.append((x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()).mean().item())
    for block in find_blocks(model)[1]:
        hooks += [m.register_forward_pre_hook(record) for _, m in block_linears(block)]
    model(ids)
    for h in hooks:
        h.remove()
    return {"mean_max_over_rms": round(sum(ratios) / len(ratios), 2), "worst_layer": round(max(ratios), 2)}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--rows", nargs="+", default=["fp-rotate", "rtn", "rtn-rotate"])
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "rotate_smollm2.jsonl"))
    p.add_argument("--abits", type=int, default=4, help="activation bits (16: weights only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    calib = read_texts(SHARED / "data" / "wikitext2" / "wiki.valid.tokens")
    test = read_texts(SHARED / "data" / "wikitext2" / "wiki.test.raw")
    base = dict(wbits=4, abits=args.abits, group_size=64, nsamples=32, seqlen=512, seed=0)
    for row in args.rows:
        t0 = time.time()
        model, tokenizer = cb.load_model(args.model)
        method, *flags = row.split("-")
        entry = {"row": row, "abits": args.abits}
        if method == "fp":  # the rotated FP model, with activation statistics before and after
            probe = calibration_ids(tokenizer, calib, cb.Recipe.preset("rtn", **base).data)[:1]
            entry["outliers_before"] = outliers(model, probe)
            if "rotate" in flags:
                entry["rotate"] = rotate_model(model)
                entry["rotate"]["online"]["layers"] = len(entry["rotate"]["online"]["layers"])
                entry["outliers_after"] = outliers(model, probe)
        else:  # the product path: rotate and cfp as recipe stages
            batch = {} if method == "best" else {"batch_size": 8}  # best keeps its own 60 x 2 steps
            recipe = cb.Recipe.preset(method, **base, **batch, rotate="rotate" in flags, cfp="cfp" in flags)
            entry["recipe"] = recipe.to_flat()
            cb.quantize(model, tokenizer, recipe, calib=calib, progress=False)
        entry["ppl"] = round(cb.evaluate(model, tokenizer, test, seqlen=512, max_windows=40, progress=False), 2)
        entry["wall_s"] = round(time.time() - t0, 1)
        print(json.dumps(entry), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(entry) + "\n")


if __name__ == "__main__":
    main()
