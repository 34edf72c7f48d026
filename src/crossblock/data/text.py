"""Text files -> token ids: calibration windows and evaluation windows."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..errors import CrossblockError


def read_texts(paths) -> str:
    """Files read as UTF-8 with universal newlines, joined with a blank line."""
    texts = []
    for p in [paths] if isinstance(paths, (str, Path)) else paths:
        p = Path(p)
        if not p.is_file():
            raise CrossblockError(f"text file not found: {p}")
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise CrossblockError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    return "\n\n".join(texts)


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """One long 1-D id tensor; the tokenizer adds its usual special tokens (e.g. one BOS)."""
    if not text.strip():
        raise CrossblockError("the text is empty")
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens (seeded): a (nsamples, seqlen) tensor."""
    if ids.numel() < nsamples * seqlen:
        raise CrossblockError(
            f"calibration text too short: {ids.numel()} tokens found, {nsamples} x {seqlen} = "
            f"{nsamples * seqlen} needed (pass more text, or lower --nsamples/--seqlen)")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s:s + seqlen] for s in starts.tolist()])


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
