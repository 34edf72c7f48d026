"""Wall time and peak RSS of quantizing a tiny MoE model vs the dense model of equal active size.

The MoE (Qwen3-MoE layout: E experts of width I, top-k routing) activates k * I intermediate
channels per token; the dense Qwen3 of intermediate size k * I does the same matmul work per
token, and holds E / k times fewer MLP weights. Each run is its own process, so ru_maxrss is
that run's peak.

    python bench/moe.py [--layers 4 --hidden 256 --experts 8 --topk 2 --inter 128 --method gptq]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(kind: str, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3MoeConfig

    import crossblock as cb
    torch.set_num_threads(1)
    torch.manual_seed(0)
    common = dict(vocab_size=1024, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=a.hidden // 4)
    if kind == "moe":
        cfg = Qwen3MoeConfig(**common, moe_intermediate_size=a.inter, num_experts=a.experts,
                             num_experts_per_tok=a.topk)
    else:
        cfg = Qwen3Config(**common, intermediate_size=a.inter * a.topk)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, 1024, (a.nsamples, a.seqlen), generator=torch.Generator().manual_seed(0))
    recipe = cb.Recipe.preset(a.method, wbits=4, group_size=64, nsamples=a.nsamples, seqlen=a.seqlen,
                              batch_size=4, **({"iters": a.iters} if a.method != "gptq" and a.method != "rtn" else {}))
    t0 = time.time()
    _, report = cb.quantize(model, None, recipe, calib=ids, progress=False, device="cpu")
    return {"model": kind, "params_M": round(params / 1e6, 2), "wall_s": round(time.time() - t0, 2),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "block_rel_mse_last": round(report["blocks"][-1]["rel_mse"], 5),
            "rtn_rel_mse_last": round(report["blocks"][-1].get("rtn", {}).get("rel_mse", float("nan")), 5)}


def main():
    p = argparse.ArgumentParser()
    for name, default in [("layers", 4), ("hidden", 256), ("experts", 8), ("topk", 2), ("inter", 128),
                          ("nsamples", 32), ("seqlen", 128), ("iters", 20)]:
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--method", default="gptq")
    p.add_argument("--child", choices=("moe", "dense"))
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a)))
        return
    rows = []
    for kind in ("dense", "moe"):
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", kind], capture_output=True,
                             text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for r in rows:
        print("| " + " | ".join(str(r[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
