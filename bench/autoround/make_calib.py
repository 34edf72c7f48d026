#!/usr/bin/env python3
"""Make a --calib-tokens file: random token windows from a text file.

    make_calib.py --model DIR --text FILE --nsamples N --seqlen L --seed S --out calib.safetensors

Stand-in for crossblock's own calibration sampler when testing run_autoround.py:
the whole text is tokenized once (no special tokens) and N windows of L tokens are
cut at uniformly random offsets. Writes int64 'input_ids' of shape (N, L).
"""
import argparse

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--nsamples", type=int, required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    with open(a.text, encoding="utf-8") as f:
        text = f.read()
    ids = AutoTokenizer.from_pretrained(a.model)(text, add_special_tokens=False,
                                                 return_tensors="pt").input_ids[0]
    if len(ids) <= a.seqlen:
        raise SystemExit(f"{a.text}: only {len(ids)} tokens, need more than {a.seqlen}")
    g = torch.Generator().manual_seed(a.seed)
    starts = torch.randint(0, len(ids) - a.seqlen, (a.nsamples,), generator=g)
    windows = torch.stack([ids[s:s + a.seqlen] for s in starts.tolist()]).to(torch.int64)
    save_file({"input_ids": windows.contiguous()}, a.out)
    print(f"{a.out}: {tuple(windows.shape)} from {len(ids)} tokens")


if __name__ == "__main__":
    main()
