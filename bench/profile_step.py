#!/usr/bin/env python3
"""Where a window step and a finetune step spend their time (issue #27): torch's profiler around
one SmolLM2 run, one thread, self CPU time per op, grouped into the parts the issue names.

    python bench/profile_step.py window   [--precision bf16]   # best, 1 block, 10 steps x batch 2 x 512
    python bench/profile_step.py finetune [--precision bf16]   # rtn + 3 finetune steps, batch 2 x 512

The run is done once unprofiled (warm caches), then profiled; prints the table of the top ops.
"""
import argparse
import os
import sys
import tempfile
import time

import torch
from torch.profiler import ProfilerActivity, profile

from common import SHARED

CALIB = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("window", "finetune"))
    p.add_argument("--precision", default="bf16")
    p.add_argument("--model", default=os.path.expanduser("~/.cache/crossblock-assets/smollm2-135m-instruct"))
    p.add_argument("--rows", type=int, default=30)
    args = p.parse_args()
    torch.set_num_threads(1)
    from crossblock.cli import main as cli

    common = ["--model", args.model, "--calib", str(CALIB), "--wbits", "3", "--group-size", "64", "--seqlen", "512",
              "--precision", args.precision, "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        if args.what == "window":
            cmd = ["compare", *common, "--recipe", "best", "--blocks", "1", "--iters", "10", "--batch-size", "2",
                   "--nsamples", "8"]
        else:
            cmd = ["quantize", *common, "--recipe", "rtn", "--finetune-steps", "3", "--finetune-batch-size", "2",
                   "--nsamples", "16", "--out", f"{tmp}/q", "--overwrite"]
        cli(cmd)
        t = time.perf_counter()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            cli(cmd)
        print(f"{args.what}, precision {args.precision}: {time.perf_counter() - t:.1f} s profiled", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()
