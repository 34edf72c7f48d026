#!/usr/bin/env python3
"""FP4 rows on SmolLM2-135M (issue #31): crossblock's nvfp4 / mxfp4 grids against llm-compressor's
NVFP4A16 / MXFP4A16 schemes, same 128 x 512 WikiText-2 calibration tokens, one thread per row; every
folder is compressed-tensors and scored by `crossblock eval` (WikiText-2 test and TinyStories, first
40 windows of 512 tokens). One row per call, so that a peer's row and ours start together:

    python bench/fp4_smollm2.py crossblock --grid nvfp4 --recipe best      # rtn, gptq, best (60 x 2)
    python bench/fp4_smollm2.py llmcompressor --scheme NVFP4A16 [--gptq]   # bench/llmcompressor/setup.sh first
    python bench/fp4_smollm2.py autoround --data-type nv_fp|mx_fp              # bench/autoround/setup.sh first
    python bench/fp4_smollm2.py table

W4A4 rows (activations quantized too; `crossblock eval` runs them as the folder's config says):

    python bench/fp4_smollm2.py crossblock --grid nvfp4 --acts nvfp4 --recipe best   # = llm-compressor's NVFP4
    python bench/fp4_smollm2.py llmcompressor --scheme NVFP4 [--gptq]
    python bench/fp4_smollm2.py crossblock --grid mxfp4 --acts mxfp4 --recipe gptq   # = MXFP4
    python bench/fp4_smollm2.py llmcompressor --scheme MXFP4 [--gptq]
    python bench/fp4_smollm2.py crossblock --grid nvfp4 --acts fp8 --recipe best     # W4A8 (FP8 per token)
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED

CALIB = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"
TEXTS = {"wikitext2": SHARED / "data" / "wikitext2" / "wiki.test.raw", "tinystories": SHARED / "data" / "tinystories" / "valid.txt"}
MODEL = os.environ.get("SMOLLM2", str(Path.home() / ".cache" / "crossblock-assets" / "smollm2-135m-instruct"))
NSAMPLES, SEQLEN, SEED, ITERS, BATCH = 128, 512, 0, 60, 2
WORK = ROOT / "bench" / "work" / "fp4_smollm2"
JSONL = ROOT / "bench" / "results" / "fp4_smollm2.jsonl"
BIN = Path(sys.executable).parent


def commit() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()


def score(folder) -> dict:
    out = {}
    for name, text in TEXTS.items():
        r = subprocess.run([str(BIN / "crossblock"), "eval", "--model", str(folder), "--ppl", str(text), "--seqlen",
                            str(SEQLEN), "--max-windows", "40", "--quiet", "--tokenizer", MODEL],
                           capture_output=True, text=True, check=True)
        out[name] = float(r.stdout.strip().splitlines()[-1].split()[-1])
    return out


def crossblock_row(args) -> dict:
    import torch
    import yaml
    import crossblock as cb
    from crossblock.data.text import read_texts

    torch.set_num_threads(1)
    acts = {} if args.acts == "none" else dict(abits=8 if args.acts == "fp8" else 4, act_type=args.acts)
    extra = dict(kv.split("=", 1) for kv in args.set)  # flat settings, e.g. act_order=true precision=fp32
    extra = {k: yaml.safe_load(v) for k, v in extra.items()}
    if args.recipe == "default":  # what `crossblock quantize` runs without --recipe (recipe.DEFAULTS)
        recipe = cb.Recipe.default(4, acts.pop("abits", 16), nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED, grid=args.grid,
                                   **acts, **extra)
    else:
        recipe = cb.Recipe.preset(args.recipe, nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED, grid=args.grid, **acts,
                                  **({} if args.recipe in ("rtn", "gptq") else dict(iters=ITERS, batch_size=BATCH)), **extra)
    tag = "" if args.acts == "none" else f"-a{args.acts}"
    out = WORK / f"cb-{args.grid}{tag}-{args.recipe}{''.join(f'-{k}={v}' for k, v in extra.items())}"
    model, tok = cb.load_model(MODEL)
    t = time.time()
    model, report = cb.quantize(model, tok, recipe, calib=read_texts(CALIB), progress=False, device="cpu")
    wall = time.time() - t
    cb.save(model, tok, out, format="compressed-tensors", report=report, overwrite=True)
    row = f"crossblock {args.grid}{'' if args.acts == 'none' else ' A ' + args.acts} {recipe.name if args.recipe == 'default' else args.recipe}"
    return {"row": row + "".join(f" {k}={v}" for k, v in extra.items()), "wall_s": round(wall, 1),
            "precision": report["precision"]["used"], "folder": str(out.relative_to(ROOT))}


def calib_tokens() -> Path:
    """crossblock's calibration windows as a file the peers read."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer
    from crossblock.data.text import calibration_windows, read_texts, tokenize

    tokens = WORK / "calib_tokens.safetensors"
    ids = calibration_windows(tokenize(AutoTokenizer.from_pretrained(MODEL), read_texts(CALIB)), NSAMPLES, SEQLEN, SEED)
    WORK.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids.contiguous()}, str(tokens))
    return tokens


def autoround_row(args) -> dict:
    """AutoRound 0.16.1's SignRound (its defaults: 200 steps, batch 8; --iters 50 --lr 5e-3: its light
    recipe) on its NVFP4 / MXFP4 weights.
    Scored on its fake-quantized dense folder: its compressed-tensors export of a weight-only run writes
    a W4A4 input-activation config without the activation scales, which crossblock's reader refuses
    (input_global_scale missing); its packed weights decode to the dense ones (checked, notes)."""
    tokens = calib_tokens()
    group = {"nv_fp": 16, "mx_fp": 32}[args.data_type]
    light = "" if (args.iters, args.lr) == (200, None) else f"-{args.iters}" + (f"-lr{args.lr:g}" if args.lr else "")
    out = WORK / f"ar-{args.data_type}{light}"
    subprocess.run([str(ROOT / "bench" / "autoround" / ".venv" / "bin" / "python"),
                    str(ROOT / "bench" / "autoround" / "run_autoround.py"), "--model", MODEL, "--calib-tokens", str(tokens),
                    "--out", str(out), "--export-ct", str(out) + "-ct", "--bits", "4", "--group-size", str(group), "--sym",
                    "--data-type", args.data_type, "--iters", str(args.iters), *(["--lr", str(args.lr)] if args.lr else []),
                    "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--batch-size", "8", "--threads", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    info = json.loads((out / "autoround.json").read_text())
    lr = f", lr {args.lr:g}" if args.lr else ""
    return {"row": f"AutoRound {'NVFP4' if args.data_type == 'nv_fp' else 'MXFP4'}A16 ({args.iters} x 8{lr})",
            "wall_s": info["quantize_wall_s"], "folder": str(out.relative_to(ROOT))}


def llmcompressor_row(args) -> dict:
    tokens = calib_tokens()
    out = WORK / f"lc-{args.scheme}{'-gptq' if args.gptq else ''}"
    venv = ROOT / "bench" / "llmcompressor" / ".venv" / "bin" / "python"
    subprocess.run([str(venv), str(ROOT / "bench" / "llmcompressor" / "run_llmcompressor.py"), "--model", MODEL,
                    "--calib-tokens", str(tokens), "--out", str(out), "--scheme", args.scheme,
                    *(["--gptq"] if args.gptq else [])], check=True, stdout=subprocess.DEVNULL)
    info = json.loads((out / "llmcompressor.json").read_text())
    return {"row": f"llm-compressor {args.scheme}{' GPTQ' if args.gptq else ''}", "wall_s": info["quantize_wall_s"],
            "folder": str(out.relative_to(ROOT))}


def table():
    rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    lines = ["# FP4 on SmolLM2-135M-Instruct: crossblock vs llm-compressor and AutoRound", "",
             "Weights only (A16) unless the row names activations (`A nvfp4`, llm-compressor's `NVFP4`: W4A4). "
             f"Calibration: {NSAMPLES} x {SEQLEN} tokens of `wiki.valid.tokens` (seed {SEED}), the "
             "same windows for every row; perplexity on the first 40 x 512 tokens of WikiText-2 test and of "
             "TinyStories, by `crossblock eval` on each row's compressed-tensors folder. One torch thread per row. "
             f"crossblock `best`: {ITERS} steps x batch {BATCH} per window.", "",
             "| row | WikiText-2 | TinyStories | quantize wall s | commit |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['wikitext2']:.2f} | {r['tinystories']:.2f} | {r.get('wall_s', '-')} | {r['commit']} |")
    notes = JSONL.with_name(JSONL.stem + ".notes.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    JSONL.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("crossblock")
    c.add_argument("--grid", choices=("nvfp4", "mxfp4"), required=True)
    c.add_argument("--recipe", choices=("rtn", "gptq", "best", "default"), required=True)
    c.add_argument("--acts", choices=("none", "nvfp4", "mxfp4", "fp8"), default="none",
                   help="activations too: nvfp4 / mxfp4 (W4A4), fp8 per token (W4A8)")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a flat recipe setting over the preset's (YAML value), e.g. act_order=true")
    lc = sub.add_parser("llmcompressor")
    lc.add_argument("--scheme", choices=("NVFP4A16", "MXFP4A16", "NVFP4", "MXFP4"), required=True)
    lc.add_argument("--gptq", action="store_true")
    ar = sub.add_parser("autoround")
    ar.add_argument("--data-type", choices=("nv_fp", "mx_fp"), required=True)
    ar.add_argument("--iters", type=int, default=200)
    ar.add_argument("--lr", type=float, default=None)
    sub.add_parser("table")
    args = p.parse_args()
    if args.what == "table":
        return table()
    sha = commit()
    row = {"crossblock": crossblock_row, "llmcompressor": llmcompressor_row, "autoround": autoround_row}[args.what](args)
    row.update(score(ROOT / row["folder"]), commit=sha)
    with open(JSONL, "a") as f:
        f.write(json.dumps(row) + "\n")
    table()
    print(json.dumps(row))


if __name__ == "__main__":
    main()
