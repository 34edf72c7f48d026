#!/usr/bin/env python3
"""crossblock's GGUF files against llama.cpp itself (issue #18): llama.cpp's own forward pass
scores every file, and llama.cpp's own quantizer makes the files crossblock is compared with.

Runs in crossblock's venv. llama.cpp is llama-cpp-python, built by bench/llamacpp/setup.sh into
bench/llamacpp/.venv; that venv's site-packages is appended to sys.path at run time, so neither
venv gets the other's packages. One thread for the quantizers (timed) and, by default,
for scoring (EVAL_THREADS). Not run in CI.

    python bench/llamacpp.py fp                          # FP model -> F32 GGUF (crossblock's writer), scored
    python bench/llamacpp.py imatrix [--calib builtin]   # importance matrix of the FP model (calibration windows)
    python bench/llamacpp.py llama --type Q3_K [--imatrix] [--stock FTYPE] [--calib builtin]  # llama.cpp's quantizer, scored
    python bench/llamacpp.py crossblock --type Q3_K [--calib builtin]  # `crossblock quantize --format gguf` (best), scored

--calib: the calibration windows (128 x 512, seed 0) of crossblock and of the importance matrix:
`wiki` (WikiText-2 validation, the default) or `builtin` (crossblock's built-in mixed set).
    python bench/llamacpp.py fidelity --row cb-Q3_K      # llama.cpp vs `crossblock eval` on the same file
    python bench/llamacpp.py tokenizer                   # does llama.cpp's tokenizer give crossblock's ids?
    python bench/llamacpp.py table                       # rewrite the results table from the jsonl

Scoring: WikiText-2 test and TinyStories, first 40 windows of 512 tokens, tokenized by crossblock
(`crossblock.data.text.tokenize`, what `crossblock eval` scores), so both sides score the same ids;
each window is evaluated from an empty cache and its logits give exp(mean NLL) as in
crossblock/eval/perplexity.py.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from common import ROOT, SHARED  # noqa: E402

CALIB = {"wiki": SHARED / "data" / "wikitext2" / "wiki.valid.tokens", "builtin": "builtin"}
TEXTS = {"wikitext2": SHARED / "data" / "wikitext2" / "wiki.test.raw",
         "tinystories": SHARED / "data" / "tinystories" / "valid.txt"}
MODEL = Path(os.environ.get("SMOLLM2", Path.home() / ".cache" / "crossblock-assets" / "smollm2-135m-instruct"))
NAME = "gguf_llamacpp_smollm2"
WORK = ROOT / "bench" / "work" / NAME
JSONL = ROOT / "bench" / "results" / f"{NAME}.jsonl"
VENV = ROOT / "bench" / "llamacpp" / ".venv"
SEQLEN, WINDOWS, NSAMPLES, SEED = 512, 40, 128, 0
# ftype for a pure run of each type: llama.cpp takes the default type from the ftype; `pure`
# skips its per-layer mixture but still applies the width fallbacks, as crossblock does
PURE_FTYPE = {"Q4_K": "Q4_K_S", "Q3_K": "Q3_K_S", "Q2_K": "Q2_K", "Q4_0": "Q4_0", "Q5_0": "Q5_0"}
GGML_Q8_0 = 8


# -- llama.cpp ----------------------------------------------------------------------------------
def llama_cpp():
    site = next(VENV.glob("lib/python*/site-packages"), None)
    if site is None:
        raise SystemExit(f"no llama.cpp venv at {VENV}: run bench/llamacpp/setup.sh")
    if str(site) not in sys.path:
        sys.path.append(str(site))  # appended: crossblock's venv keeps precedence (numpy, ...)
    import llama_cpp as lc
    import llama_cpp.llama as high_level
    if not getattr(high_level, "plain_buffers", False):
        # no "extra" CPU buffer types (weight repacking, AMX tiles): on an AMX CPU this build segfaults
        # in decode with them for every quantized file (F32 is fine); without them ggml's plain CPU
        # kernels run, as on the CPUs the earlier rows were scored on
        default = lc.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p
        high_level.llama_cpp.llama_model_default_params, high_level.plain_buffers = params, True
    return lc


def llama_quantize(src: Path, dst: Path, ftype: str, pure: bool, imatrix: dict[str, np.ndarray] | None) -> float:
    """llama.cpp's quantizer (llama_model_quantize, one thread); returns its wall time."""
    lc = llama_cpp()
    params = lc.llama_model_quantize_default_params()
    params.nthread = 1
    params.ftype = getattr(lc, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if pure:
        params.pure = True
        params.token_embedding_type = GGML_Q8_0  # what llama.cpp's mixture (and crossblock) give a 576-wide head
    keep = []
    if imatrix:
        arrays = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
        # llama.h's llama_model_imatrix_data[], ended by an entry whose name is NULL
        entries = (lc.llama_model_imatrix_data * (len(arrays) + 1))()
        for e, name, a in zip(entries, imatrix, arrays):
            e.name, e.data, e.size = name.encode(), a.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), a.size
        keep = [entries, arrays]  # alive until the call returns
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(lc.llama_model_imatrix_data))
    t0 = time.time()
    rc = lc.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    wall = time.time() - t0
    del keep
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc}) for {dst}")
    return wall


def llama_ppl(path: Path, ids: np.ndarray) -> float:
    """Perplexity by llama.cpp's forward pass: non-overlapping windows, each from an empty cache."""
    lc = llama_cpp()
    # EVAL_THREADS (default 1): on a loaded machine ggml's spinning worker threads cost more than they give
    threads = int(os.environ.get("EVAL_THREADS", "1"))
    llm = lc.Llama(model_path=str(path), n_ctx=SEQLEN, n_batch=SEQLEN, n_ubatch=SEQLEN, logits_all=True,
                   n_threads=threads, n_threads_batch=threads, verbose=False)
    n = min(len(ids) // SEQLEN, WINDOWS)
    nll, count = 0.0, 0
    for w in range(n):
        window = ids[w * SEQLEN:(w + 1) * SEQLEN].tolist()
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:SEQLEN - 1], dtype=np.float64)   # position t predicts token t+1
        m = logits.max(axis=1)
        lse = m + np.log(np.exp(logits - m[:, None]).sum(axis=1))
        nll += float((lse - logits[np.arange(SEQLEN - 1), window[1:]]).sum())
        count += SEQLEN - 1
        if (w + 1) % 10 == 0:
            print(f"  {path.parent.name}: {w + 1}/{n} windows, ppl so far {math.exp(nll / count):.3f}",
                  file=sys.stderr, flush=True)
    llm.close() if hasattr(llm, "close") else None
    return math.exp(nll / count)


# -- crossblock side ----------------------------------------------------------------------------
def tokenizer():
    from crossblock import api
    return api.load_tokenizer(str(MODEL))


def eval_ids(text_path: Path, tok) -> np.ndarray:
    """The ids `crossblock eval` scores (first WINDOWS x SEQLEN are used)."""
    from crossblock.data.text import read_texts, tokenize
    return tokenize(tok, read_texts(text_path), enough=WINDOWS * SEQLEN).numpy()


def score(path: Path) -> dict:
    tok = tokenizer()
    return {f"ppl_{name}": round(llama_ppl(path, eval_ids(p, tok)), 4) for name, p in TEXTS.items()}


def file_facts(path: Path) -> dict:
    """Size, bits per weight (all tensors) and each tensor category's type(s), read back from the file."""
    import gguf
    r = gguf.GGUFReader(str(path))
    by_kind = defaultdict(Counter)
    nbytes = nelem = 0
    for t in r.tensors:
        kind = t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        by_kind[kind][t.tensor_type.name] += 1
        nbytes, nelem = nbytes + int(t.n_bytes), nelem + int(t.n_elements)
    types = {k: ", ".join(f"{t} x{n}" if len(c) > 1 else t for t, n in sorted(c.items())) for k, c in by_kind.items()}
    return {"file_mib": round(path.stat().st_size / 2**20, 2), "bpw": round(8 * nbytes / nelem, 3), "types": types}


def fp_gguf() -> Path:
    """The FP model as an F32 GGUF, written by crossblock's own writer (no layer carries a
    quantization record, so every tensor is written dense in the model's dtype, float32)."""
    out = WORK / "fp"
    path = out / "model.gguf"
    if not path.exists():
        from crossblock import api
        from crossblock.export.gguf import save_gguf
        model, tok = api.load_model(str(MODEL), dtype="float32")
        save_gguf(model, tok, out)
    return path


def suffix(calib: str) -> str:
    """Row and file names: the WikiText-calibrated ones (the first table) carry none."""
    return "" if calib == "wiki" else f"-{calib}"


def imatrix_path(calib: str) -> Path:
    return WORK / f"imatrix{suffix(calib)}.npz"


def calibration(tok, calib: str):
    """The 128 x 512 windows (seed 0) `crossblock quantize --calib CALIB[calib]` trains on: drawn by
    the function it draws them with (None: the built-in set)."""
    from crossblock.api import calibration_ids
    from crossblock.data.text import read_texts
    from crossblock.recipe import Data
    text = None if calib == "builtin" else read_texts(CALIB[calib])
    return calibration_ids(tok, text, Data(nsamples=NSAMPLES, seqlen=SEQLEN, seed=SEED))


def compute_imatrix(calib: str) -> Path:
    """llama-imatrix's statistic, computed here in torch: per weight matrix, the mean over
    calibration tokens of each input column's squared activation, under llama.cpp's tensor names.
    Same 128 x 512 windows crossblock calibrates on (seed 0)."""
    import gguf
    import torch
    from crossblock import api
    torch.set_num_threads(1)
    model, tok = api.load_model(str(MODEL), dtype="float32")
    ids = calibration(tok, calib)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    sums, counts = {}, Counter()

    def hook(name):
        def record(module, inputs, output=None):
            x = (output if output is not None else inputs[0]).detach().float().reshape(-1, module_width[name])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] += x.shape[0]
        return record

    module_width, handles = {}, []
    for key, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and key != "lm_head":
            name = names.get_name(key + ".weight", try_suffixes=(".weight",))
            module_width[name] = module.in_features
            handles.append(module.register_forward_pre_hook(hook(name)))
    # the tied output matmul reads the final norm's output: llama.cpp records it as token_embd
    module_width["token_embd.weight"] = model.config.hidden_size
    norm = model.model.norm
    handles.append(norm.register_forward_hook(lambda m, i, o: hook("token_embd.weight")(m, i, o)))
    t0 = time.time()
    with torch.no_grad():
        for i in range(0, len(ids), 4):
            model.model(input_ids=ids[i:i + 4], use_cache=False)  # the base model: no logits needed
    for h in handles:
        h.remove()
    mean = {k: (sums[k] / counts[k]).numpy() for k in sums}
    np.savez(imatrix_path(calib), **mean)
    print(f"imatrix ({calib}): {len(mean)} tensors, {counts['token_embd.weight']} tokens, {time.time() - t0:.0f} s")
    return imatrix_path(calib)


def append(row: dict):
    JSONL.parent.mkdir(parents=True, exist_ok=True)
    with open(JSONL, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    write_table()


def portable(command: str) -> str:
    return command.replace(str(ROOT) + "/", "").replace(str(SHARED), "$CROSSBLOCK_SHARED") \
        .replace(str(MODEL), "$SMOLLM2")


def this_command() -> str:
    return portable(shlex.join(["python", "bench/llamacpp.py", *sys.argv[1:]]))


# -- subcommands --------------------------------------------------------------------------------
def cmd_fp(args):
    path = fp_gguf()
    append({"row": "fp", "quantizer": "-", "type": "F32", **file_facts(path), **score(path),
            "command": this_command()})


def cmd_imatrix(args):
    compute_imatrix(args.calib)


def cmd_llama(args):
    src = fp_gguf()
    ftype = args.stock or PURE_FTYPE[args.type]
    row = (f"llama-{args.stock or args.type}" + ("-imatrix" if args.imatrix else "") + ("-stock" if args.stock else "")
           + (suffix(args.calib) if args.imatrix else ""))
    dst = WORK / row / "model.gguf"
    dst.parent.mkdir(parents=True, exist_ok=True)
    imatrix = dict(np.load(imatrix_path(args.calib))) if args.imatrix else None
    wall = llama_quantize(src, dst, ftype, pure=not args.stock, imatrix=imatrix)
    append({"row": row, "quantizer": "llama.cpp" + (" + imatrix" if args.imatrix else ""),
            "calib": args.calib if args.imatrix else "-", "type": args.stock or args.type, "ftype": ftype,
            "pure": not args.stock, "wall_s": round(wall, 2),
            **file_facts(dst), **score(dst), "command": this_command()})


def block_bpw(path: Path) -> float:
    """Bits per weight of a file's block linears (blk.*, 2-D), as crossblock's --bpw counts them."""
    import gguf
    ts = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return 8 * sum(int(t.n_bytes) for t in ts) / sum(int(t.n_elements) for t in ts)


def cmd_crossblock(args):
    row = (f"cb-{args.type}" if args.recipe == "best" else f"cb-{args.recipe}-{args.type}") + suffix(args.calib)
    flags = shlex.split(args.flags)
    if args.bpw_of:  # mixed precision at the block-linear bits of a llama.cpp file (its mixture)
        row = f"cb-mixed-{args.bpw_of}"
        budget = args.bpw or block_bpw(WORK / args.bpw_of / "model.gguf")
        flags += ["--bpw", f"{budget:.4f}", "--bits-options", args.options, "--bits-tie", "none"]
    row += f"-{args.tag}" if args.tag else ""
    out = WORK / row
    cmd = [str(Path(sys.executable).parent / "crossblock"), "quantize", "--model", str(MODEL), "--calib", str(CALIB[args.calib]),
           "--out", str(out), "--format", "gguf", "--gguf-type", args.type, "--recipe", args.recipe,
           "--nsamples", str(NSAMPLES), "--seqlen", str(SEQLEN), "--seed", str(SEED), "--quiet", "--overwrite",
           *flags]
    if not (out / "crossblock.json").exists():  # a row quantized earlier (e.g. under nohup) is reused
        subprocess.run(cmd, check=True)
    info = json.loads((out / "crossblock.json").read_text())
    append({"row": row, "quantizer": f"crossblock {args.recipe}", "calib": args.calib,
            "type": f"mixed {args.options}" if args.bpw_of else args.type,
            "wall_s": info.get("wall_seconds"), "peak_rss_mib": info.get("peak_rss_mib"),
            **file_facts(out / "model.gguf"), **score(out / "model.gguf"), "command": portable(shlex.join(cmd))})


def cmd_fidelity(args):
    """llama.cpp's perplexity of a crossblock GGUF vs crossblock's own evaluation of it."""
    import torch
    from crossblock import api
    torch.set_num_threads(int(os.environ.get("EVAL_THREADS", "1")))
    out = WORK / args.row
    tok = tokenizer()
    model = api.load(str(out))
    text = TEXTS["wikitext2"]
    from crossblock.data.text import read_texts
    ours = api.evaluate(model, tok, read_texts(text), SEQLEN, WINDOWS, progress=False)
    print(f"crossblock eval of {out.name}: {ours:.4f}", flush=True)
    # llama.cpp's side: the row's own score when it was scored already (same ids, same file)
    rows = [json.loads(line) for line in JSONL.read_text().splitlines()] if JSONL.exists() else []
    scored = [r["ppl_wikitext2"] for r in rows if r["row"] == args.row]
    theirs = scored[-1] if scored else llama_ppl(out / "model.gguf", eval_ids(text, tok))
    row = {"fidelity": args.row, "crossblock_eval": round(ours, 4), "llama_cpp": round(theirs, 4),
           "rel_diff": round(theirs / ours - 1, 5), "command": this_command()}
    with open(JSONL.with_name(NAME + ".fidelity.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


def cmd_tokenizer(args):
    """Whether llama.cpp's tokenizer (from the GGUF crossblock wrote) gives crossblock's ids."""
    lc = llama_cpp()
    tok = tokenizer()
    llm = lc.Llama(model_path=str(fp_gguf()), vocab_only=True, verbose=False)
    for name, path in TEXTS.items():
        text = path.read_text(encoding="utf-8")[:200_000]
        ours = tok(text, add_special_tokens=False)["input_ids"]
        theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        print(f"{name}: crossblock {len(ours)} ids, llama.cpp {len(theirs)} ids, first difference at {first}")


def gap_closed(r, ref, fp, key="ppl_wikitext2") -> str:
    """Share of `ref`'s perplexity gap to FP that row `r` closes (negative: r is worse)."""
    if not (fp and ref) or r is ref:
        return "-"
    return f"{100 * (ref[key] - r[key]) / (ref[key] - fp[key]):+.0f}%"


def write_table():
    """The rows as a markdown table (bench/results/NAME.table.md), pasted into the results page.
    A row is compared with llama.cpp without an importance matrix and with one from its own
    calibration windows (rows from before `calib` was recorded calibrated on WikiText)."""
    rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    fp = next((r for r in rows if r["row"] == "fp"), None)
    plain = {r["type"]: r for r in rows if r["row"] == f"llama-{r['type']}"}
    # a stock row of a pure type (llama.cpp's own Q2_K mixture) is not the reference of that type's pure rows
    imat = {(r["type"], r.get("calib", "wiki")): r for r in rows if r["row"].startswith(f"llama-{r['type']}-imatrix")
            and not (r["row"].endswith(("-stock", "-stock-builtin")) and r["type"] in PURE_FTYPE)}
    lines = ["| row | quantizer | calib | type | bpw | file MiB | WikiText-2 ppl | TinyStories ppl | gap closed vs "
             "llama.cpp (wiki / stories) | vs llama.cpp + imatrix, same calib | quantizer wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        plain_row = r["row"] == "fp" or (r["row"].startswith("llama-") and "-imatrix" not in r["row"])
        calib = r.get("calib", "-" if plain_row else "wiki")
        refs = (plain.get(r["type"]), imat.get((r["type"], calib)))
        vs = [" / ".join(gap_closed(r, ref, fp, k) for k in ("ppl_wikitext2", "ppl_tinystories"))
              if r["row"] != "fp" and ref not in (None, r) else "-" for ref in refs]
        lines.append(f"| {r['row']} | {r['quantizer']} | {calib} | {r['type']} | {r['bpw']} | {r['file_mib']} | "
                     f"{r['ppl_wikitext2']:.2f} | {r['ppl_tinystories']:.2f} | {vs[0]} | {vs[1]} | {r.get('wall_s', '-')} |")
    JSONL.with_suffix(".table.md").write_text("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fp")
    calib = dict(choices=sorted(CALIB), default="wiki", help="calibration windows (default wiki)")
    sub.add_parser("imatrix").add_argument("--calib", **calib)
    q = sub.add_parser("llama")
    q.add_argument("--type", default=None)
    q.add_argument("--imatrix", action="store_true")
    q.add_argument("--stock", default=None, help="a llama.cpp ftype (Q3_K_M, Q2_K, ...): its own mixture, not pure")
    q.add_argument("--calib", **calib)
    c = sub.add_parser("crossblock")
    c.add_argument("--type", required=True)
    c.add_argument("--recipe", default="best")
    c.add_argument("--calib", **calib)
    c.add_argument("--bpw-of", default=None, metavar="ROW",
                   help="mixed precision (--bpw) at the block-linear bits per weight of llama.cpp row ROW's file")
    c.add_argument("--options", default="Q2_K,Q3_K,Q4_K,Q5_K,Q6_K", help="--bits-options of a --bpw-of row")
    c.add_argument("--bpw", type=float, default=None,
                   help="with --bpw-of: the budget itself, when ROW's file is not on this machine (its jsonl row's)")
    c.add_argument("--flags", default="", help="extra crossblock quantize flags")
    c.add_argument("--tag", default="", help="suffix of the row's name: a variant's --flags")
    f = sub.add_parser("fidelity")
    f.add_argument("--row", required=True)
    sub.add_parser("tokenizer")
    sub.add_parser("table")
    args = p.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    {"fp": cmd_fp, "imatrix": cmd_imatrix, "llama": cmd_llama, "crossblock": cmd_crossblock,
     "fidelity": cmd_fidelity, "tokenizer": cmd_tokenizer, "table": lambda a: write_table()}[args.cmd](args)


if __name__ == "__main__":
    main()
