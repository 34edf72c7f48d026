#!/usr/bin/env python3
"""Self-generated calibration text (issue #29 experiment): the FP model samples its own text, which
then calibrates it (`crossblock quantize --calib THIS_FILE`). Literature: Williams et al., "Self-
calibration for language model quantization and pruning" (2025): text a model samples from itself
calibrates it about as well as or better than real text, and it is no one domain's.

    python bench/self_calib.py --sequences 128 --tokens 512 --out bench/work/self_calib/smollm2.txt

Each sequence starts from the end-of-text token alone (a fresh document, as in pretraining) and is
sampled at temperature 1 (the model's own distribution), end-of-text suppressed until `--tokens`.
One thread, bf16 autocast where the CPU has it. Not run in CI.
"""
import argparse
import os
import time
from pathlib import Path

import torch


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=os.path.expanduser("~/.cache/crossblock-assets/smollm2-135m-instruct"))
    p.add_argument("--sequences", type=int, default=128)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crossblock.precision import autocast, resolve
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    precision, _ = resolve("auto", "cpu")
    start = tok.eos_token_id if tok.eos_token_id is not None else tok.bos_token_id
    torch.manual_seed(args.seed)
    texts, t0 = [], time.time()
    for lo in range(0, args.sequences, args.batch):
        n = min(args.batch, args.sequences - lo)
        prompt = torch.full((n, 1), start, dtype=torch.long)
        with torch.no_grad(), autocast("cpu", precision):
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, temperature=1.0,
                                 top_k=0, top_p=1.0, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 pad_token_id=start)
        texts += tok.batch_decode(out[:, 1:], skip_special_tokens=True)
        print(f"{lo + n}/{args.sequences} sequences, {time.time() - t0:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n\n".join(t.strip() for t in texts) + "\n", encoding="utf-8")
    print(f"wrote {args.out}: {sum(map(len, texts))} characters, {time.time() - t0:.0f} s ({precision})")


if __name__ == "__main__":
    main()
