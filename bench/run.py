#!/usr/bin/env python3
"""Benchmark rows on a real model: quantize with the crossblock CLI (or AutoRound), evaluate
WikiText-2 perplexity with `crossblock eval`, append one JSON line per row and rewrite the table.

    python bench/run.py --name smollm2_w2g64 --wbits 2 --group-size 64 --iters 20 \
        --nsamples 64 --seqlen 512 --batch-size 8 --eval-windows 40 --rows fp,rtn,gptq,block,autoround

Rows: fp, any preset (rtn gptq block mb la cbq), `default` (no --recipe: the default for the bits), `autoround`, `autoscheme` (AutoRound's mixed bits:
"as3.0=autoscheme:--avg-bits 3.0 --options 2,3,4 --iters 0"), or NAME=PRESET:FLAGS for a custom
recipe, e.g. "cbq-sr=cbq:--rounding signround" (flags come last, so they override the common
ones: "block-60x2=block:--iters 60 --batch-size 2"; "ar-60x2=autoround:--iters 60 --batch-size 2"
passes them to run_autoround.py). Every row's exact command goes in the table.
Models and data come from $CROSSBLOCK_SHARED (default ../shared); SmolLM2 is built by
shared/models/smollm2-135m/prepare.py into the user cache.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED
CALIB = SHARED / "data" / "wikitext2" / "wiki.valid.tokens"
TEST = SHARED / "data" / "wikitext2" / "wiki.test.raw"
# a second text from another domain: an end-to-end step can learn the calibration domain (WikiText)
# rather than the model, which WikiText-2 test perplexity alone would flatter
SECOND = SHARED / "data" / "tinystories" / "valid.txt"
BIN = Path(sys.executable).parent
AUTOROUND = ROOT / "bench" / "autoround"


def sh(cmd, log):
    """Run a command, tee its output to a log, fail loudly."""
    with open(log, "a") as f:
        f.write(f"$ {shlex.join(map(str, cmd))}\n")
        f.flush()
        r = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(map(str, cmd))} -- see {log}")


def prepare_model():
    out = subprocess.run([str(BIN / "python"), str(SHARED / "models" / "smollm2-135m" / "prepare.py")],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def evaluate(model_dir, args, log, text=TEST) -> float:
    cmd = [BIN / "crossblock", "eval", "--model", model_dir, "--ppl", text, "--seqlen", args.seqlen,
           "--max-windows", args.eval_windows, "--quiet", "--tokenizer", args.model]
    if args.kl:  # against FP on the same windows: KL(FP || Q) and top-1 agreement beside perplexity
        cmd += ["--reference", args.model, "--json"]
    sh(cmd, log)
    last = Path(log).read_text().strip().splitlines()[-1]
    if args.kl:
        figures = json.loads(last)
        args.figures[Path(text).name] = {"kl": figures["kl"], "top1": figures["top1"]}
        return figures["ppl"]
    return float(last.split()[-1])


def scored(args, result: dict) -> dict:
    """The KL / top-1 figures of the evaluations just run, added to a row (with --kl)."""
    if args.kl:
        for key, text in (("", TEST), ("_tinystories", SECOND)):
            if text.name in args.figures:
                result.update({f"kl{key}": args.figures[text.name]["kl"], f"top1{key}": args.figures[text.name]["top1"]})
        args.figures.clear()
    return result


def calib_tokens(args, path):
    """The exact windows `crossblock quantize` draws, for AutoRound."""
    import torch  # noqa: F401
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from crossblock.data.text import calibration_windows, read_texts, tokenize
    tok = AutoTokenizer.from_pretrained(args.model)
    ids = calibration_windows(tokenize(tok, read_texts(CALIB)), args.nsamples, args.seqlen, args.seed)
    save_file({"input_ids": ids.contiguous()}, str(path))


def run_row(row, args, work, log):
    # the code the row runs: read before it starts (the checkout may move while it runs)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    name, _, spec = row.partition("=")
    preset, _, flags = (spec or name).partition(":")
    out = work / name
    common = ["--wbits", args.wbits, "--group-size", args.group_size, "--nsamples", args.nsamples,
              "--seqlen", args.seqlen, "--seed", args.seed, "--batch-size", args.batch_size]
    if getattr(args, "abits", 16) < 16:
        common += ["--abits", args.abits]
    if preset == "fp":
        if args.kl:
            return {"row": name, "ppl": evaluate(args.model, args, log), "command": "(full precision)",
                    "kl": 0.0, "top1": 1.0,
                    **({"ppl_tinystories": evaluate(args.model, args, log, SECOND), "kl_tinystories": 0.0,
                        "top1_tinystories": 1.0} if args.second_text else {})}
        return {"row": name, "ppl": evaluate(args.model, args, log), "command": "(full precision)",
                **({"ppl_tinystories": evaluate(args.model, args, log, SECOND)} if args.second_text else {})}
    if preset in ("autoround", "autoscheme"):
        if getattr(args, "abits", 16) < 16:
            raise SystemExit(f"the {preset} row quantizes weights only; drop it or --abits")
        sh(["bash", AUTOROUND / "setup.sh"], log)
        tokens = work / "calib_tokens.safetensors"
        calib_tokens(args, tokens)
        shared = ["--model", args.model, "--group-size", args.group_size, "--nsamples", args.nsamples,
                  "--seqlen", args.seqlen, "--batch-size", args.batch_size, "--seed", args.seed,
                  "--calib-tokens", tokens, "--out", out]
        if preset == "autoround":
            cmd = [AUTOROUND / ".venv" / "bin" / "python", AUTOROUND / "run_autoround.py", *shared,
                   "--bits", args.wbits, "--iters", args.iters, *shlex.split(flags)]
        else:  # AutoScheme's mixed bits: flags give --avg-bits, --options, --iters
            cmd = [AUTOROUND / ".venv" / "bin" / "python", AUTOROUND / "run_autoscheme.py", *shared,
                   *shlex.split(flags)]
        sh(cmd, log)
        info = json.loads((out / f"{preset}.json").read_text())
        wall, rss, split = info["quantize_wall_s"], info["peak_rss_mib"], {}
    else:
        steps = [] if preset in ("rtn", "gptq") else ["--iters", args.iters]
        recipe = [] if preset == "default" else ["--recipe", preset]  # default: what runs without --recipe
        cmd = [BIN / "crossblock", "quantize", "--model", args.model, "--calib", CALIB, "--out", out,
               *recipe, *common, *steps, "--quiet", "--overwrite", *shlex.split(flags)]
        sh(cmd, log)
        info = json.loads((out / "crossblock.json").read_text())
        wall, rss = info["wall_seconds"], info["peak_rss_mib"]
        # e.g. windows vs finetune: how a wall time was spent
        split = {"stage_s": info["stage_seconds"]} if info.get("stage_seconds") else {}
    second = {"ppl_tinystories": evaluate(out, args, log, SECOND)} if args.second_text else {}
    return scored(args, {"row": name, "ppl": evaluate(out, args, log), **second, "wall_s": wall, "peak_rss_mib": rss, **split,
                         "commit": commit, "command": portable(shlex.join(map(str, cmd))).replace(args.model, "$SMOLLM2")})


def portable(command: str) -> str:
    """A command as a reader can rerun it from the repository root."""
    return command.replace(str(ROOT) + "/", "").replace(str(SHARED), "$CROSSBLOCK_SHARED")


def write_table(jsonl: Path, args):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    fp = next((r["ppl"] for r in rows if r["row"] == "fp"), None)
    abits = getattr(args, "abits", 16)
    bits = f"W{args.wbits}" + (f"A{abits} (per-token dynamic asym activations)" if abits < 16 else "")
    group = "per-channel" if args.group_size == -1 else f"g{args.group_size}"
    lines = [f"# {jsonl.stem}", "",
             f"SmolLM2-135M-Instruct, {bits} {group} asym weights, WikiText-2 test perplexity "
             f"(`wiki.test.raw`, first {args.eval_windows} windows of {args.seqlen} tokens), calibration "
             f"{args.nsamples} x {args.seqlen} tokens from `wiki.valid.tokens` (seed {args.seed}), "
             f"{args.iters} steps per window, batch {args.batch_size}, torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}.",
             ""]
    kl = any("kl" in r for r in rows)
    if kl:
        lines += ["KL = mean KL(FP || quantized) per token, top-1 = agreement of the argmax with FP's, on the same "
                  "windows as the perplexity (`crossblock eval --reference`).", "",
                  "| row | ppl | gap to FP | KL | top-1 | TinyStories ppl | KL | top-1 | wall s | peak RSS MiB |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
    else:
        lines += ["| row | ppl | gap to FP | TinyStories ppl | wall s | peak RSS MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        gap = f"{r['ppl'] - fp:.2f}" if fp is not None else "-"
        second = f"{r['ppl_tinystories']:.2f}" if "ppl_tinystories" in r else "-"
        if kl:
            def f(key, fmt):
                return format(r[key], fmt) if key in r else "-"
            lines.append(f"| {r['row']} | {r['ppl']:.2f} | {gap} | {f('kl', '.4f')} | {f('top1', '.4f')} | {second} | "
                         f"{f('kl_tinystories', '.4f')} | {f('top1_tinystories', '.4f')} | {r.get('wall_s', '-')} | "
                         f"{r.get('peak_rss_mib', '-')} |")
        else:
            lines.append(f"| {r['row']} | {r['ppl']:.2f} | {gap} | {second} | {r.get('wall_s', '-')} | "
                         f"{r.get('peak_rss_mib', '-')} |")
    lines += ["", "Commands, from the repository root (`$SMOLLM2` = the folder prepare.py prints, "
              "`$CROSSBLOCK_SHARED` = ../shared):", ""]
    lines += [f"- {r['row']}" + (f" (commit {r['commit']})" if r.get("commit") else "") + f": `{portable(r['command'])}`"
              for r in rows]
    notes = jsonl.with_name(jsonl.stem + ".notes.md")  # hand-written findings, kept across rewrites
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    jsonl.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--name", required=True)
    p.add_argument("--rows", required=True, help="rows separated by , (or by ; when a row's flags hold commas)")
    p.add_argument("--model", default=None, help="default: SmolLM2-135M built by prepare.py")
    for flag, default in [("wbits", 2), ("group-size", 64), ("iters", 20), ("nsamples", 128), ("seqlen", 512),
                          ("batch-size", 8), ("seed", 0), ("eval-windows", 40), ("abits", 16)]:
        p.add_argument(f"--{flag}", type=int, default=default)
    p.add_argument("--second-text", action="store_true", help=f"also evaluate on {SECOND.name} (TinyStories)")
    p.add_argument("--kl", action="store_true", help="also KL(FP || Q) and top-1 agreement against FP (eval --reference)")
    args = p.parse_args()
    args.figures = {}
    args.model = args.model or prepare_model()
    work = ROOT / "bench" / "work" / args.name
    work.mkdir(parents=True, exist_ok=True)
    jsonl = ROOT / "bench" / "results" / f"{args.name}.jsonl"
    rows = [r for r in args.rows.split(";" if ";" in args.rows else ",") if r.strip()]  # ";": flags hold commas
    for row in rows:
        t0 = time.time()
        result = run_row(row, args, work, work / f"{row.split('=')[0]}.log")
        with open(jsonl, "a") as f:
            f.write(json.dumps(result) + "\n")
        write_table(jsonl, args)
        print(f"{result['row']}: ppl {result['ppl']:.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
