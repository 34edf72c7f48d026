"""The Python API: load a model, quantize it in place, save it, evaluate it.

    import crossblock as cb
    model, tok = cb.load_model("path/or/hub-id")
    recipe = cb.Recipe.preset("cbq", wbits=2, group_size=64)
    model, report = cb.quantize(model, tok, recipe, calib=texts)   # same object, quantized in place
    cb.save(model, tok, "out/", report=report)
"""
from __future__ import annotations

import hashlib
import json
import resource
import time
from pathlib import Path

import torch

from . import output, validate
from .data.text import calibration_windows, digest, tokenize
from .engine.chains import ChainStore
from .engine.checkpoint import read_checkpoint, write_checkpoint
from .engine.distributed import is_main, rank_and_size, shard
from .engine.reconstruct import WindowEngine
from .errors import CrossblockError
from .export import schema
from .eval.perplexity import perplexity
from .model.adapter import block_linears, capture, find_blocks
from .output import staged_dir
from .preprocess import cfp
from .quant import act as act_quant
from .quant.act import act_scheme
from .quant.linear import is_conv1d, weight_of
from .recipe import Recipe

REPORT_FILE = "crossblock.json"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str, dtype: str | torch.dtype = "float32", trust_remote_code: bool = False):
    """A transformers causal LM and its tokenizer, from a local folder or a hub id. A model
    whose config names custom code (`auto_map`) runs it only with `trust_remote_code`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") > 1
    if looks_local and not (path / "config.json").is_file():
        raise CrossblockError(f"model not found: {name_or_path} is not a folder with a config.json")
    source = str(path) if looks_local else name_or_path
    dtype = validate.parse_dtype(dtype, auto=True)
    try:
        stored = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code).dtype
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)
        model.crossblock_stored_dtype = str(stored).removeprefix("torch.") if stored else None  # see checkpoint_dtype
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here means the model cannot be used
        raise CrossblockError(f"cannot load model {name_or_path}: {first_line(e)}") from None
    return model.eval(), tokenizer


def first_line(e: BaseException) -> str:
    """An exception's first line; for transformers' refusal of custom code, how to allow it."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
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


def quantized_layers(model, recipe: Recipe) -> dict[str, torch.nn.Module]:
    prefix, blocks = find_blocks(model)
    return {f"{prefix}.{i}.{n}": m for i, b in enumerate(blocks)
            for n, m in block_linears(b) if not any(s in n for s in recipe.skip)}


def calibration_ids(tokenizer, calib, recipe: Recipe) -> torch.Tensor:
    """Texts (a string or a list of strings) or ready token windows (nsamples, seqlen)."""
    if torch.is_tensor(calib):
        if calib.dim() != 2 or calib.shape[1] < 2:
            raise CrossblockError(f"calibration ids must be (nsamples, seqlen), got {tuple(calib.shape)}")
        return calib.long()
    text = calib if isinstance(calib, str) else "\n\n".join(calib)
    # windows are drawn from (at least) 16 times the tokens they hold: a huge file is not tokenized whole
    ids = tokenize(tokenizer, text, enough=16 * recipe.nsamples * recipe.seqlen)
    return calibration_windows(ids, recipe.nsamples, recipe.seqlen, recipe.seed)


def fingerprint(model, recipe: Recipe, ids: torch.Tensor) -> str:
    """Identity of a run: model (config and a checksum of every weight), recipe, calibration ids."""
    h = hashlib.sha256()
    h.update(json.dumps(recipe.to_dict(), sort_keys=True).encode())
    h.update(digest(ids).encode())
    h.update(model.config.to_json_string().encode())
    for name, p in model.state_dict().items():
        h.update(f"{name}:{tuple(p.shape)}:{p.double().sum().item()!r}".encode())
    return h.hexdigest()


def quantize(model, tokenizer, recipe: Recipe, calib, device: str | None = None, progress: bool = True,
             checkpoint_dir: str | Path | None = None, offload: str = "ram"):
    """Quantize `model` in place with `recipe`; returns (model, report).

    With `checkpoint_dir`, the engine state is saved there after every window, and a run that
    finds a checkpoint of the same model, recipe and calibration data continues from it,
    producing exactly what an uninterrupted run would. `offload="disk"` keeps the activation
    chains in memory-mapped files (in `checkpoint_dir`, or the system temp folder).

    The model stays a plain transformers model: each quantized Linear holds fake-quantized
    weights in its dtype and carries `crossblock_qweight` (integers, scales, zero points) for
    the packed exports. The model's weights may stay on the CPU; blocks visit `device`
    (default: CUDA when present) one window at a time.
    """
    t0 = time.time()
    validate.check_quantize_args(model, calib, device)
    recipe = recipe.validated()
    recipe.check_model({n: weight_of(m).shape[1] for n, m in quantized_layers(model, recipe).items()})
    check_weights_finite(model)
    ids = calibration_ids(tokenizer, calib, recipe)
    device = device or default_device()
    model.eval().requires_grad_(False)
    resume, on_window = None, None
    if checkpoint_dir is not None:
        Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
        key = fingerprint(model, recipe, ids)
        resume = read_checkpoint(Path(checkpoint_dir), key)
        on_disk: set[int] = set()
        on_window = lambda state: write_checkpoint(Path(checkpoint_dir), state, key, on_disk)  # noqa: E731
    outliers = cfp(model, ids, recipe, device, progress) if recipe.cfp else None
    # data parallel (torchrun): each rank captures and carries only its shard of the sequences
    store = ChainStore(offload, checkpoint_dir)
    x0, calls = capture(model, shard(ids), batch_size=recipe.batch_size, empty=store.empty)
    store.release(x0)
    _, blocks = find_blocks(model)
    engine = WindowEngine(blocks, calls, recipe, device=device, progress=progress and is_main(),
                          num_sequences=ids.shape[0], store=store)
    inputs = [x0]
    del x0  # the engine frees the block-0 inputs once every chain has moved past block 0
    try:
        report = engine.quantize(inputs, resume=resume, on_window=on_window)
    except FloatingPointError as e:
        raise CrossblockError(str(e)) from None
    engine.restore()
    report.update({
        "recipe": recipe.to_dict(),
        "versions": versions(),
        "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids)},
        "device": str(device),
        "ranks": rank_and_size()[1],
        "offload": offload,
        "resumed_at_window": resume.next_window if resume else None,
        "wall_seconds": round(time.time() - t0, 2),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    })
    if outliers is not None:
        report["cfp"] = outliers
    if torch.cuda.is_available():
        report["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return model, report


def versions() -> dict:
    import transformers
    from . import __version__
    return {"crossblock": __version__, "torch": torch.__version__, "transformers": transformers.__version__}


def check_output(out: Path, overwrite: bool = False, needed=()):
    """Refuse an `out` that holds the working directory or a path in `needed`, or that is a
    non-empty folder which only `overwrite` may replace, and only if crossblock wrote it."""
    output.check_output(out, overwrite, needed)


def check_format(format: str, model, recipe: Recipe):
    """Refuse, before quantizing, a setting the chosen checkpoint format cannot represent."""
    if format != "fake":
        from . import export
        layers = list(quantized_layers(model, recipe).values())
        export.check_format(format, recipe.wbits, recipe.group_size, recipe.sym,
                            [weight_of(m).shape[1] for m in layers],
                            out_features_list=[weight_of(m).shape[0] for m in layers],
                            has_conv1d=any(is_conv1d(m) for m in layers),
                            act_scheme=act_scheme(recipe.abits, recipe.act_dynamic, recipe.act_sym))


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


def save(model, tokenizer, out, format: str = "fake", report: dict | None = None,
         dtype: torch.dtype | None = None, overwrite: bool = False):
    """Write `out` as a complete folder, or leave nothing (see output.py). `dtype` casts the
    model before saving."""
    out = Path(out)
    check_output(out, overwrite)
    with staged_dir(out) as tmp:
        write_folder(model, tokenizer, tmp, format, report, dtype)
    return out


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
    recorded = schema.read_json(report).get("activations") if report.is_file() else None
    if recorded:
        prefix, blocks = find_blocks(model)
        quantizable = {f"{prefix}.{i}.{n}" for i, b in enumerate(blocks) for n, _ in block_linears(b)}
        act_quant.rebuild(model, schema.check_activations(recorded, report, quantizable))
    return model


def load_tokenizer(path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - a folder without a (readable) tokenizer
        raise CrossblockError(f"cannot load a tokenizer from {path}: {first_line(e)} (pass --tokenizer)") from None


def evaluate(model, tokenizer, text: str, seqlen: int = 512, max_windows: int | None = None,
             progress: bool = True) -> float:
    validate.check_windows(seqlen, max_windows)
    ids = tokenize(tokenizer, text, enough=None if max_windows is None else max_windows * seqlen)
    return perplexity(model, ids, seqlen, max_windows, progress=progress)
