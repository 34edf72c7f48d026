#!/usr/bin/env python3
"""Peak RSS of the in-memory and the low-memory (--low-memory, stream.py) paths, same run otherwise.

    python bench/low_memory.py [--only smollm2-fp32,llama-8] [--nsamples 16 --seqlen 256]

Rows: SmolLM2-135M-Instruct loaded in float32 and in bfloat16, and a randomly initialized Llama
of about 1 GB of bfloat16 weights (hidden 2048, 49152 tokens) at 8 and at 16 blocks, built by
this script into /tmp. Each run is its own `crossblock quantize` process (one torch thread, rows
one at a time), recipe RTN W4 g128 (the cheapest: the memory of interest is the weights', not a
method's); its peak RSS is the child's ru_maxrss from wait4, so it covers loading, quantizing and
writing the folder. The chains (calibration activations, float32) are computed and subtracted:
at most 4 chain-sized tensors are alive (fp and q chains, and the next of each during a block
step). Every row also checks that both paths wrote the same files, byte for byte.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from common import ROOT, SHARED

SMOLLM2 = Path.home() / ".cache" / "crossblock-assets" / "smollm2-135m-instruct"
CALIB = SHARED / "data" / "tinystories" / "valid.txt"
MIB = 2 ** 20


def random_llama(blocks: int) -> Path:
    """A random Llama (hidden 2048, 16 heads, MLP 5632, 49152 tokens, untied head) in bfloat16,
    with SmolLM2's tokenizer (and its 49152-token vocabulary). Built in a child process: a child
    forked from a parent that held the model would start with the parent's RSS in its ru_maxrss."""
    folder = Path(f"/tmp/crossblock-bench-llama-{blocks}")
    if not (folder / "config.json").is_file():
        subprocess.run([sys.executable, __file__, "--build", str(blocks)], check=True)
    return folder


def build_llama(blocks: int):
    folder = Path(f"/tmp/crossblock-bench-llama-{blocks}")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=blocks,
                         num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False,
                         max_position_embeddings=2048, dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="1GB")
    AutoTokenizer.from_pretrained(SMOLLM2).save_pretrained(folder)


def block_bytes(model: Path, dtype: str) -> tuple[int, int, int]:
    """(bytes of one block's weights, of all weights, hidden size) in the dtype they are loaded in."""
    from safetensors import safe_open
    per_block, total = 0, 0
    width = {"float32": 4, "bfloat16": 2}[dtype]
    for f in model.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                n = 1
                for d in st.get_slice(k).get_shape():
                    n *= d
                total += n * width
                if ".layers.0." in k:
                    per_block += n * width
    hidden = json.loads((model / "config.json").read_text())["hidden_size"]
    return per_block, total, hidden


def run(cmd: list[str]) -> int:
    """Peak RSS (bytes) of the child process."""
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {shlex.join(cmd)}")
    return usage.ru_maxrss * 1024


def digest(folder: Path) -> dict:
    """sha256 of every file but crossblock.json, read in chunks: this process must stay small, since
    a child's ru_maxrss starts from the RSS of the process it was forked from (Linux keeps the
    high-water mark across exec). Reading whole shards here inflated every later row (session 6's
    unexplained 2,175 MiB)."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.name != "crossblock.json":
            h = hashlib.sha256()
            with open(f, "rb") as src:
                while chunk := src.read(1 << 24):
                    h.update(chunk)
            out[f.name] = h.hexdigest()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="smollm2-fp32,smollm2-bf16,llama-8,llama-16")
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--recipe", default="--recipe rtn --wbits 4 --group-size 128")
    p.add_argument("--build", type=int, help=argparse.SUPPRESS)  # (the child that builds a random Llama)
    a = p.parse_args()
    if a.build:
        return build_llama(a.build)
    rows = {"smollm2-fp32": (SMOLLM2, "float32"), "smollm2-bf16": (SMOLLM2, "bfloat16"),
            "llama-8": (None, "bfloat16"), "llama-16": (None, "bfloat16")}
    work = Path("/tmp/crossblock-bench-low-memory")
    exe = str(Path(sys.executable).parent / "crossblock")
    baseline = run([sys.executable, "-c", "import crossblock.api, transformers, torch; "
                    f"from transformers import AutoTokenizer; AutoTokenizer.from_pretrained('{SMOLLM2}')"])
    results = []
    for name in a.only.split(","):
        model, dtype = rows[name]
        model = model or random_llama(int(name.split("-")[1]))
        block, total, hidden = block_bytes(model, dtype)
        chains = 4 * a.nsamples * a.seqlen * hidden * 4
        peaks, cmds, files = {}, {}, {}
        for path in ("no-low-memory", "low-memory"):
            out = work / f"{name}-{path}"
            cmd = [exe, "quantize", "--model", str(model), "--calib", str(CALIB), "--out", str(out), "--overwrite",
                   "--dtype", dtype, "--nsamples", str(a.nsamples), "--seqlen", str(a.seqlen), "--quiet",
                   f"--{path}", *shlex.split(a.recipe)]
            peaks[path], cmds[path], files[path] = run(cmd), shlex.join(cmd), digest(out)
        over = peaks["low-memory"] - chains - 3 * block
        results.append(dict(name=name, dtype=dtype, weights=total, block=block, chains=chains, peaks=peaks,
                            cmds=cmds, same=files["low-memory"] == files["no-low-memory"], over=over))
        print(json.dumps({k: v for k, v in results[-1].items() if k != "cmds"}), flush=True)
    commit = os.environ.get("CROSSBLOCK_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = ["# Peak RSS: in-memory vs --low-memory", "",
             f"Commit {commit}; `python bench/low_memory.py --only {a.only} --nsamples {a.nsamples} --seqlen {a.seqlen}`; "
             f"recipe `{a.recipe}` (RTN), {a.nsamples} x {a.seqlen} calibration tokens, one torch thread, CPU. "
             f"Peak RSS = the child's ru_maxrss (loading, quantizing and writing). Chains = 4 x nsamples x seqlen x "
             f"hidden x 4 bytes (an upper bound on the activations alive at once). Target for the low-memory path: "
             f"peak RSS - chains <= 3 blocks + 400 MiB. A process that only imports crossblock, torch and "
             f"transformers and loads the tokenizer peaks at {baseline / MIB:.0f} MiB.", "",
             "| model | loaded as | weights MiB | one block MiB | chains MiB | in-memory peak MiB | low-memory peak MiB "
             "| low-memory peak - chains - 3 blocks MiB (target <= 400) | same files |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['dtype']} | {r['weights'] / MIB:.0f} | {r['block'] / MIB:.1f} | "
                     f"{r['chains'] / MIB:.1f} | {r['peaks']['no-low-memory'] / MIB:.0f} | "
                     f"{r['peaks']['low-memory'] / MIB:.0f} | {r['over'] / MIB:.0f} | {r['same']} |")
    lines += ["", "Commands:", ""] + [f"- {r['name']} {k}: `{c}`" for r in results for k, c in r["cmds"].items()]
    out = ROOT / "bench" / "results" / "low_memory.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
