"""GPTQ (Frantar et al. 2022) for one linear layer, given the Hessian of its inputs.

H = 2/n Σ x xᵀ + λI (λ = damp · mean diag). Columns are quantized in order (or by descending
diag(H) with act_order) and each column's error is spread onto the columns not yet quantized
through the upper Cholesky factor of H⁻¹, in lazy batches of `block` columns. Group scales are
taken from the error-updated weights when a group starts (min/max, or with clip_search the
clipping of least weight error); with act_order they are fixed up front from the original
weights ("static groups") so that group membership stays column // g.
"""
from __future__ import annotations

import torch

from ..quant.grid import minmax_grid, num_groups, search_clip
from ..distributed import all_reduce_
from ..errors import CrossblockError
from ..precision import exact


class HessianAccumulator:
    """Running mean of 2·x xᵀ over every token the layer sees; `diagonal`: only its diagonal, 2·x²
    (what imatrix's clipping search weighs errors by), a vector instead of a width² matrix."""

    def __init__(self, in_features: int, device, diagonal: bool = False):
        shape = (in_features,) if diagonal else (in_features, in_features)
        self.h = torch.zeros(shape, device=device, dtype=torch.float32)
        self.count = 0

    def add(self, x: torch.Tensor):
        x = x.reshape(-1, x.shape[-1]).float()
        n = x.shape[0]
        self.h *= self.count / (self.count + n)
        self.count += n
        x = x * (2 / self.count) ** 0.5
        if self.h.ndim == 1:  # diagonal
            self.h += (x * x).sum(0)
            return
        # the hooks fire inside the engine's bf16 autocast: a bf16 x xᵀ is not positive definite
        # enough for Cholesky (seen on an H200: a bf16 model's layer failed at order 54)
        with exact(x.device):
            self.h += x.t() @ x

    def all_reduce(self):
        """Combine the running means of every rank, weighted by their token counts."""
        total = all_reduce_(torch.tensor(float(self.count), device=self.h.device))
        self.h = all_reduce_(self.h * self.count) / total.clamp(min=1)
        self.count = int(total.item())


def inverse_cholesky(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹, λ = damp · mean(diag H); a Hessian that is not positive
    definite at that damping (too few tokens for the width) gets 10x and 100x the damping."""
    eye = torch.eye(h.shape[0], device=h.device)
    for factor in (1, 10, 100):
        lower, info = torch.linalg.cholesky_ex(h + factor * damp * torch.mean(torch.diag(h)) * eye)
        if info.item() == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
    raise CrossblockError(f"GPTQ: the Hessian of a layer is not positive definite even at damping {100 * damp:g}; "
                          "calibrate on more tokens")


def _group_grid(w, bits, sym, scale_dtype, clip_search):
    """Scale and zero of one group of columns (out, g), each (out,)."""
    ratio = search_clip(w, bits, -1, sym, scale_dtype) if clip_search else None
    s, z = minmax_grid(w, bits, -1, sym, ratio, ratio, scale_dtype=scale_dtype)
    return s[:, 0], z[:, 0]


def _quantize_column(w, scale, zero, qmax):
    q = torch.clamp(torch.round(w / scale) + zero, 0, qmax)
    return q, scale * (q - zero)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, sym: bool,
                  damp: float = 0.01, block: int = 128, act_order: bool = False,
                  scale_dtype: torch.dtype | None = None, clip_search: bool = False, rules=None):
    """`rules`: a grid's own (group_grid(columns) -> (scale, zero), column(w, scale, zero) -> rounded
    column), e.g. FP4 (grids/fp4.py: gptq_rules); None: the uniform grid of bits / sym.
    Returns (W', scale, zero): the weight (out, in) float32 as error feedback had left each column
    when it was rounded, and the grid. Rounding W' to nearest on that grid gives GPTQ's integers;
    it is also where reconstruction starts from (`--init gptq`): a learnable rounding offset then
    explores GPTQ's neighbours instead of sitting on grid points."""
    w = weight.detach().float().clone()
    out, cin = w.shape
    h = hessian.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    g = cin if group_size == -1 else group_size
    qmax = 2 ** bits - 1
    if rules is None:
        rules = (lambda cols: _group_grid(cols, bits, sym, scale_dtype, clip_search),
                 lambda col, s, z: _quantize_column(col, s, z, qmax)[1])
    group_grid, round_column = rules
    groups = num_groups(cin, group_size)
    scale = torch.zeros(out, groups, device=w.device)
    zero = torch.zeros(out, groups, device=w.device)
    if act_order:
        for gi in range(groups):
            scale[:, gi], zero[:, gi] = group_grid(w[:, gi * g:(gi + 1) * g])
        perm = torch.argsort(torch.diag(h), descending=True)
    else:
        perm = torch.arange(cin, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_cholesky(h, damp)

    wq = torch.zeros_like(w)
    unrounded = torch.zeros_like(w)
    for i1 in range(0, cin, block):
        i2 = min(i1 + block, cin)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = perm[i1 + i].item()
            gi = col // g
            if not act_order and col % g == 0:
                # the group's columns as error feedback has left them so far
                upcoming = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g]
                scale[:, gi], zero[:, gi] = group_grid(upcoming)
            unrounded[:, i1 + i] = w1[:, i]
            wq[:, i1 + i] = round_column(w1[:, i], scale[:, gi], zero[:, gi])
            e = (w1[:, i] - wq[:, i1 + i]) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return unrounded[:, inv], scale, zero


def gptq_on_grid(w: torch.Tensor, h: torch.Tensor, grid, damp: float = 0.01, act_order: bool = False,
                 clip_search: bool = False):
    """GPTQ of `w` on a grid object (grids/: its own rules where it has them): (W', scale, zero)."""
    return gptq_quantize(w, h, grid.bits, grid.group_size, grid.sym, damp, act_order=act_order,
                         scale_dtype=grid.scale_torch_dtype, clip_search=clip_search,
                         rules=grid.gptq_rules(w, clip_search))
