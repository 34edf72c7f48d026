#!/usr/bin/env python3
"""llm-compressor baseline for crossblock's FP4 rows (issue #31), on CPU.

Run with bench/llmcompressor/.venv/bin/python (see setup.sh). Quantizes a local HF folder with
llm-compressor's `oneshot` on exactly the calibration windows crossblock uses, with one of its
preset schemes (NVFP4A16: FP4 E2M1 weights, E4M3 scales per 16, a global FP32 scale; MXFP4A16:
E8M0 scales per 32; NVFP4 / MXFP4: the same weights with the activations quantized too, W4A4:
NVFP4's input global scale calibrated by its static min-max observer), and writes its
compressed-tensors folder (`crossblock eval` reads it, activation quantizers included).

    run_llmcompressor.py --model DIR --calib-tokens calib.safetensors --out DIR --scheme NVFP4A16 [--gptq]

Without --gptq: QuantizationModifier (its default observer: min-max, the RTN of the format);
with --gptq: GPTQModifier (its defaults: damping 0.01, block size 128, no act-order override).
lm_head is not quantized (crossblock leaves it in full precision too).
"""
import argparse
import json
import resource
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib-tokens", required=True, help="safetensors with int64 'input_ids' (nsamples, seqlen)")
    p.add_argument("--out", required=True)
    p.add_argument("--scheme", default="NVFP4A16", choices=("NVFP4A16", "MXFP4A16", "NVFP4", "MXFP4"))
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ignore", nargs="*", default=[], help="more layers to leave unquantized (regex: re:.*down_proj)")
    args = p.parse_args()

    import torch
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    ids = load_file(args.calib_tokens)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    modifier = (GPTQModifier if args.gptq else QuantizationModifier)(targets="Linear", scheme=args.scheme,
                                                                      ignore=["lm_head", *args.ignore])
    t = time.time()
    oneshot(model=model, dataset=data, recipe=modifier, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1])
    wall = time.time() - t
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    with open(f"{args.out}/llmcompressor.json", "w") as f:
        json.dump({"quantize_wall_s": round(wall, 2), "scheme": args.scheme, "gptq": args.gptq,
                   "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}, f)


if __name__ == "__main__":
    main()
