#!/usr/bin/env python3
"""AutoRound's AutoScheme (mixed bits under an average-bits budget) as a baseline for crossblock's
`--bpw`, on CPU. Run with bench/autoround/.venv/bin/python (setup.sh).

    run_autoscheme.py --model DIR --calib-tokens calib.safetensors --out DIR --avg-bits 3.0 \
        --options 2,3,4 --group-size 64 --iters 0 --nsamples 128 --seqlen 512 --batch-size 8

Options are int weight-only asymmetric schemes of one group size (as crossblock's rows); the budget
counts scales and zero points (`ignore_scale_zp_bits=False`: AutoRound's compute_layer_bits,
b + (16 + b) / g per weight, the formula crossblock uses); q/k/v and gate/up are shared layers (one
scheme each, what vLLM needs and crossblock's default `--bits-tie fused`). `--iters 0`: AutoScheme's
choice then AutoRound's RTN path; `--iters N`: SignRound tuning after the choice. Writes a plain HF
folder of fake-quantized weights and autoscheme.json (every layer's bits, the bits per weight
reached, wall time).
"""
import argparse
import json
import os
import resource
import time

from run_autoround import load_calib, save_dense


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--avg-bits", type=float, required=True)
    p.add_argument("--options", default="2,3,4", help="bit widths, separated by , or + (bench/run.py rows split on ,)")
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--iters", type=int, default=0)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=42)
    args = p.parse_args()
    import torch
    import auto_round
    from auto_round import AutoRound
    from auto_round.auto_scheme.gen_auto_scheme import AutoScheme
    from auto_round.schemes import QuantizationScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = load_calib(args.calib_tokens, args.nsamples, args.seqlen)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    # AutoScheme reads its data by dataset name only (a string; a local .json of texts works): crossblock's
    # windows, decoded (re-tokenized by AutoRound, cut at seqlen)
    texts = os.path.join(args.out + ".calib.json")
    with open(texts, "w") as f:
        json.dump([tokenizer.decode(row) for row in ids.tolist()], f)
    options = [QuantizationScheme(bits=int(b), group_size=args.group_size, sym=False, data_type="int", act_bits=16)
               for b in args.options.replace("+", ",").split(",")]
    scheme = AutoScheme(avg_bits=args.avg_bits, options=options, ignore_scale_zp_bits=False,
                        shared_layers=[["q_proj", "k_proj", "v_proj"], ["gate_proj", "up_proj"]],
                        nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, device_map="cpu",
                        enable_torch_compile=False)
    # AutoScheme scores on the compressor's dataset, which must then be a name too: both read the texts
    ar = AutoRound(model, tokenizer=tokenizer, scheme=scheme, iters=args.iters, nsamples=args.nsamples,
                   seqlen=args.seqlen, batch_size=args.batch_size, seed=args.seed, dataset=texts, device_map="cpu",
                   enable_torch_compile=False, amp=False, low_cpu_mem_usage=False)
    t0 = time.perf_counter()
    qmodel, layer_config = ar.quantize()
    wall = time.perf_counter() - t0
    quantized = {n: m for n, m in qmodel.named_modules()
                 if isinstance(m, torch.nn.Linear) and n != "lm_head" and n in layer_config}
    bits = {n: int(layer_config[n]["bits"]) for n in quantized}
    weights = {n: m.weight.numel() for n, m in quantized.items()}
    width = {n: m.weight.shape[1] for n, m in quantized.items()}
    g = args.group_size
    stored = sum(weights[n] * (b + (16 + b) * (-(-width[n] // g)) / width[n]) if b < 16 else 16 * weights[n]
                 for n, b in bits.items())
    save_dense(qmodel, args.model, args.out)
    info = {"quantize_wall_s": round(wall, 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "auto_round_version": auto_round.__version__, "torch_threads": torch.get_num_threads(),
            "bpw": round(stored / sum(weights.values()), 4), "layer_bits": bits,
            "bits_count": {b: sum(v == b for v in bits.values()) for b in sorted(set(bits.values()))},
            "args": vars(args)}
    with open(os.path.join(args.out, "autoscheme.json"), "w") as f:
        json.dump(info, f, indent=2)
    print(json.dumps({k: v for k, v in info.items() if k != "layer_bits"}, indent=2))


if __name__ == "__main__":
    main()
