"""Text files -> token ids: calibration windows and evaluation windows."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
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


@dataclass
class Mix:
    """Calibration text from several sources in fixed shares: `parts` holds (name, text, weight).
    Each source gives round(weight / total * nsamples) windows (largest remainders), drawn from its own
    tokens so no window straddles two sources; the rows are then shuffled (seeded), so held-out rows
    (the finetune's) come from every source."""
    parts: list[tuple[str, str, float]]

    def __post_init__(self):
        if not self.parts:
            raise CrossblockError("a calibration mix needs at least one source")
        for name, text, weight in self.parts:
            if not isinstance(text, str):
                raise CrossblockError(f"calibration source {name}: the text must be a string")
            if not weight >= 0 or weight == float("inf"):
                raise CrossblockError(f"calibration source {name}: weight must be a finite number >= 0, got {weight}")
        if not sum(w for _, _, w in self.parts) > 0:
            raise CrossblockError("a calibration mix needs a source with a weight above 0")

    def __add__(self, other: "Mix") -> "Mix":
        return Mix(self.parts + other.parts)

    def shares(self, nsamples: int) -> list[int]:
        total = sum(w for _, _, w in self.parts)
        exact = [w / total * nsamples for _, _, w in self.parts]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(exact)), key=lambda i: (counts[i] - exact[i], i))
        for i in by_remainder[:nsamples - sum(counts)]:
            counts[i] += 1
        return counts

    def windows(self, tokenizer, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
        rows = []
        for i, ((name, text, _), count) in enumerate(zip(self.parts, self.shares(nsamples))):
            if count:
                try:
                    ids = tokenize(tokenizer, text, enough=16 * count * seqlen)
                    rows.append(calibration_windows(ids, count, seqlen, seed + i))
                except CrossblockError as e:
                    raise CrossblockError(f"calibration source {name}: {e}") from None
        rows = torch.cat(rows)
        return rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))]

    def summary(self, nsamples: int) -> list[dict]:
        """What crossblock.json records: each source's name, weight and number of windows."""
        return [{"source": name, "weight": round(w, 6), "windows": n}
                for (name, _, w), n in zip(self.parts, self.shares(nsamples))]


def digest(ids: torch.Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest()
