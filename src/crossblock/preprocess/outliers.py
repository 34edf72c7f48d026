"""CBQ's coarse-to-fine outlier detection on a set of non-negative magnitudes (per-channel
activation maxima, or |W| of one layer).

1. Coarse: candidates are the values above q3 + λ1·IQR (Tukey's fence, λ1 = 1.5).
2. Fine: splitting off the top k candidates scores
       M(k) = gap_k² − λ2·Var(rest_k)
   where gap_k is the smallest outlier minus the largest value left and rest_k is every value
   left (the non-outlier set). The best k wins. k = 0 (no outliers) scores 0, so outliers exist
   only above a gap wider than √λ2 standard deviations of the rest. The gap is squared so that
   both terms have the same units and the split does not depend on the values' scale. Without
   the k = 0 option a plain Gaussian sample would always lose its top values: Tukey's fence
   alone flags ~0.35% of it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

LAMBDA1 = 1.5
LAMBDA2 = 1.0


@dataclass
class Outliers:
    count: int          # how many values lie above the threshold
    threshold: float    # the largest non-outlier value


def find_outliers(values: torch.Tensor, lam1: float = LAMBDA1, lam2: float = LAMBDA2) -> Outliers:
    v = values.detach().flatten().double()
    n = v.numel()
    if n < 4:
        return Outliers(0, v.max().item() if n else 0.0)
    q1 = v.kthvalue((n - 1) // 4 + 1).values
    q3 = v.kthvalue(3 * (n - 1) // 4 + 1).values
    is_cand = v > q3 + lam1 * (q3 - q1)
    rest_max = v[~is_cand].max()
    top = v[is_cand].sort(descending=True).values   # the m candidates, largest first
    m = len(top)
    if m == 0:
        return Outliers(0, rest_max.item())
    # rest_k = everything but top[:k], for k = 1..m, from running sums (no full sort)
    size = n - torch.arange(1, m + 1, dtype=torch.float64, device=v.device)
    mean = (v.sum() - top.cumsum(0)) / size
    var = (v.square().sum() - top.square().cumsum(0)) / size - mean ** 2
    gap = top - torch.cat([top[1:], rest_max.view(1)])
    score = gap ** 2 - lam2 * var
    k = int(score.argmax()) + 1
    if score[k - 1] <= 0:
        return Outliers(0, top[0].item())
    return Outliers(k, (top[k] if k < m else rest_max).item())
