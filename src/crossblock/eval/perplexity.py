"""Perplexity with the GPTQ protocol: the text tokenized once, cut into non-overlapping windows
of `seqlen` tokens (a last partial window is dropped), each scored independently; the result is
exp(mean NLL over all predicted tokens)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import CrossblockError


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise CrossblockError(f"evaluation text too short: {ids.numel()} tokens, one window needs {seqlen}")
    windows = ids[: n * seqlen].view(n, seqlen)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    mean = nll / count
    if math.isnan(mean):
        raise CrossblockError("perplexity is NaN: the model produces NaN outputs")
    return math.exp(mean) if mean < 700 else math.inf
