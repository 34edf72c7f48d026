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


WHOLE_CHARS = 2_000_000  # texts up to this size are tokenized in one call, as they always were
CHUNK_CHARS = 1_000_000  # longer ones chunk by chunk: a fast tokenizer holds ~140 bytes per char


def tokenize(tokenizer, text: str, enough: int | None = None) -> torch.Tensor:
    """One long 1-D id tensor; the tokenizer adds its usual special tokens (e.g. one BOS).
    A text longer than WHOLE_CHARS is tokenized in chunks cut at line ends, and only until
    `enough` tokens are found (None: all of it), so a large file costs neither GBs nor minutes."""
    if not text.strip():
        raise CrossblockError("the text is empty")
    if len(text) <= WHOLE_CHARS:
        return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    parts, count, start = [], 0, 0
    while start < len(text) and (enough is None or count < enough):
        end = len(text) if len(text) - start <= CHUNK_CHARS else text.rfind("\n", start, start + CHUNK_CHARS) + 1
        end = end if end > start else start + CHUNK_CHARS  # no line end in the chunk: cut anyway
        ids = tokenizer(text[start:end], verbose=False, add_special_tokens=not parts)["input_ids"]
        parts.append(torch.tensor(ids, dtype=torch.long))
        count, start = count + len(ids), end
    return torch.cat(parts)


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
