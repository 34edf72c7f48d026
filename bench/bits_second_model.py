#!/usr/bin/env python3
"""Mixed precision on a second real model: stories260k (Llama, 5 blocks, hidden 64), GPTQ in
activation order, uniform grids against mixtures chosen by `fisher` and by `gptq`, at several
calibration draws. It asks the question SmolLM2 alone cannot settle: which measure to use under
GPTQ's rounding.

    OMP_NUM_THREADS=1 python bench/bits_second_model.py --seeds 0,1,2,3,4

Calibration: TinyStories `valid.txt` (the model's own domain), 128 x 256 tokens; scored on
`valid.partial.txt` (TinyStories text that is not in valid.txt) and WikiText-2 test (off-domain),
first 40 windows of 256 tokens, perplexity and KL to FP.
"""
import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, SHARED

MODEL = SHARED / "models" / "stories260k"
CALIB = SHARED / "data" / "tinystories" / "valid.txt"
TEXTS = {"tinystories": SHARED / "data" / "tinystories" / "valid.partial.txt",
         "wiki": SHARED / "data" / "wikitext2" / "wiki.test.raw"}
BIN = Path(sys.executable).parent
# uniform grids, and budgets between them with the options a mixture chooses from: at the uniform
# grids' own bpw (3.61, 4.64) the allocation is the uniform grid itself here (every unit's costs fall
# about 5x per bit, so no trade of one unit's bit for another's pays), so the measures are compared
# where a mixture must trade
UNIFORM = {"W2 g32": "--wbits 2", "W3 g32": "--wbits 3", "W4 g32": "--wbits 4"}
BUDGETS = {"3.0": "2g32,3g32,4g32", "4.0": "3g32,4g32,8g32"}
MEASURES = ("fisher", "gptq")


def run(cmd: list) -> str:
    r = subprocess.run(list(map(str, cmd)), capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"failed ({r.returncode}): {shlex.join(map(str, cmd))}\n{r.stderr[-2000:]}")
    return r.stdout


def portable(cmd: list) -> str:
    """A command as a reader reruns it from the repository root."""
    text = shlex.join(map(str, cmd)).replace(str(BIN) + "/", ".venv/bin/")
    return text.replace(str(SHARED), "$CROSSBLOCK_SHARED").replace(str(ROOT) + "/", "")


def row(name: str, flags: str, seed: int, work: Path) -> dict:
    out = work / name
    cmd = [BIN / "crossblock", "quantize", "--model", MODEL, "--calib", CALIB, "--out", out, "--recipe", "gptq",
           "--group-size", 32,
           "--nsamples", 128, "--seqlen", 256, "--seed", seed, "--quiet", "--overwrite", *shlex.split(flags)]
    run(cmd)
    info = json.loads((out / "crossblock.json").read_text())
    result = {"row": name, "seed": seed, "wall_s": info["wall_seconds"],
              "command": portable(cmd)}
    for key, text in TEXTS.items():
        figures = json.loads(run([BIN / "crossblock", "eval", "--model", out, "--ppl", text, "--seqlen", 256,
                                  "--max-windows", 40, "--reference", MODEL, "--json", "--quiet"]).strip().splitlines()[-1])
        result.update({f"ppl_{key}": figures["ppl"], f"kl_{key}": figures["kl"], f"fp_{key}": figures["ppl_reference"]})
    return result


def write_table(jsonl: Path):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    names = list(dict.fromkeys(r["row"] for r in rows))
    seeds = sorted({r["seed"] for r in rows})
    cell = {(r["seed"], r["row"]): r for r in rows}
    fp = {k: rows[0][f"fp_{k}"] for k in TEXTS} if rows else {}
    lines = [f"# {jsonl.stem}", "", " ".join(__doc__.split("\n\n")[0].splitlines()), "",
             " ".join(__doc__.split("\n\n")[2].splitlines()), "",
             f"FP: TinyStories {fp.get('tinystories', 0):.3f}, WikiText-2 {fp.get('wiki', 0):.2f}. Each cell: "
             "TinyStories / WikiText-2 perplexity (KL to FP below the means).", "",
             "| seed | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]

    def figures(key, seed_rows):
        return " / ".join(f"{sum(r[f'{key}_{t}'] for r in seed_rows) / len(seed_rows):.{3 if t == 'tinystories' else 2}f}"
                          for t in TEXTS)
    for seed in seeds:
        lines.append(f"| {seed} | " + " | ".join(figures("ppl", [cell[seed, n]]) if (seed, n) in cell else "-"
                                                for n in names) + " |")
    for key in ("ppl", "kl"):
        full = [n for n in names if all((s, n) in cell for s in seeds)]
        lines.append(f"| mean {key} | " + " | ".join(figures(key, [cell[s, n] for s in seeds]) if n in full else "-"
                                                   for n in names) + " |")
    lines += ["", "Commands (the commit each row ran on):", ""]
    lines += [f"- seed {r['seed']} {r['row']} ({r['commit']}): `{r['command']}`" for r in rows]
    notes = jsonl.with_name(jsonl.stem + ".notes.md")
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    jsonl.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--name", default="bits_stories260k")
    p.add_argument("--rows", default="", help="only these rows, e.g. '3.0 gptq,4.0 gptq' (default: all)")
    args = p.parse_args()
    commit = run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"]).strip()
    work = ROOT / "bench" / "work" / args.name
    jsonl = ROOT / "bench" / "results" / f"{args.name}.jsonl"
    for seed in map(int, args.seeds.split(",")):
        rows = [(name, name, flags) for name, flags in UNIFORM.items()]
        rows += [(budget, f"{budget} {m}", f"--bpw {budget} --bits-options {options} --bits-measure {m}")
                 for budget, options in BUDGETS.items() for m in MEASURES]
        for budget, name, flags in rows:
            if args.rows and name not in args.rows.split(","):
                continue
            t0 = time.time()
            result = {"budget": budget, **row(f"s{seed}-{name.replace(' ', '-')}", flags, seed, work), "commit": commit}
            result["row"] = name
            with open(jsonl, "a") as f:
                f.write(json.dumps(result) + "\n")
            write_table(jsonl)
            print(f"seed {seed} {name}: {result['ppl_tinystories']:.3f} / {result['ppl_wiki']:.2f} "
                  f"({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
