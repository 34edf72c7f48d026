"""The Python API: load a model, quantize it in place, save it, evaluate it.

    import crossblock as cb
    model, tok = cb.load_model("path/or/hub-id")
    recipe = cb.Recipe.preset("cbq", wbits=2, group_size=64)
    model, report = cb.quantize(model, tok, recipe, calib=texts, format="gptq")  # in place
    cb.save(model, tok, "out/", format="gptq", report=report)

`quantize_folder` is the whole command-line job (model path in, finished folder out, resumable,
torchrun-aware); the CLI only parses its flags and calls it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from .data.text import calibration_windows, digest, tokenize
from .distributed import barrier, is_main, rank_and_size
from .engine.checkpoint import read_checkpoint, write_checkpoint
from .errors import CrossblockError
from .eval.perplexity import perplexity
from .model.adapter import block_experts, block_linears, find_blocks, unquantized_weights
from .quant.experts import expert_params
from .output import partial_dir, staged_dir
from .quant import act as act_quant
from .quant.linear import is_conv1d, restore_quantized, weight_of
from .recipe import Recipe
from .stages import Job

REPORT_FILE = "crossblock.json"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32"):
    """A transformers causal LM and its tokenizer, from a local folder or a hub id."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise CrossblockError(f"model not found: {name_or_path} is not a folder with a config.json")
    source = str(path) if looks_local else name_or_path
    dtype = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    try:
        stored = AutoConfig.from_pretrained(source).dtype
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        model.crossblock_stored_dtype = str(stored).removeprefix("torch.") if stored else None  # see checkpoint_dtype
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossblockError(f"cannot load model {name_or_path}: {first}") from None
    return model.eval(), tokenizer


def checkpoint_dtype(model) -> torch.dtype:
    """The dtype the model's weights were stored in (its config's), whatever it was loaded in."""
    dtype = getattr(model, "crossblock_stored_dtype", None) or model.config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_weights_finite(model):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CrossblockError(f"model weight {name} contains NaN or Inf values")


def quantized_layers(model, skip=()) -> dict[str, torch.nn.Module]:
    """The linear layers of every block that a recipe with `skip` quantizes, by full name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks)
            for n, m in block_linears(b) if not any(s in n for s in skip)}


def quantized_experts(model, skip=()) -> dict[str, torch.Tensor]:
    """The fused 3-D expert parameters a recipe with `skip` quantizes (E, out, in), by full name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}.{p}": t for i, b in enumerate(blocks) for n, m in block_experts(b)
            if not any(s in n for s in skip) for p, t in expert_params(m).items()}


def matrix_shapes(model, skip=()) -> dict[str, tuple[int, int]]:
    """(out, in) of every matrix a recipe with `skip` quantizes: each linear, each expert's."""
    shapes = {n: tuple(weight_of(m).shape) for n, m in quantized_layers(model, skip).items()}
    return {**shapes, **{n: tuple(t.shape[1:]) for n, t in quantized_experts(model, skip).items()}}


def print_unquantized(left: list[dict]):
    """One stderr line: how many block weights stay in full precision, and where they are listed."""
    if left and is_main():
        counts = {}
        for w in left:
            counts[w["why"]] = counts.get(w["why"], 0) + 1
        kinds = ", ".join(f"{why} {n}" for why, n in sorted(counts.items()))
        print(f"crossblock: {len(left)} block weights left in full precision ({kinds}); "
              f"listed under \"unquantized\" in {REPORT_FILE}", file=sys.stderr)


def calibration_ids(tokenizer, calib, data) -> torch.Tensor:
    """Texts (a string or a list of strings) or ready token windows (nsamples, seqlen); `data` is
    a recipe's data section (nsamples, seqlen, seed)."""
    if torch.is_tensor(calib):
        if calib.dim() != 2 or calib.shape[1] < 2:
            raise CrossblockError(f"calibration ids must be (nsamples, seqlen), got {tuple(calib.shape)}")
        return calib.long()
    text = calib if isinstance(calib, str) else "\n\n".join(calib)
    return calibration_windows(tokenize(tokenizer, text), data.nsamples, data.seqlen, data.seed)


def fingerprint(model, recipe: Recipe, ids: torch.Tensor) -> str:
    """Identity of a run: model (config and a checksum of every weight), recipe, calibration ids."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(digest(ids).encode())
    h.update(model.config.to_json_string().encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item()!r}".encode())
    return h.hexdigest()


def for_format(recipe: Recipe, model, format: str = "fake", save_dtype: torch.dtype | None = None) -> Recipe:
    """The recipe as it must run to be written in `format`: refused if the format cannot store it
    (before any work), and with scales rounded to the dtype the format stores them in (fp16 for
    gptq, the saved weights' dtype for compressed-tensors), so that the packed integers dequantize
    to exactly the fake-quantized weights. A grid with its own scale_dtype keeps it."""
    from . import export
    form = export.require_known_format(format)
    layers = list(quantized_layers(model, recipe.skip).values())
    shapes = matrix_shapes(model, recipe.skip).values()
    experts = quantized_experts(model, recipe.skip)
    grid = recipe.grid
    if experts and recipe.activations.bits < 16:
        raise CrossblockError(f"activation quantization is not supported for fused MoE experts "
                              f"(e.g. {next(iter(experts))}): their inputs are internal to the experts module; "
                              f"quantize weights only (abits 16)")
    export.check_format(format, grid.bits, grid.group_size, grid.sym, [s[1] for s in shapes],
                        out_features_list=[s[0] for s in shapes],
                        has_conv1d=any(is_conv1d(m) for m in layers), act_scheme=recipe.activations.scheme(),
                        fused_experts=sorted(experts))
    stored = form.stored_scale_dtype(save_dtype or checkpoint_dtype(model))
    if grid.scale_dtype is not None or stored in (None, torch.float32):
        return recipe
    return dataclasses.replace(recipe, grid=dataclasses.replace(grid, scale_dtype=str(stored).removeprefix("torch.")))


def quantize(model, tokenizer, recipe: Recipe, calib, device: str | None = None, progress: bool = True,
             checkpoint_dir: str | Path | None = None, offload: str = "ram", format: str = "fake",
             save_dtype: torch.dtype | None = None):
    """Quantize `model` in place with `recipe`'s stages, in order; returns (model, report).

    `format` is the checkpoint format the model will be saved in: settings it cannot store are
    refused before any work, and scales are rounded to what it stores (see `for_format`), so
    `save(..., format=...)` writes exactly the model quantized here. With `checkpoint_dir`, the
    engine state is saved there after every window, and a run that finds a checkpoint of the same
    model, recipe and calibration data continues from it, producing exactly what an uninterrupted
    run would. `offload="disk"` keeps the activation chains in memory-mapped files (in
    `checkpoint_dir`, or the system temp folder).

    The model stays a plain transformers model: each quantized Linear holds fake-quantized
    weights in its dtype and carries `crossblock_qweight` (integers, scales, zero points) for
    the packed exports. The model's weights may stay on the CPU; blocks visit `device`
    (default: CUDA when present) one window at a time.
    """
    t0 = time.time()
    recipe = for_format(recipe.validated(), model, format, save_dtype)
    recipe.grid.check_widths({n: s[1] for n, s in matrix_shapes(model, recipe.skip).items()})
    check_weights_finite(model)
    ids = calibration_ids(tokenizer, calib, recipe.data)
    device = device or default_device()
    model.eval().requires_grad_(False)
    job = Job(ids, recipe.data, recipe.grid, recipe.activations, list(recipe.skip), device=device,
              progress=progress, offload=offload, checkpoint_dir=checkpoint_dir)
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        key = fingerprint(model, recipe, ids)
        job.resume = read_checkpoint(Path(checkpoint_dir), key)
        on_disk: set[int] = set()
        job.on_window = lambda state: write_checkpoint(Path(checkpoint_dir), state, key, on_disk)
    for stage in recipe.stages:
        stage.run(model, job)
    restore_quantized(model)
    report = {**job.report,
              "unquantized": unquantized_weights(model, recipe.skip),
              "recipe": recipe.to_dict(),
              "versions": versions(),
              "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids)},
              "device": str(device),
              "ranks": rank_and_size()[1],
              "offload": offload,
              "resumed_at_window": job.resume.next_window if job.resume else None,
              "wall_seconds": round(time.time() - t0, 2),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return model, report


def quantize_folder(model_path: str, calib_files, out, recipe: Recipe, format: str = "fake",
                    dtype: str = "float32", save_dtype: str = "auto", device: str | None = None,
                    overwrite: bool = False, resume: bool = False, offload: str = "ram",
                    progress: bool = True) -> dict:
    """The whole `crossblock quantize` job: load, quantize with a checkpoint after every window,
    write `out` (complete or absent), return the report. Under torchrun every rank computes and
    checkpoints its shard; rank 0 writes `out`."""
    from .data.text import read_texts

    # every check that can fail runs before the long part
    recipe = recipe.validated()
    out = Path(out)
    check_output(out, overwrite)
    work = partial_dir(out)
    if is_main() and work.exists() and not resume:
        if not overwrite:
            raise CrossblockError(f"{work} holds an interrupted run: pass --resume to continue it, "
                                  "or --overwrite to start over")
        shutil.rmtree(work)
    barrier()  # data parallel: no rank creates the staging folder before rank 0 has checked it
    calib = read_texts(calib_files)
    model, tokenizer = load_model(model_path, dtype=dtype)
    stored = checkpoint_dtype(model) if save_dtype == "auto" else getattr(torch, save_dtype)
    run = dict(device=device, offload=offload, format=format, save_dtype=stored)
    if not is_main():
        work.mkdir(parents=True, exist_ok=True)
        quantize(model, tokenizer, recipe, calib, progress=False, checkpoint_dir=work, **run)
        barrier()
        return {}
    with staged_dir(out, keep_checkpoint=True) as work:
        model, report = quantize(model, tokenizer, recipe, calib, progress=progress, checkpoint_dir=work, **run)
        barrier()  # every rank has written its last checkpoint before the folder is renamed
        report["model"] = str(model_path)
        report["calibration"]["files"] = [str(c) for c in calib_files]
        write_folder(model, tokenizer, work, format, report, stored)
    return report


def preprocess_folder(model_path: str, calib_files, out, alpha: float = 0.7, weights: bool = False, data=None,
                      skip=(), device: str | None = None, dtype: str = "float32", overwrite: bool = False,
                      progress: bool = True) -> list[dict]:
    """`crossblock preprocess`: write the CFP-preprocessed FP model (and cfp.json) to `out`."""
    from .data.text import read_texts
    from .export.common import save_folder
    from .preprocess import cfp
    from .recipe import Data

    data = (data or Data()).validated()
    check_output(out, overwrite)
    calib = read_texts(calib_files)
    model, tokenizer = load_model(model_path, dtype=dtype)
    check_weights_finite(model)
    ids = calibration_ids(tokenizer, calib, data)
    found = cfp(model, ids, alpha, weights, data.batch_size, list(skip), device or default_device(), progress)
    with staged_dir(out) as tmp:
        save_folder(model, tokenizer, tmp)
        info = {"model": str(model_path), "cfp_alpha": alpha, "cfp_weights": weights, "skip": list(skip),
                "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids)},
                "cfp": found}
        (tmp / "cfp.json").write_text(json.dumps(info, indent=1) + "\n")
    return found


def versions() -> dict:
    import transformers
    from .version import __version__
    return {"crossblock": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_output(out: Path, overwrite: bool = False):
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise CrossblockError(f"output folder {out} exists and is not empty (pass overwrite / --overwrite)")


def write_folder(model, tokenizer, folder: Path, format: str = "fake", report: dict | None = None,
                 dtype: torch.dtype | None = None):
    """Model files, tokenizer, then crossblock.json (last: its presence marks a complete folder)."""
    from . import export
    if dtype is not None:
        model.to(dtype)
    activations = act_quant.record(model)  # the scheme the exports record, and per-layer steps
    scheme = {k: v for k, v in activations.items() if k != "layers"} if activations else None
    export.save(model, tokenizer, folder, format, act_scheme=scheme)
    info = dict(report or {}, format=format, activations=activations)
    (Path(folder) / REPORT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    print_unquantized(info.get("unquantized"))


def save(model, tokenizer, out, format: str = "fake", report: dict | None = None,
         dtype: torch.dtype | None = None, overwrite: bool = False):
    """Write `out` as a complete folder, or leave nothing (see output.py). `dtype` casts the
    model before saving."""
    out = Path(out)
    check_output(out, overwrite)
    with staged_dir(out) as tmp:
        write_folder(model, tokenizer, tmp, format, report, dtype)
    return out


def load(path, device: str = "cpu", dtype: str | torch.dtype | None = None):
    """Any folder crossblock writes (fake, compressed-tensors, gptq) as a transformers model,
    in `dtype` (default: the checkpoint's), its layers quantizing their inputs as they did
    when it was written (crossblock.json records the activation quantizers)."""
    from . import export
    model = export.load(path, device, getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    report = Path(path) / REPORT_FILE
    recorded = json.loads(report.read_text()).get("activations") if report.is_file() else None
    if recorded:
        act_quant.rebuild(model, recorded)
    return model


def evaluate(model, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
             progress: bool = True) -> float:
    return perplexity(model, tokenize(tokenizer, text), seqlen, max_windows, progress=progress)
