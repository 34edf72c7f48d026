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

import json

import torch
from tqdm.auto import tqdm

from ..model.adapter import block_linears, capture, find_blocks, is_linear
from ..quant.linear import weight_of
from ..recipe import Recipe
from .fold import NORM_OFFSET, consumer_channels, fold_pairs, fold_scale
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
def cfp(model, ids: torch.Tensor, recipe: Recipe, device="cpu", progress: bool = True) -> list[dict]:
    """Preprocess `model` in place; returns, per block, the outlier channels found behind each
    norm and the outlier weights truncated in each layer (none with recipe.cfp_weights off)."""
    _, blocks = find_blocks(model)
    pairs = fold_pairs(model, blocks[0])  # refuses unknown architectures before any work
    offset = NORM_OFFSET.get(getattr(model.config, "model_type", None), 0.0)
    x, calls = capture(model, ids, batch_size=recipe.batch_size)
    found = []
    for i in tqdm(range(len(blocks)), desc="cfp", disable=not progress):
        block = blocks[i].to(device)
        weights = {}
        for name, m in block_linears(block) if recipe.cfp_weights else ():
            if not any(s in name for s in recipe.skip):
                out = find_outliers(m.weight.abs())
                if out.count:
                    m.weight.clamp_(-out.threshold, out.threshold)
                weights[name] = out.count
        peak: dict[str, torch.Tensor] = {}
        hooks = [block.get_submodule(consumers[0]).register_forward_pre_hook(_record_peak(peak, n))
                 for n, consumers in pairs]
        try:
            x = torch.cat([calls[i](block, b.to(device)).float().cpu() for b in x.split(recipe.batch_size)])
        finally:
            for h in hooks:
                h.remove()
        channels = {}
        for source, linears in pairs:
            source_peak, index = source_peaks(model, block, source, peak[source])
            out = find_outliers(source_peak)
            channels[source] = out.count
            if out.count and out.threshold > 0:
                s = (source_peak / out.threshold).clamp(min=1) ** recipe.cfp_alpha
                fold_scale(block, source, linears, s, offset, index)
        if torch.device(device).type != "cpu":
            block.to("cpu")
        found.append({"block": i, "outlier_channels": channels, "outlier_weights": weights})
    return found


def preprocess_folder(model_path: str, calib_files, out, recipe: Recipe, device: str | None = None,
                      dtype: str = "float32", overwrite: bool = False, progress: bool = True,
                      trust_remote_code: bool = False):
    """`crossblock preprocess`: write the CFP-preprocessed FP model (and cfp.json) to `out`."""
    from .. import api
    from ..data.text import digest, read_texts
    from ..export.common import save_folder
    from ..output import staged_dir

    api.check_output(out, overwrite, needed=[model_path, calib_files])
    calib = read_texts(calib_files)
    model, tokenizer = api.load_model(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
    api.check_weights_finite(model)
    ids = api.calibration_ids(tokenizer, calib, recipe)
    found = cfp(model, ids, recipe, device or api.default_device(), progress)
    with staged_dir(out) as tmp:
        save_folder(model, tokenizer, tmp)
        info = {"model": str(model_path), "cfp_alpha": recipe.cfp_alpha, "cfp_weights": recipe.cfp_weights,
                "skip": recipe.skip,
                "calibration": {"nsamples": ids.shape[0], "seqlen": ids.shape[1], "sha256": digest(ids)},
                "cfp": found}
        (tmp / "cfp.json").write_text(json.dumps(info, indent=1) + "\n")
    return found
