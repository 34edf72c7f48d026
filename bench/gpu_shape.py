#!/usr/bin/env python3
"""Wall time and peak GPU memory of the window engine on a model of SmolLM2-135M's shape.

    python bench/gpu_shape.py --rows rtn,gptq,block,cbq --iters 15 --nsamples 128 --seqlen 512
    python bench/gpu_shape.py --rows best,best+ft60 --nsamples 128 --seqlen 512

A row is a preset name, optionally `+ftN` (then N finetune steps); `best` keeps its own
steps and batch (60 x 2), the other training presets take --iters and --batch-size.

The GPU machine cannot hold SmolLM2's weights (its working tree is limited to 64 MiB), so the
model is built from SmolLM2-135M's config with random weights and calibrated on random token
ids: the work per window is what a real run does; the loss values mean nothing.
"""
import argparse
import json
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import crossblock as cb

SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="rtn,gptq,block,cbq")
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=15)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda")
    a = p.parse_args()
    torch.manual_seed(0)
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (a.nsamples, a.seqlen))
    results = []
    for row in a.rows.split(","):
        model = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
        preset, _, finetune = row.partition("+ft")
        own = {} if preset == "best" else dict(batch_size=a.batch_size, **(
            {"iters": a.iters} if preset not in ("rtn", "gptq") else {}))
        recipe = cb.Recipe.preset(preset, wbits=a.wbits, group_size=a.group_size, nsamples=a.nsamples,
                                  seqlen=a.seqlen, **own, **({"finetune_steps": int(finetune)} if finetune else {}))
        if a.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        cb.quantize(model, None, recipe, calib=ids, device=a.device, progress=False)
        wall = time.time() - t0
        peak = torch.cuda.max_memory_allocated() / 2**20 if a.device == "cuda" else float("nan")
        results.append(dict(row=row, wall_s=round(wall, 1), peak_gpu_mib=round(peak, 1)))
        print(json.dumps(results[-1]), flush=True)
    name = torch.cuda.get_device_name() if a.device == "cuda" else "cpu"
    print(f"\n{name}, SmolLM2-135M shape (random weights), W{a.wbits} g{a.group_size}, calibration "
          f"{a.nsamples} x {a.seqlen}, steps x batch per window: best 60 x 2, others {a.iters} x {a.batch_size}\n")
    print("| row | wall s | peak GPU MiB |\n|---|---|---|")
    for r in results:
        print(f"| {r['row']} | {r['wall_s']} | {r['peak_gpu_mib']} |")


if __name__ == "__main__":
    main()
