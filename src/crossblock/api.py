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

import contextlib
import dataclasses
import hashlib
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from . import output, validate
from .data import builtin as builtin_calibration
from .data.text import Mix, calibration_windows, digest, tokenize
from .distributed import barrier, is_main, rank_and_size
from .engine.blocks import InMemoryBlocks
from .engine.chains import large_allocations_mapped, trim_heap
from .engine.checkpoint import read_checkpoint, write_checkpoint
from .errors import CrossblockError
from .export import schema
from .export.card import write_card
from .eval.perplexity import against_reference, perplexity
from .model.adapter import (block_experts, block_linears, find_blocks, is_skipped, refuse_unmatched_skip,
                            unquantized_weights)
from .model import loading as model_loading
from .model.loading import from_pretrained_exactly
from .quant.experts import expert_params
from .output import partial_dir, staged_dir
from .precision import resolve as resolve_precision
from .quant import act as act_quant
from .quant.linear import is_conv1d, restore_quantized, weight_of
from .recipe import Recipe
from .stages import Job

REPORT_FILE = "crossblock.json"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False,
               on_meta: bool = False):
    """A transformers causal LM and its tokenizer, from a local folder or a hub id. A model
    whose config names custom code (`auto_map`) runs it only with `trust_remote_code`.
    `on_meta` (the low-memory path, a local folder): its parameters on the meta device, read
    from disk block by block later (stream.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise CrossblockError(f"model not found: {name_or_path} is not a folder with a config.json")
    source = str(path) if looks_local else name_or_path
    if on_meta and not (looks_local and any(path.glob("*.safetensors"))):
        raise CrossblockError(f"--low-memory reads weights from a local folder of .safetensors files; "
                              f"{name_or_path} is not one (download it first, or run without --low-memory)")
    dtype = validate.parse_dtype(dtype, auto=True)
    try:
        if on_meta:
            from .stream import load_skeleton
            model, stored = load_skeleton(path, dtype, trust_remote_code)
        else:
            stored = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).dtype
            model = from_pretrained_exactly(AutoModelForCausalLM, name_or_path, source, dtype=dtype,
                                            trust_remote_code=trust_remote_code)
        model.crossblock_stored_dtype = str(stored).removeprefix("torch.") if stored else None  # see checkpoint_dtype
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except CrossblockError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        raise CrossblockError(f"cannot load model {name_or_path}: {first_line(e)}") from None
    return model.eval(), tokenizer


def first_line(e: BaseException) -> str:
    """An exception's first line; for transformers' refusal of custom code, how to allow it."""
    text = model_loading.first_line(e)
    if "custom code" in text and "trust_remote_code" not in text:
        text += " (crossblock runs it only with --trust-remote-code / trust_remote_code=True)"
    return text


def checkpoint_dtype(model) -> torch.dtype:
    """The dtype the model's weights were stored in (its config's), whatever it was loaded in."""
    dtype = getattr(model, "crossblock_stored_dtype", None) or model.config.dtype or torch.float32
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def check_weights_finite(model):
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise CrossblockError(f"model weight {name} contains NaN or Inf values")


def layers_to_quantize(model, skip=()) -> dict[str, torch.nn.Module]:
    """The linear layers of every block that a recipe with `skip` quantizes, by full name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks)
            for n, m in block_linears(b) if not is_skipped(skip, prefix, i, n)}


def experts_to_quantize(model, skip=()) -> dict[str, torch.Tensor]:
    """The fused 3-D expert parameters a recipe with `skip` quantizes (E, out, in), by full name."""
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}.{p}": t for i, b in enumerate(blocks) for n, m in block_experts(b)
            if not is_skipped(skip, prefix, i, n) for p, t in expert_params(m).items()}


def matrix_shapes(model, skip=()) -> dict[str, tuple[int, int]]:
    """(out, in) of every matrix a recipe with `skip` quantizes: each linear, each expert's."""
    shapes = {n: tuple(weight_of(m).shape) for n, m in layers_to_quantize(model, skip).items()}
    return {**shapes, **{n: tuple(t.shape[1:]) for n, t in experts_to_quantize(model, skip).items()}}


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
    """Texts (a string or a list of strings), a Mix of sources in shares, None (the built-in mix) or
    ready token windows (nsamples, seqlen); `data` is a recipe's data section (nsamples, seqlen, seed)."""
    if calib is None:
        calib = builtin_calibration.mix()
    if isinstance(calib, Mix):
        return calib.windows(tokenizer, data.nsamples, data.seqlen, data.seed)
    if torch.is_tensor(calib):
        if calib.dim() != 2 or calib.shape[1] < 2:
            raise CrossblockError(f"calibration ids must be (nsamples, seqlen), got {tuple(calib.shape)}")
        return calib.long()
    text = calib if isinstance(calib, str) else "\n\n".join(calib)
    # windows are drawn from (at least) 16 times the tokens they hold: a huge file is not tokenized whole
    ids = tokenize(tokenizer, text, enough=16 * data.nsamples * data.seqlen)
    return calibration_windows(ids, data.nsamples, data.seqlen, data.seed)


def calibration_mix(calib, nsamples: int) -> dict:
    """The sources of a mixed calibration, for crossblock.json (nothing for plain texts or ids)."""
    if calib is None:
        calib = builtin_calibration.mix()
    return {"sources": calib.summary(nsamples)} if isinstance(calib, Mix) else {}


def fingerprint(model, recipe: Recipe, ids: torch.Tensor, sums: dict | None = None, precision: str | None = None) -> str:
    """Identity of a run: model (config and a checksum of every weight), recipe, calibration ids, and
    the precision `auto` resolved to (a checkpoint of a bf16 run does not resume as fp32 elsewhere).
    `sums`: name -> (shape, sum) of every weight, read from disk (low-memory path: stream.weight_sums)."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    if precision is not None:
        h.update(f"precision:{precision}".encode())
    h.update(digest(ids).encode())
    h.update(model.config.to_json_string().encode())
    sums = sums or {name: (tuple(p.shape), p.double().sum().item()) for name, p in model.state_dict().items()}
    for name, (shape, total) in sums.items():
        h.update(f"{name}:{shape}:{total!r}".encode())
    return h.hexdigest()


def for_format(recipe: Recipe, model, format: str = "fake", save_dtype: torch.dtype | None = None) -> Recipe:
    """The recipe as it must run to be written in `format`: refused if the format cannot store it
    (before any work), and with scales rounded to the dtype the format stores them in (fp16 for
    gptq, the saved weights' dtype for compressed-tensors), so that the packed integers dequantize
    to exactly the fake-quantized weights. A grid with its own scale_dtype keeps it."""
    from . import export
    form = export.require_known_format(format)
    if not getattr(model, "crossblock_prefix", False):  # a prefix (auto, compare): checked on the whole model
        refuse_unmatched_skip(model, recipe.skip)
    layers = list(layers_to_quantize(model, recipe.skip).values())
    shapes = matrix_shapes(model, recipe.skip).values()
    if form.packed and not shapes:  # else found only when saving, after all the work
        left = f"--skip {','.join(recipe.skip)} leaves" if recipe.skip else "the model has"
        raise CrossblockError(f"{format} export stores quantized layers, but {left} no layer to quantize: "
                              "skip fewer layers, or use --format fake")
    experts = experts_to_quantize(model, recipe.skip)
    grid = recipe.grid
    if experts and recipe.activations.bits < 16:
        raise CrossblockError(f"activation quantization is not supported for fused MoE experts "
                              f"(e.g. {next(iter(experts))}): their inputs are internal to the experts module; "
                              f"quantize weights only (abits 16)")
    form.accepts_grid(grid, model)
    bits = recipe.stage("bits")  # mixed precision: every option must be storable, the budget reachable
    if bits is not None:
        form.accepts_mixed(bits.tie)
        bits.plan(model, grid, recipe.skip)
    form.accepts_activations(grid.kind_name, recipe.activations.scheme())
    for option in bits.grids(grid) if bits is not None else [grid]:
        if option.kind_name == "uniform":
            export.check_format(format, option.bits, option.group_size, option.sym, [s[1] for s in shapes],
                                out_features_list=[s[0] for s in shapes], has_conv1d=any(is_conv1d(m) for m in layers),
                                act_scheme=recipe.activations.scheme(), fused_experts=sorted(experts))
    rotate = recipe.stage("rotate")
    form.accepts_online_transforms(rotate is not None and rotate.online)
    stored = form.stored_scale_dtype(save_dtype or checkpoint_dtype(model))
    asked = getattr(grid, "scale_dtype", None)
    if asked is not None and stored not in (None, torch.float32) and getattr(torch, asked) != stored:
        raise CrossblockError(f"{format} stores scales in {str(stored).removeprefix('torch.')}, not {asked}: "
                              f"drop scale_dtype (--scale-dtype) and the scales are trained on what it stores")
    if getattr(grid, "scale_dtype", "own") is not None or stored in (None, torch.float32):
        return recipe
    return dataclasses.replace(recipe, grid=dataclasses.replace(grid, scale_dtype=str(stored).removeprefix("torch.")))


def quantize(model, tokenizer, recipe: Recipe, calib=None, device: str | None = None, progress: bool = True,
             checkpoint_dir: str | Path | None = None, offload: str = "ram", format: str = "fake",
             save_dtype: torch.dtype | None = None, on_window=None, stream=None):
    """Quantize `model` in place with `recipe`'s stages, in order; returns (model, report).

    `recipe`: a Recipe; a preset name, YAML file or "auto" (auto.py: the window schedule is
    measured on a prefix of the model and chosen); or a dict of flat settings naming no preset
    (`dict(wbits=3, group_size=64)`), which runs the default recipe for those bits
    (`Recipe.default`). `on_window(state)` is called after every window of the windows stage.

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

    `stream` (the low-memory path of `quantize_folder`): `model` is a skeleton on the meta device
    and a stream.BlockStream, the store its blocks live in (engine/blocks.py; without it, in
    memory), reads and writes them; the weights end up in its spill files, not in `model`.
    """
    t0 = time.time()
    recipe = as_recipe(recipe)
    validate.check_quantize_args(model, calib, device)
    recipe = for_format(recipe.validated(), model, format, save_dtype)
    widths = {n: s[1] for n, s in matrix_shapes(model, recipe.skip).items()}
    for grid in recipe.layer_grids():  # a pin's grid is checked on the layers it pins (Bits.plan)
        grid.check_widths(widths)
    blocks = stream or InMemoryBlocks(find_blocks(model)[1])  # where the blocks live (engine/blocks.py)
    for stage in recipe.stages:  # a stage the store cannot run (one needing the whole model), before any work
        blocks.admit(stage)
    from . import stream as streaming
    sums = streaming.weight_sums(model) if stream else check_weights_finite(model)
    ids = calibration_ids(tokenizer, calib, recipe.data)
    trim_heap()  # what tokenizing the text and summing the weights left in the heap, back to the OS
    device = device or default_device()
    model.eval().requires_grad_(False)
    recipe, prefix_state, auto = choose_schedule(recipe, model, tokenizer, ids, device, progress)
    precision, why = resolve_precision(recipe.precision, device)
    job = Job(ids, recipe.data, recipe.grid, recipe.activations, list(recipe.skip), device=device,
              progress=progress, offload=offload, checkpoint_dir=checkpoint_dir, resume=prefix_state, blocks=blocks,
              precision=precision)
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        key = job.fingerprint = fingerprint(model, recipe, ids, sums, precision)
        job.resume = read_checkpoint(Path(checkpoint_dir), key, lazy=not blocks.holds_whole_model) or job.resume
        on_disk: set[int] = set()
        job.on_window = lambda state: write_checkpoint(Path(checkpoint_dir), state, key, on_disk)
    if on_window is not None:
        job.on_window = (lambda state, save=job.on_window: (save(state), on_window(state))) if job.on_window \
            else on_window
    stage_seconds = {}
    for stage in recipe.stages:
        t_stage = time.time()
        stage.run(model, job)
        stage_seconds[stage.kind_name] = round(time.time() - t_stage, 2)
    restore_quantized(model)
    finished = job.grid.finish(model, recipe.skip)  # e.g. GGUF: embeddings, per-layer types
    report = {**job.report, **({"grid": finished} if finished else {}),
              "unquantized": stream.unquantized() if stream else unquantized_weights(model, recipe.skip),
              "recipe": recipe.to_dict(),
              **({"recipe_chosen_by": recipe.chosen_by} if recipe.chosen_by else {}),
              **({"auto": auto} if auto else {}),
              "versions": versions(),
              "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids),
                              **calibration_mix(calib, ids.shape[0])},
              "device": str(device),
              "precision": {"asked": recipe.precision, "used": precision, "why": why},
              "ranks": rank_and_size()[1],
              "offload": offload,
              **({"low_memory": True} if stream else {}),
              "resumed_at_window": job.resume.next_window if job.resume else None,
              "wall_seconds": round(time.time() - t0, 2),
              "stage_seconds": stage_seconds,
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return model, report


def as_recipe(recipe) -> Recipe:
    """A Recipe from what `quantize` accepts (see there)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, str):
        if recipe == "auto":
            from .auto import AutoRecipe
            return AutoRecipe.build()
        return Recipe.load(recipe)
    if isinstance(recipe, dict):
        return Recipe.default(**recipe)
    raise CrossblockError(f"recipe must be a Recipe, a preset name, a YAML file, 'auto' or a dict of flat settings, "
                          f"got {type(recipe).__name__}")


def choose_schedule(recipe: Recipe, model, tokenizer, ids, device, progress):
    """(recipe to run, engine state to continue from, auto report): --recipe auto's choice (auto.py)."""
    from .auto import AutoRecipe
    if not isinstance(recipe, AutoRecipe):
        return recipe, None, None
    return recipe.choose(quantize, model, tokenizer, ids, device=device, progress=progress)


def quantize_folder(model_path: str, calib_files, out, recipe: Recipe, format: str = "fake",
                    dtype: str = "float32", save_dtype: str = "auto", device: str | None = None,
                    overwrite: bool = False, resume: bool = False, offload: str = "ram",
                    progress: bool = True, trust_remote_code: bool = False, low_memory: bool | None = None,
                    calib_mix=None) -> dict:
    """The whole `crossblock quantize` job: load, quantize with a checkpoint after every window,
    write `out` (complete or absent), return the report ({} on data-parallel ranks other than 0,
    and for a `resume` that finds `out` already complete). Under torchrun every rank computes and
    checkpoints its shard; rank 0 writes `out`.

    `low_memory` streams the weights block by block from disk to disk (stream.py: the same files,
    with host RAM for a window of blocks rather than the model); None chooses it when the weights
    exceed half the available RAM, and says so."""
    from . import stream as streaming
    from .data.calibration import calibration_source

    # every check that can fail runs before the long part
    recipe = recipe.validated()
    out = Path(out)
    calib, calib_names = calibration_source(calib_files, calib_mix)
    needed = [model_path, *(c for c in calib_names if c != builtin_calibration.NAME)]
    output.check_output(out, overwrite, needed=needed, resume=resume)
    stored = None if save_dtype == "auto" else validate.parse_dtype(save_dtype, "save dtype")
    low_memory = streaming.resumed_path(out, resume, low_memory)
    low_memory = streaming.choose(model_path, low_memory, dtype, quiet=not is_main())
    # low memory: freed weight-sized temporaries go back to the OS at once (engine/chains.py)
    with large_allocations_mapped() if low_memory else contextlib.nullcontext():
        model, tokenizer = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code, on_meta=low_memory)
        stored = stored or checkpoint_dtype(model)
        run = dict(device=device, offload=offload, format=format, save_dtype=stored)
        for_format(recipe, model, format, stored)  # refuse what the format cannot store before any work
        if low_memory:
            recipe = recipe.without_default_finetune("--low-memory holds one block at a time; the finetune needs "
                                                     "the whole model")
            if is_main() and (recipe.chosen_by or {}).get("finetune_dropped"):
                print(f"crossblock: the default recipe runs without its finetune here "
                      f"({recipe.chosen_by['finetune_dropped']})", file=sys.stderr)
            streaming.refuse_unsupported(recipe, format, model)
        if is_main():  # locks the staging folder (a second run refuses) and clears it unless resume
            work = output.prepare_staging(out, resume, overwrite, needed=needed)
            if work is not None and not low_memory:  # a low-memory run's spill folder, left before any checkpoint
                shutil.rmtree(work / streaming.SPILL_DIR, ignore_errors=True)
            if progress:
                used, why = resolve_precision(recipe.precision, device or default_device())
                print(f"crossblock: computing in {used} ({why}; --precision fp32|bf16 to choose)", file=sys.stderr)
        barrier()  # data parallel: no rank uses the staging folder before rank 0 has checked it
        work = partial_dir(out)
        if not work.exists():  # resume of a run killed after its final rename
            if is_main():
                print(f"{out} is already complete: nothing to resume")
            return {}
        if low_memory:
            run["stream"] = streaming.BlockStream(model, work, format, stored, recipe.skip, main=is_main())
        if not is_main():
            quantize(model, tokenizer, recipe, calib, progress=False, checkpoint_dir=work, **run)
            barrier()
            return {}
        with staged_dir(out, keep_checkpoint=True) as work:
            model, report = quantize(model, tokenizer, recipe, calib, progress=progress, checkpoint_dir=work, **run)
            barrier()  # every rank has written its last checkpoint before the folder is renamed
            report["model"] = str(model_path)
            report["calibration"]["files"] = [str(c) for c in calib_names]
            report["quality"] = {"skipped": "low-memory run: the FP model is not loaded a second time"} \
                if low_memory else held_out_quality(model, model_path, tokenizer, calib, recipe.data, dtype,
                                                    trust_remote_code)
            if low_memory:
                write_streamed_folder(run["stream"], tokenizer, work, format, report)
            else:
                write_folder(model, tokenizer, work, format, report, stored)
        return report


QUALITY_ROWS = 4  # (at most) windows of the calibration text scored against FP at save time


def held_out_quality(model, model_path, tokenizer, calib, data, dtype: str, trust_remote_code: bool = False) -> dict:
    """KL(FP || quantized) per token, top-1 agreement and both perplexities on up to QUALITY_ROWS windows of
    the calibration text drawn with seed + 1 (windows the run did not draw; with a short text they
    may overlap its windows): crossblock.json's `quality`, and the model card's."""
    from dataclasses import replace

    from .eval.perplexity import against_reference

    rows = min(QUALITY_ROWS, data.nsamples)  # a text that held nsamples windows holds these
    held = calibration_ids(tokenizer, calib, replace(data, nsamples=rows, seed=data.seed + 1))
    reference, _ = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    reference.to(next(model.parameters()).device)
    training = model.training
    model.eval()
    figures = against_reference(model, reference, held.flatten(), held.shape[1], progress=False)
    model.train(training)
    del reference
    return {**{k: round(v, 6) for k, v in figures.items() if k != "tokens"}, "tokens": figures["tokens"],
            "windows": f"{rows} x {held.shape[1]} calibration tokens, seed {data.seed + 1}"}


def preprocess_folder(model_path: str, calib_files, out, alpha: float = 0.7, weights: bool = False, data=None,
                      skip=(), device: str | None = None, dtype: str = "float32", overwrite: bool = False,
                      progress: bool = True, trust_remote_code: bool = False, rotate=None,
                      cfp: bool = True) -> list[dict]:
    """`crossblock preprocess`: write the FP model after the rotation `rotate` (a stages.Rotate, or
    None) and then CFP (unless `cfp` is False) to `out`. CFP writes cfp.json; a rotation writes
    the folder as the fake format does: a plain transformers model (a run-time down_proj
    rotation is folded into its weight) whose crossblock.json records the rotation."""
    from .data.calibration import calibration_source
    from .export.common import save_folder
    from .preprocess import cfp as run_cfp
    from .recipe import Data

    if not cfp and rotate is None:
        raise CrossblockError("preprocess has nothing to do: CFP is off and no rotation was asked for")
    data = (data or Data()).validated()
    calib, calib_names = calibration_source(calib_files) if cfp else (None, [])
    output.check_output(out, overwrite, needed=[model_path, *(c for c in calib_names if c != builtin_calibration.NAME)])
    model, tokenizer = load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    refuse_unmatched_skip(model, skip)
    check_weights_finite(model)
    info, found = {"model": str(model_path)}, []
    if rotate is not None:
        from .preprocess.rotate import rotate_model
        info["rotate"] = rotate_model(model, seed=rotate.seed, online_down_proj=rotate.online, kind=rotate.kind)
    if cfp:
        ids = calibration_ids(tokenizer, calib, data)
        found = run_cfp(model, ids, alpha, weights, data.batch_size, list(skip), device or default_device(), progress)
        info.update({"cfp_alpha": alpha, "cfp_weights": weights, "skip": list(skip),
                     "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids),
                                     "files": calib_names, **calibration_mix(calib, ids.shape[0])},
                     "cfp": found})
    with staged_dir(out) as tmp:
        if rotate is not None:
            write_folder(model, tokenizer, tmp, "fake", {"preprocess": info, "versions": versions()})
        else:
            save_folder(model, tokenizer, tmp)
        if cfp:
            (tmp / "cfp.json").write_text(json.dumps(info, indent=1) + "\n")
    return found


def versions() -> dict:
    import transformers
    from .version import __version__
    return {"crossblock": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def write_folder(model, tokenizer, folder: Path, format: str = "fake", report: dict | None = None,
                 dtype: torch.dtype | None = None):
    """Model files, tokenizer, then crossblock.json (last: its presence marks a complete folder)."""
    from . import export
    if dtype is not None:
        from .export.common import cast_parameters
        cast_parameters(model, dtype)
    from .preprocess.online import record_transforms
    activations = act_quant.record(model)  # the scheme the exports record, and per-layer steps
    transforms = record_transforms(model)
    export.require_known_format(format).accepts_online_transforms(bool(transforms))
    refuse_scales_off_the_stored_grid(model, format, None)  # after the cast: the dtype saved
    written = export.save(model, tokenizer, folder, format, act_scheme=scheme_of(activations),
                          grid=(report or {}).get("grid"))
    write_json_report(folder, report, format, activations, transforms, written)
    add_to_report(folder, save_check=check_reload(model, folder, format))
    write_card(folder)


def write_streamed_folder(stream, tokenizer, folder: Path, format: str, report: dict):
    """write_folder for the low-memory path: the weights come from the stream's spill files."""
    activations = stream.activations()
    written = stream.write_folder(tokenizer, folder, scheme_of(activations))
    shutil.rmtree(stream.spill)
    write_json_report(folder, report, format, activations, None, written)
    add_to_report(folder, save_check={"skipped": "low-memory: the model is never whole in memory to compare with"})
    write_card(folder)


RELOAD_IDS = (2, 32)  # what the save check runs through both models: cheap, and every layer sees it


@torch.no_grad()
def check_reload(model, folder: Path, format: str) -> dict:
    """The written folder, read back as `crossblock.load` reads it, must give the model's logits
    within the format's stated tolerance (relative to the largest logit): a packing or loader bug
    fails the save with one line, and the staging folder is never renamed into place."""
    from . import export
    form = export.require_known_format(format)
    if getattr(model.config, "auto_map", None):
        return {"skipped": "the model's code comes from its folder (trust_remote_code): not run again"}
    if why := form.unreadable(folder):
        return {"skipped": why}
    tolerance = form.reload_tolerance
    param = next(model.parameters())
    back = load(folder, device=str(param.device), dtype=param.dtype)
    ids = torch.randint(0, model.get_input_embeddings().num_embeddings, RELOAD_IDS,
                        generator=torch.Generator().manual_seed(0)).to(param.device)
    training = model.training
    model.eval()
    expected = model(input_ids=ids, use_cache=False).logits.float()
    model.train(training)
    got = back(input_ids=ids, use_cache=False).logits.float()
    del back
    diff = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not diff <= tolerance:  # NaN fails too
        (Path(folder) / REPORT_FILE).unlink()  # what is left (a checkpoint to resume) is not a finished folder
        raise CrossblockError(f"the written {format} folder does not reproduce the model: its logits differ by "
                              f"{diff:.3g} of the largest (the format's tolerance is {tolerance:g}); nothing was written")
    return {"max_rel_logit_diff": diff, "tolerance": tolerance, "ids": list(RELOAD_IDS)}


def add_to_report(folder: Path, **entries):
    path = Path(folder) / REPORT_FILE
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}, indent=1) + "\n")


def scheme_of(activations: dict | None) -> dict | None:
    """The activation scheme the formats record: act_quant.record's, without the per-layer steps."""
    return {k: v for k, v in activations.items() if k != "layers"} if activations else None


def write_json_report(folder: Path, report: dict | None, format: str, activations, transforms, written: dict | None):
    """crossblock.json, written after the model files (its presence marks a complete folder)."""
    info = dict(report or {}, format=format, activations=activations, transforms=transforms, **(written or {}))
    (Path(folder) / REPORT_FILE).write_text(json.dumps(info, indent=1) + "\n")
    print_unquantized(info.get("unquantized"))


def save(model, tokenizer, out, format: str = "fake", report: dict | None = None,
         dtype: torch.dtype | None = None, overwrite: bool = False):
    """Write `out` as a complete folder, or leave nothing (see output.py). `dtype` casts the
    model before saving."""
    out = Path(out)
    output.check_output(out, overwrite)
    with staged_dir(out) as tmp:
        write_folder(model, tokenizer, tmp, format, report, dtype)
    return out


def refuse_scales_off_the_stored_grid(model, format: str, dtype: torch.dtype | None):
    """A packed file must hold the model that was evaluated: scales the format would round (fp16
    for gptq; the saved dtype for compressed-tensors) are refused with the way to get them right."""
    from . import export
    from .export.common import quantized_layers, scales_off_grid
    stored = export.require_known_format(format).stored_scale_dtype(dtype or checkpoint_dtype(model))
    if stored in (None, torch.float32):
        return
    off = scales_off_grid(quantized_layers(model), stored)
    if off:
        dt = str(stored).removeprefix("torch.")
        raise CrossblockError(f"{format} stores scales in {dt}, and {len(off)} layer(s) (e.g. {off[0]}) have scales "
                              f"that are not {dt} values, so the file would differ from this model: quantize with "
                              f"format={format!r} (CLI: --format {format}), which trains the scales on {dt}")


def load(path, device: str = "cpu", dtype: str | torch.dtype | None = None, trust_remote_code: bool = False):
    """Any folder crossblock writes (fake, compressed-tensors, gptq) as a transformers model,
    in `dtype` (default: the checkpoint's), its layers quantizing their inputs as they did
    when it was written (crossblock.json records the activation quantizers)."""
    from . import export
    validate.check_device(device)
    dtype = validate.parse_dtype(dtype)
    try:
        model = export.load(path, device, dtype, trust_remote_code)
    except CrossblockError:
        raise
    except Exception as e:  # noqa: BLE001 - a folder transformers cannot read: say why in one line
        raise CrossblockError(f"cannot load {path}: {first_line(e)}") from None
    report = Path(path) / REPORT_FILE
    info = schema.read_json(report) if report.is_file() else {}
    recorded, folded = info.get("activations"), info.get("format", "fake") == "fake"
    if not report.is_file():  # a folder another tool wrote: its own config may describe activations
        recorded = export.loader.folder_format(path).activations(path, model)
    if has_transform_config(path) and not info.get("transforms"):
        raise CrossblockError(f"{path} has run-time rotations (transform_config) but its crossblock.json does not "
                              "record them: crossblock loads the ones it wrote")
    # packed folders hold W in the rotated basis, so the rotation is always re-attached; the fake
    # folder holds W H^T (export/fake.py), which plain transformers runs as is, unless activation
    # quantizers must read the rotated input x H
    if info.get("transforms") and (recorded or not folded):
        from .preprocess.online import rebuild_transforms
        rebuild_transforms(model, info["transforms"])
        if folded:
            unfold_weights(model, path)
    if recorded:
        prefix, blocks = find_blocks(model)
        quantizable = {f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in block_linears(b)}
        act_quant.rebuild(model, schema.check_activations(recorded, report, quantizable))
    return model


@torch.no_grad()
def unfold_weights(model, path):
    """W Hᵀ -> W for every layer with a run-time input transform of a fake folder: W exactly from
    the file the fake format writes beside it for activation quantizers, else W Hᵀ H (to an ulp)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from .export.fake import UNFOLDED_FILE
    unfolded = Path(path) / UNFOLDED_FILE
    try:
        exact = load_file(unfolded) if unfolded.is_file() else {}
    except (SafetensorError, OSError) as e:
        raise CrossblockError(f"cannot load {unfolded}: {first_line(e)}") from None
    for name, m in model.named_modules():
        t = getattr(m, "crossblock_input_transform", None)
        if t is None:
            continue
        w = exact.get(f"{name}.weight")
        if w is not None and w.shape != m.weight.shape:
            raise CrossblockError(f"{unfolded}: {name}.weight has shape {tuple(w.shape)}, the model {tuple(m.weight.shape)}")
        m.weight.copy_(w if w is not None else (m.weight.double() @ t.matrix().to(m.weight.device)).to(m.weight.dtype))


def has_transform_config(path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and bool((schema.read_json(config).get("quantization_config") or {}).get("transform_config"))


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a folder without a (readable) tokenizer
        raise CrossblockError(f"cannot load a tokenizer from {path}: {first_line(e)} (pass --tokenizer)") from None


def evaluate(model, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
             progress: bool = True, reference=None) -> float | dict:
    """Perplexity of `model` on `text`; with `reference` (the full-precision model it came from),
    a dict: kl (mean KL(reference || model) per token, nats), top1 (agreement of the top-1
    predictions), ppl, ppl_reference, tokens."""
    validate.check_windows(seqlen, max_windows)
    ids = tokenize(tokenizer, text, enough=None if max_windows is None else max_windows * seqlen)
    if reference is not None:
        return against_reference(model, reference, ids, seqlen, max_windows, progress=progress)
    return perplexity(model, ids, seqlen, max_windows, progress=progress)
