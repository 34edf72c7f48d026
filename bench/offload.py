#!/usr/bin/env python3
"""Peak RSS with activation chains in RAM vs memory-mapped on disk (same run otherwise).

    python bench/offload.py --model DIR --calib FILE --nsamples 512 --seqlen 512 --name NAME [--blocks 4]

Each mode is a separate `crossblock quantize` process; its crossblock.json gives peak RSS and
wall time. Also checks that both modes wrote byte-identical weights. `--blocks N` first saves
the model cut to its first N blocks (the chains, which are what offloading moves, keep their
full size; only the weights and the run time shrink).
"""
import json
import shlex
import subprocess
import sys
from pathlib import Path

from common import ROOT, parser


def truncated(model: str, blocks: int, out: Path) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crossblock.compare import keep_first_blocks
    m = keep_first_blocks(AutoModelForCausalLM.from_pretrained(model), blocks)
    m.save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return str(out)


def main():
    p = parser(__doc__)
    p.add_argument("--nsamples", type=int, default=512)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--extra", default="--recipe block --iters 5 --group-size -1 --wbits 3")
    p.add_argument("--blocks", type=int, default=None)
    a = p.parse_args()
    work = ROOT / "bench" / "work" / a.name
    model_note = ""
    if a.blocks:
        a.model, model_note = truncated(a.model, a.blocks, work / f"model-{a.blocks}-blocks"), \
            f" Model cut to its first {a.blocks} blocks (`--blocks {a.blocks}`)."
    rows = []
    for mode in ("ram", "disk"):
        out = work / mode
        cmd = [str(Path(sys.executable).parent / "crossblock"), "quantize", "--model", a.model, "--calib", a.calib,
               "--out", str(out), "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--quiet",
               "--overwrite", "--offload", mode, *shlex.split(a.extra)]
        subprocess.run(cmd, check=True)
        info = json.loads((out / "crossblock.json").read_text())
        rows.append((mode, info["peak_rss_mib"], info["wall_seconds"], shlex.join(cmd).replace(str(ROOT) + "/", "")))
    same = (work / "ram" / "model.safetensors").read_bytes() == (work / "disk" / "model.safetensors").read_bytes()
    lines = [f"# {a.name}", "", f"{a.nsamples} x {a.seqlen} calibration tokens; weights identical in both modes: {same}.{model_note}",
             "", "| offload | peak RSS MiB | wall s |", "|---|---|---|"]
    lines += [f"| {m} | {rss} | {wall} |" for m, rss, wall, _ in rows]
    lines += [f"", f"RSS ratio disk/ram: {rows[1][1] / rows[0][1]:.2f}", ""]
    lines += [f"- {m}: `{cmd}`" for m, _, _, cmd in rows]
    (ROOT / "bench" / "results" / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
