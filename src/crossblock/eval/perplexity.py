"""Perplexity with the GPTQ protocol: the text tokenized once, cut into non-overlapping windows
of `seqlen` tokens (a last partial window is dropped), each scored independently; the result is
exp(mean NLL over all predicted tokens)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import CrossblockError


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None) -> torch.Tensor:
    n = ids.numel() // seqlen
    if max_windows:
        n = min(n, max_windows)
    if n == 0:
        raise CrossblockError(f"evaluation text too short: {ids.numel()} tokens, one window needs {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def ppl_of(mean_nll: float) -> float:
    if math.isnan(mean_nll):
        raise CrossblockError("perplexity is NaN: the model produces NaN outputs")
    return math.exp(mean_nll) if mean_nll < 700 else math.inf


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
               batch_size: int = 1, progress: bool = True) -> float:
    windows = eval_windows(ids, seqlen, max_windows)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc="perplexity", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        nll += F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return ppl_of(nll / count)


@torch.no_grad()
def against_reference(model, reference, ids: torch.Tensor, seqlen: int = 512, max_windows: int | None = None,
                      progress: bool = True) -> dict:
    """How far `model` is from `reference` (its full-precision original) on the same windows:
    mean KL(reference || model) of the next-token distributions per predicted token (nats), the
    share of tokens whose top-1 prediction agrees, and both perplexities."""
    windows = eval_windows(ids, seqlen, max_windows)
    device, ref_device = next(model.parameters()).device, next(reference.parameters()).device
    if model.config.vocab_size != reference.config.vocab_size:
        raise CrossblockError(f"the reference's vocabulary ({reference.config.vocab_size}) is not the model's "
                              f"({model.config.vocab_size}): pass the model it was quantized from")
    kl = agree = nll = nll_ref = 0.0
    count = 0
    for window in tqdm(windows.split(1), desc="reference", disable=not progress, unit="window"):
        out = model(input_ids=window.to(device), use_cache=False).logits[0, :-1].float().log_softmax(-1).cpu()
        ref = reference(input_ids=window.to(ref_device), use_cache=False).logits[0, :-1].float().log_softmax(-1).cpu()
        target = window[0, 1:]
        kl += (ref.exp() * (ref - out)).sum().item()
        agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
        nll -= out.gather(-1, target[:, None]).sum().item()
        nll_ref -= ref.gather(-1, target[:, None]).sum().item()
        count += target.numel()
    return {"kl": kl / count, "top1": agree / count, "ppl": ppl_of(nll / count),
            "ppl_reference": ppl_of(nll_ref / count), "tokens": count}
