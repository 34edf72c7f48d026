"""Checks of the API's arguments, run before any work: each bad value is one CrossblockError
(the CLI gets them for free, as one line and exit code 2)."""
from __future__ import annotations

import torch

from .errors import CrossblockError

DTYPES = ("float32", "float16", "bfloat16")


def parse_dtype(dtype, what: str = "dtype", auto: bool = False) -> torch.dtype | str | None:
    """A torch floating dtype from a name (or a dtype); "auto" passes through where allowed."""
    if dtype is None or (auto and dtype == "auto"):
        return dtype
    if isinstance(dtype, torch.dtype) and str(dtype).removeprefix("torch.") in DTYPES:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return getattr(torch, dtype.removeprefix("torch."))
    allowed = ", ".join(DTYPES + (("auto",) if auto else ()))
    raise CrossblockError(f"unsupported {what} {dtype!r}; one of: {allowed}")


def check_device(device) -> str | None:
    """None (the default), "cpu", or a CUDA device this machine has."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CrossblockError(f"unknown device {device!r}; use cpu or cuda") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CrossblockError(f"device {device!r} asked for, but CUDA is not available here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CrossblockError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type != "cpu":
        raise CrossblockError(f"unsupported device {device!r}; use cpu or cuda")
    return device


def check_windows(seqlen, max_windows):
    """Evaluation windows: at least 2 tokens each (one prediction), a positive window count."""
    if not is_count(seqlen, 2):
        raise CrossblockError(f"seqlen must be an integer >= 2, got {seqlen!r}")
    if max_windows is not None and not is_count(max_windows, 1):
        raise CrossblockError(f"max windows must be a positive integer (or None: all), got {max_windows!r}")


def is_count(value, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def check_task_options(limit, num_fewshot, batch_size):
    """eval --tasks: values no task can run with, refused before the model loads."""
    if limit is not None and not is_count(limit, 1):
        raise CrossblockError(f"limit must be a positive integer (items per task; omit it for all), got {limit!r}")
    if num_fewshot is not None and not is_count(num_fewshot, 0):
        raise CrossblockError(f"num fewshot must be an integer >= 0 (examples before each item), got {num_fewshot!r}")
    if not is_count(batch_size, 1):
        raise CrossblockError(f"task batch size must be a positive integer, got {batch_size!r}")


def check_calib(calib, vocab_size: int | None):
    """Texts, a Mix, None (the built-in set), or integer token ids inside the vocabulary; never float tensors."""
    from .data.text import Mix

    if calib is None or isinstance(calib, Mix):
        return
    if torch.is_tensor(calib):
        if calib.is_floating_point() or calib.is_complex() or calib.dtype == torch.bool:
            raise CrossblockError(f"calibration ids must be an integer tensor, got {calib.dtype}")
        if calib.numel() and (int(calib.min()) < 0 or (vocab_size and int(calib.max()) >= vocab_size)):
            raise CrossblockError(f"calibration ids must lie in 0..{(vocab_size or 0) - 1} (the vocabulary), "
                                  f"got {int(calib.min())}..{int(calib.max())}")
    elif isinstance(calib, (list, tuple)):
        if not calib or not all(isinstance(t, str) for t in calib):
            raise CrossblockError("calib as a list must hold texts (strings)")
    elif not isinstance(calib, str):
        raise CrossblockError(f"calib must be a text, a list of texts, a Mix, None (the built-in set) or a tensor of token ids, "
                              f"not {type(calib).__name__}")


def refuse_quantized(model):
    """A model crossblock already quantized would be re-quantized against itself."""
    for name, module in model.named_modules():
        if getattr(module, "crossblock_qweight", None) is not None or type(module).__name__ == "QuantLinear":
            raise CrossblockError(f"the model is already quantized (layer {name} holds integer weights): "
                                  "load the original model to quantize it again")


def check_quantize_args(model, calib, device):
    refuse_quantized(model)
    check_calib(calib, getattr(model.config, "vocab_size", None))
    check_device(device)
