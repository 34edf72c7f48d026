"""OUT/README.md: a Hugging Face model card for a crossblock output folder, written from its
crossblock.json: what was done (recipe, grid, calibration), how well (output error against FP and
RTN, the save check), what it costs (file size) and the commands that load it."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from .formats import FORMATS

CARD_FILE = "README.md"
WEIGHT_FILES = ("model.safetensors", "model-*-of-*.safetensors", "model.gguf")

def grid_line(recipe: dict, bits: dict | None = None) -> str:
    grid = recipe.get("grid", {})
    if grid.get("type") == "gguf":
        line = f"GGUF {grid.get('quant')}"
    else:
        group = "per channel" if grid.get("group_size") == -1 else f"groups of {grid.get('group_size')}"
        line = f"{grid.get('bits')}-bit uniform, {group}, {'symmetric' if grid.get('sym') else 'asymmetric'}"
    if not bits:
        return line
    counts = {}  # mixed precision (stages/bits.py): how many layer groups got each option
    for unit in bits["units"]:
        counts[unit["option"]] = counts.get(unit["option"], 0) + 1
    spread = ", ".join(f"{n} at {o}" for o, n in sorted(counts.items()))
    return (f"mixed precision, {bits['bpw']} stored bits per weight (budget {bits['bpw_asked']}): layer groups "
            f"{spread}, chosen by {bits['measure']} sensitivity; options of the grid {line}")


def final_name(folder: Path) -> str:
    """The output folder's name (cards are written in its staging folder, `.NAME.partial`)."""
    name = Path(folder).name
    return name[1:-len(".partial")] if name.startswith(".") and name.endswith(".partial") else name


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for pattern in WEIGHT_FILES for f in Path(folder).glob(pattern))


def card(folder: Path, info: dict) -> str:
    recipe = info.get("recipe") or {}
    model = str(info.get("model", ""))
    fmt = info.get("format", "fake")
    acts = info.get("activations")
    header = {"library_name": "transformers", "pipeline_tag": "text-generation",
              "tags": ["crossblock", "quantized", fmt, *(["gguf"] if fmt == "gguf" else [])]}
    if model and not Path(model).exists() and model.count("/") == 1:  # a hub id (a local path names nothing)
        header["base_model"] = model
    rows = [("base model", f"`{model}`" if model else "-"), ("recipe", f"`{recipe.get('name', '-')}`"),
            ("weights", grid_line(recipe, info.get("bits")) if recipe else "-"),
            ("activations", f"{acts['bits']}-bit, {'dynamic per token' if acts.get('dynamic') else 'static'}"
             if acts else "full precision"), ("format", f"`{fmt}`")]
    calib = info.get("calibration")
    if calib:
        sources = calib.get("sources")
        origin = (" from " + ", ".join(f"{s['source']} ({s['windows']})" for s in sources)) if sources else \
            (" from " + ", ".join(f"`{Path(f).name}`" for f in calib["files"])) if calib.get("files") else ""
        rows.append(("calibration", f"{calib['nsamples']} x {calib['seqlen']} tokens{origin} "
                                    f"(sha256 of the ids `{calib['sha256'][:16]}`)"))
    blocks = info.get("blocks")
    if blocks:
        last = blocks[-1]
        rtn = f" (RTN: {last['rtn']['rel_mse']:.4g})" if "rtn" in last else ""
        rows.append(("last block's output error vs FP", f"relative MSE {last['rel_mse']:.4g}{rtn}"))
    quality = info.get("quality") or {}
    if "kl" in quality:
        rows.append(("held-out calibration text vs FP", f"KL(FP‖Q) {quality['kl']:.4g} nats per token, top-1 agreement "
                     f"{quality['top1']:.2%}, perplexity {quality['ppl']:.4g} (FP {quality['ppl_reference']:.4g}) "
                     f"on {quality['windows']}"))
    elif "skipped" in quality:
        rows.append(("held-out calibration text vs FP", f"skipped: {quality['skipped']}"))
    check = info.get("save_check") or {}
    if "max_rel_logit_diff" in check:
        rows.append(("save check", f"this folder read back gives the quantized model's logits to "
                                   f"{check['max_rel_logit_diff']:.2g} of the largest (tolerance {check['tolerance']:g})"))
    elif "skipped" in check:
        rows.append(("save check", f"skipped: {check['skipped']}"))
    size = weight_bytes(folder)
    rows.append(("weight files", f"{size / 2 ** 20:,.1f} MiB"))
    precision = info.get("precision")
    if precision:
        rows.append(("compute precision", f"{precision['used']} ({precision['why']})"))
    if info.get("wall_seconds") is not None:
        rows.append(("quantization time", f"{info['wall_seconds']:,.0f} s on {info.get('device', '?')}"))
    versions = info.get("versions") or {}
    title = Path(model).name or "model"
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {title}, quantized with crossblock", "",
             "Post-training quantization by cross-block reconstruction "
             f"(crossblock {versions.get('crossblock', '')}). `crossblock.json` in this folder records "
             "everything below and per-block figures.", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    loading = (FORMATS[fmt] if fmt in FORMATS else FORMATS["fake"]).loading  # each format says how it is loaded
    lines += ["", "## Loading", "", loading.format(out=final_name(folder)), ""]
    return "\n".join(lines)


def write_card(folder: Path, report_file: str = "crossblock.json"):
    info = json.loads((Path(folder) / report_file).read_text())
    (Path(folder) / CARD_FILE).write_text(card(folder, info))
