#!/usr/bin/env python3
"""Checkpoint size of each export format for one model and setting, next to the original.

    python bench/sizes.py --model DIR --wbits 4 --group-size 64 --name smollm2_sizes_w4g64

Weights are RTN (the size does not depend on the method); calibration is a few short windows.
Each packed folder is loaded back with crossblock.load and compared with the fake-quant folder.
"""
import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from common import ROOT, SHARED


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2 ** 20


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--name", required=True)
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=64)
    a = p.parse_args()
    import crossblock as cb

    work = ROOT / "bench" / "work" / a.name

    def quantize(name, fmt, *extra):
        out = work / name
        cmd = [str(Path(sys.executable).parent / "crossblock"), "quantize", "--model", a.model, "--calib",
               str(SHARED / "data" / "wikitext2" / "wiki.valid.tokens"), "--out", str(out), "--recipe", "rtn",
               "--wbits", str(a.wbits), "--group-size", str(a.group_size), "--sym", "--nsamples", "8",
               "--seqlen", "64", "--batch-size", "8", "--format", fmt, "--overwrite", "--quiet", *extra]
        subprocess.run(cmd, check=True)
        return out, shlex.join(cmd).replace(str(ROOT) + "/", "").replace(a.model, "$MODEL")

    rows = [("original (bf16)", size_mib(Path(a.model)), "-")]
    for fmt in ("fake", "compressed-tensors", "gptq"):
        out, cmd = quantize(fmt, fmt)
        rows.append((fmt, size_mib(out), cmd))
    # exactness: each packed folder against a float32 fake folder quantized on the same scale grid
    # (the CLI rounds scales to what each format stores: bf16 here for compressed-tensors, fp16 for gptq)
    checks = {}
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    for fmt, scale_dtype in (("compressed-tensors", "bfloat16"), ("gptq", "float16")):
        ref_dir, _ = quantize(f"fake-{scale_dtype}", "fake", "--save-dtype", "float32", "--scale-dtype", scale_dtype)
        with torch.no_grad():
            ref = cb.load(ref_dir)(ids).logits
            got = cb.load(work / fmt, dtype=torch.float32)(ids).logits
        checks[fmt] = ((got - ref).abs().max() / ref.abs().max()).item()
    lines = [f"# {a.name}", "", f"W{a.wbits} g{a.group_size} sym, decoder linear layers packed, embeddings / lm_head "
             "kept in the model dtype (bf16); size = sum of the folder's safetensors files.", "",
             "| checkpoint | MiB | ratio to original |", "|---|---|---|"]
    lines += [f"| {n} | {s:.1f} | {s / rows[0][1]:.3f} |" for n, s, _ in rows]
    lines += ["", "Reloaded with `crossblock.load` in float32, max |logit difference| / max |logit| against a float32 "
              "fake-quant folder on the same scale grid: "
              + ", ".join(f"{k} {v:.2e}" for k, v in checks.items()), ""]
    lines += [f"- {n}: `{c}`" for n, _, c in rows[1:]]
    (ROOT / "bench" / "results" / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
