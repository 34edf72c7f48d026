"""CBQ's coarse-to-fine preprocessing (CFP), run once on the FP model before quantization.

Block by block, on the calibration data flowing through the (already preprocessed) FP prefix:
1. each quantized layer's outlier weights (|W| above the detector's threshold, outliers.py) are
   truncated to the threshold;
2. the block runs, recording the per-channel maximum |input| of the layers fed by each norm,
   of down_proj (fc2) fed by up_proj (fc1) and of o_proj fed by v_proj (the maximum over the
   query heads that share a value head), and the next block's input;
3. outlier channels c of those maxima get s_c = (max_c / max_non_outlier) ** alpha, folded
   exactly into the source and its consumers (fold.py): the function stays the same, the
   consumers' inputs lose their outlier channels. Sources are folded in block order (norms
   first): each peak was measured before any fold, and folds on different paths do not
   interact.
Truncation comes first so that it never clips the columns the scaling has just enlarged (that
would change the function the fold preserves).
"""
from __future__ import annotations


import torch
from tqdm.auto import tqdm

from ..model.adapter import block_linears, capture, find_blocks, is_linear, is_skipped
from ..quant.linear import weight_of
from ..model.architectures import architecture
from .fold import consumer_channels, fold_pairs, fold_scale
from .outliers import find_outliers


def _record_peak(peak: dict, name: str):
    """Pre-hook on a consumer: the per-channel max |input| it sees from `name`."""
    def hook(module, args):
        m = args[0].detach().abs().flatten(0, -2).amax(0).float()
        peak[name] = m if name not in peak else torch.maximum(peak[name], m)
    return hook


def source_peaks(model, block, source: str, peak: torch.Tensor):
    """(per-channel peak of the source's outputs, consumer -> source channel map or None): the
    peak of a value channel is the largest over the query heads it feeds."""
    src = block.get_submodule(source)
    width = weight_of(src).shape[0] if is_linear(src) else len(peak)  # a norm is as wide as its consumers
    index = consumer_channels(model, width, len(peak))
    if index is None:
        return peak, None
    index = index.to(peak.device)
    return torch.zeros(width, device=peak.device).scatter_reduce(0, index, peak, "amax", include_self=False), index


@torch.no_grad()
def cfp(model, ids: torch.Tensor, alpha: float = 0.7, weights: bool = False, batch_size: int = 8,
        skip: list[str] = (), device="cpu", progress: bool = True) -> list[dict]:
    """Preprocess `model` in place; returns, per block, the outlier channels found behind each
    norm and the outlier weights truncated in each layer (none with `weights` off). Layers whose
    name contains a `skip` substring keep their weights."""
    prefix, blocks = find_blocks(model)
    pairs = fold_pairs(model, blocks[0])  # refuses unknown architectures before any work
    offset = architecture(getattr(model.config, "model_type", None)).norm_offset
    x, calls = capture(model, ids, batch_size=batch_size)
    found = []
    for i in tqdm(range(len(blocks)), desc="cfp", disable=not progress):
        block = blocks[i].to(device)
        truncated = {}
        for name, m in block_linears(block) if weights else ():
            if not is_skipped(skip, prefix, i, name):
                out = find_outliers(m.weight.abs())
                if out.count:
                    m.weight.clamp_(-out.threshold, out.threshold)
                truncated[name] = out.count
        peak: dict[str, torch.Tensor] = {}
        hooks = [block.get_submodule(consumers[0]).register_forward_pre_hook(_record_peak(peak, n))
                 for n, consumers in pairs]
        try:
            x = torch.cat([calls[i](block, b.to(device)).float().cpu() for b in x.split(batch_size)])
        finally:
            for h in hooks:
                h.remove()
        channels = {}
        for source, linears in pairs:
            source_peak, index = source_peaks(model, block, source, peak[source])
            out = find_outliers(source_peak)
            channels[source] = out.count
            if out.count and out.threshold > 0:
                s = (source_peak / out.threshold).clamp(min=1) ** alpha
                fold_scale(block, source, linears, s, offset, index)
        if torch.device(device).type != "cpu":
            block.to("cpu")
        found.append({"block": i, "outlier_channels": channels, "outlier_weights": truncated})
    return found
