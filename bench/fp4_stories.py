"""FP4 grids on stories260k (tests/assets): perplexity on the held-out TinyStories text (seqlen 128)
and the last block's relative output error, for RTN, GPTQ and `block` (60 steps) on nvfp4, mxfp4
and, for comparison, uniform W4 g16 sym; down_proj is skipped (width 172, no multiple of 16).
About 1.5 minutes on one core:

    PYTHONPATH=src python bench/fp4_stories.py
    PYTHONPATH=src python bench/fp4_stories.py --w4a4   # W4A4 / W4A8 rows only (--act-type), about 2 minutes

The W4A4 rows quantize the inputs too: nvfp4 weights with nvfp4 activations (llm-compressor's
NVFP4), mxfp4 with mxfp4 (MXFP4), and nvfp4 weights with FP8 per-token activations (W4A8).
"""
import dataclasses
import sys
import time
from pathlib import Path

import torch

import crossblock as cb
from crossblock.grids import GRIDS

ASSETS = Path(__file__).resolve().parents[1] / "tests" / "assets"
GRIDS_RUN = ({"type": "nvfp4"}, {"type": "mxfp4"}, {"type": "uniform", "bits": 4, "group_size": 16, "sym": True})
RUNS = (("rtn", {}), ("gptq", {}), ("block", dict(iters=60)), ("block", dict(iters=60, lwc=False)),
        ("block", dict(iters=60, init="gptq")))
# (weight grid, activations) of the --w4a4 rows, and their recipes (token-mse: see docs/methods.md)
W4A4_RUN = (({"type": "nvfp4"}, dict(abits=4, act_type="nvfp4")), ({"type": "mxfp4"}, dict(abits=4, act_type="mxfp4")),
            ({"type": "nvfp4"}, dict(abits=8, act_type="fp8")))
W4A4_RUNS = (("rtn", {}), ("gptq", {}), ("block", dict(iters=60)), ("block", dict(iters=60, loss="token-mse")),
             ("block", dict(iters=60, loss="token-mse", init="gptq", lwc=False)))


def main():
    torch.set_num_threads(1)
    calib = (ASSETS / "tinystories" / "calib.txt").read_text()
    text = (ASSETS / "tinystories" / "eval.txt").read_text()
    model, tok = cb.load_model(str(ASSETS / "stories260k"))
    print(f"FP ppl {cb.evaluate(model, tok, text, seqlen=128):.3f}", file=sys.stderr)
    rows = []
    runs = [(grid, acts, preset, extra) for grid, acts in W4A4_RUN for preset, extra in W4A4_RUNS] \
        if "--w4a4" in sys.argv else [(grid, {}, preset, extra) for grid in GRIDS_RUN for preset, extra in RUNS]
    for grid, acts, preset, extra in runs:
        t = time.time()
        r = cb.Recipe.preset(preset, nsamples=32, seqlen=128, **acts, **extra)
        r = dataclasses.replace(r, grid=GRIDS.build(grid, "grid"), skip=["mlp.down_proj"])
        model, tok = cb.load_model(str(ASSETS / "stories260k"))
        model, report = cb.quantize(model, tok, r, calib=calib, progress=False, device="cpu")
        a = f"A{acts['abits']} {acts['act_type']}" if acts else "A16"
        rows.append((grid["type"], a, preset, extra, cb.evaluate(model, tok, text, seqlen=128),
                     report["blocks"][-1]["rel_mse"], time.time() - t))
    print("| grid | activations | recipe | ppl | last block rel. MSE | s |\n|---|---|---|---|---|---|")
    for kind, a, preset, extra, ppl, err, secs in rows:
        print(f"| {kind} | {a} | {preset} {extra or ''} | {ppl:.3f} | {err:.4f} | {secs:.0f} |")


if __name__ == "__main__":
    main()
