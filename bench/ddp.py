#!/usr/bin/env python3
"""Wall time of one recipe with 1 process vs N torchrun ranks (gloo on CPU), same global batch.

    python bench/ddp.py --model DIR --calib FILE --ranks 2 --name NAME [--extra "recipe flags"]

Each rank uses one torch thread, the single process too, so on an idle N-core machine the ratio
shows what data parallelism buys for this recipe.
"""
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, parser


def main():
    p = parser(__doc__)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--extra", default="--recipe block --wbits 3 --group-size -1 --iters 50 --nsamples 64 "
                                      "--seqlen 256 --batch-size 8")
    a = p.parse_args()
    bindir = Path(sys.executable).parent
    work = ROOT / "bench" / "work" / a.name
    rows = []
    for ranks in (1, a.ranks):
        out = work / f"ranks{ranks}"
        launcher = [str(bindir / "crossblock")] if ranks == 1 else \
            [shutil.which("torchrun", path=str(bindir)), "--standalone", f"--nproc-per-node={ranks}", "-m", "crossblock"]
        cmd = [*launcher, "quantize", "--model", a.model, "--calib", a.calib, "--out", str(out), "--quiet",
               "--overwrite", *shlex.split(a.extra)]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        info = json.loads((out / "crossblock.json").read_text())
        rows.append((ranks, info["wall_seconds"], time.time() - t0, info["blocks"][-1]["mse"],
                     shlex.join(cmd).replace(str(ROOT) + "/", "")))
    lines = [f"# {a.name}", "", f"Recipe flags: `{a.extra}`; one torch thread per process.", "",
             "| ranks | quantize wall s | process wall s | last-block MSE |", "|---|---|---|---|"]
    lines += [f"| {r} | {w:.1f} | {t:.1f} | {m:.6g} |" for r, w, t, m, _ in rows]
    lines += ["", f"Speed-up of {a.ranks} ranks over 1 (quantize wall time): {rows[0][1] / rows[1][1]:.2f}x", ""]
    lines += [f"- {r} rank(s): `{c}`" for r, _, _, _, c in rows]
    (ROOT / "bench" / "results" / f"{a.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
