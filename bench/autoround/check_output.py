#!/usr/bin/env python3
"""Sanity-check a run_autoround.py output folder with plain transformers (no auto-round).

    check_output.py --fp DIR --q DIR --text FILE [--tokens 512]

Checks that the quantized folder loads, that its perplexity on the first --tokens tokens
of FILE is finite (printed next to the FP model's), and that every quantized Linear
(those listed in autoround.json) takes at most 2**bits distinct values per row and group,
i.e. really holds fake-quantized weights. Exits non-zero on any failure.
"""
import argparse
import json
import math
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def ppl(model, ids, window):
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(ids) - 1, window):
            x = ids[s:s + window].unsqueeze(0)
            if x.shape[1] < 2:
                break
            loss = model(x, labels=x).loss.item()
            nll += loss * (x.shape[1] - 1)
            n += x.shape[1] - 1
    return math.exp(nll / n)


def max_distinct_per_group(w, group_size):
    g = w.shape[1] if group_size == -1 else group_size
    groups = w.reshape(w.shape[0], -1, g).reshape(-1, g)
    return max(len(torch.unique(row)) for row in groups)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fp", required=True)
    p.add_argument("--q", required=True)
    p.add_argument("--text", required=True)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--window", type=int, default=256)
    a = p.parse_args()

    info = json.load(open(os.path.join(a.q, "autoround.json")))
    bits, gs = info["args"]["bits"], info["args"]["group_size"]
    tok = AutoTokenizer.from_pretrained(a.fp)
    ids = tok(open(a.text, encoding="utf-8").read(), return_tensors="pt").input_ids[0][:a.tokens]

    fp = AutoModelForCausalLM.from_pretrained(a.fp, dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(a.q, dtype=torch.float32).eval()
    p_fp, p_q = ppl(fp, ids, a.window), ppl(q, ids, a.window)
    print(f"ppl on {len(ids)} tokens: fp {p_fp:.3f}  autoround w{bits} g{gs} {p_q:.3f}")

    fails = []
    if not math.isfinite(p_q):
        fails.append("quantized perplexity is not finite")
    modules = dict(q.named_modules())
    unq = set(info.get("unquantized_layers", []))
    worst = 0
    for name, m in modules.items():
        if isinstance(m, torch.nn.Linear) and name != "lm_head" and name not in unq:
            d = max_distinct_per_group(m.weight.detach(), gs)
            worst = max(worst, d)
            if d > 2 ** bits:
                fails.append(f"{name}: {d} distinct values in a group > {2 ** bits}")
            if torch.equal(m.weight, dict(fp.named_modules())[name].weight):
                fails.append(f"{name}: weight identical to FP")
    print(f"checked {info['quantized_layers']} quantized Linear layers: "
          f"max distinct values per row-group = {worst} (limit {2 ** bits})")
    if fails:
        sys.exit("FAIL:\n  " + "\n  ".join(fails))
    print("OK")


if __name__ == "__main__":
    main()
