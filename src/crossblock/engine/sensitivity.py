"""What rounding each unit (engine/allocate.py) to each option costs the model: mixed precision's
sensitivity, a (units, options) table, per token of the measured rows.

- kl, the reference: the mean KL(FP || quantized) of the next-token distributions when that unit
  alone is rounded to nearest on that option. One forward pass per unit and option.
- fisher: 1/2 sum F * (W - Q(W))^2, F the diagonal Fisher information of the model's own
  next-token distribution (squared gradients of log p(y), y sampled from the FP model; one
  backward pass per row). That is the second-order term of the same KL around the FP model, so it
  predicts it, downstream layers included, with no pass per option.
- hessian: sum (W - Q(W))^2 diag(X^T X) per layer (GPTQ's objective with its Hessian's diagonal;
  one forward pass): the error of each layer's own output, blind to what follows it.
- gptq: the same Fisher, taken at each layer's output: 1/2 E[(g . e x)^2] over tokens, g the
  gradient of log p(y) at the layer's output, x its input and e = W - GPTQ(W) in activation order
  (the `gptq` preset's; GPTQ on the rows' own Hessian, where its error is 1.3-3.7x below what it
  leaves on other rows: fitting it on the other calibration rows was measured, 2-3x the time and
  no better, bench/results/smollm2_bits_gptq.md session 18). The full quadratic form: the output
  channels' errors weighed together, as the gradient couples them. GPTQ trades a larger weight
  error for errors that cancel in the layer's output; a cost of round-to-nearest errors (fisher)
  cannot see how much of each option's error GPTQ recovers. One forward pass per row for the
  Hessians, one GPTQ per layer and option (the errors are held, in chunks of units: `HELD`), one
  backward pass per row per chunk; uniform grids, dense layers.
bench/bits_sensitivity.py measures how well the proxies rank the units as the reference does.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CrossblockError
from ..model.adapter import find_blocks
from ..precision import autocast
from ..quant.experts import expert_params, is_fused_experts
from ..quant.linear import is_conv1d, weight_of
from .gptq import HessianAccumulator, gptq_on_grid

MEASURES = ("fisher", "hessian", "kl", "gptq")
READS_INPUTS = ("hessian", "gptq")  # each layer's own inputs: dense layers only (dense_modules)


def members(model: nn.Module, unit) -> list[tuple[nn.Module, str, nn.Parameter, bool]]:
    """(module, local name, parameter, is experts) of each weight matrix of `unit`."""
    block = find_blocks(model)[1][unit.block]
    out = []
    for local in unit.members:
        module = block.get_submodule(local)
        if is_fused_experts(module):
            out += [(module, local, p, True) for p in expert_params(module).values()]
        else:
            out.append((module, local, module.weight, False))
    return out


def as_rows(t: torch.Tensor, module: nn.Module, experts: bool) -> torch.Tensor:
    """A weight (or its gradient) as (rows, width), sharing storage: (out, in), or (E * out, in)."""
    if experts:
        return t.view(-1, t.shape[-1])
    return t.t() if is_conv1d(module) else t


def error(model, unit, grid, count: int) -> list[torch.Tensor]:
    """(W - Q(W)) of each matrix of `unit` rounded to nearest on `grid` (a layer the grid leaves in
    full precision: zeros)."""
    out = []
    for module, local, p, experts in members(model, unit):
        w = as_rows(p.data, module, experts).float()
        layer_grid = grid.for_layer(local, unit.block, count, w.shape[1])
        out.append(torch.zeros_like(w) if layer_grid is None else w - layer_grid.rtn(w))
    return out


@contextlib.contextmanager
def rounded(model, unit, grid, count: int):
    """The model with `unit` alone rounded to nearest on `grid`."""
    saved = []
    errors = error(model, unit, grid, count)
    for (module, _, p, experts), e in zip(members(model, unit), errors):
        saved.append((p, p.data.clone()))
        w = as_rows(p.data, module, experts)
        w.copy_((w.float() - e).to(w.dtype))
    try:
        yield
    finally:
        for p, data in saved:
            p.data.copy_(data)


def logits(model, row: torch.Tensor, device, precision: str) -> torch.Tensor:
    with autocast(device, precision):
        return model(input_ids=row[None].to(device), use_cache=False).logits[0, :-1].float()


@torch.no_grad()
def kl_costs(model, units, grids, rows, device, precision) -> torch.Tensor:
    reference = [F.log_softmax(logits(model, r, device, precision), -1) for r in rows]
    count = len(find_blocks(model)[1])
    out = torch.zeros(len(units), len(grids), dtype=torch.float64)
    for k, unit in enumerate(units):
        for j, grid in enumerate(grids):
            with rounded(model, unit, grid, count):
                kl = [F.kl_div(F.log_softmax(logits(model, r, device, precision), -1), ref, log_target=True,
                               reduction="sum") for r, ref in zip(rows, reference)]
            out[k, j] = float(sum(kl)) / sum(ref.shape[0] for ref in reference)
    return out


def sampled_log_likelihood(model, row, device, precision, generator) -> tuple[torch.Tensor, int]:
    """(sum log p(y), tokens) with y sampled from the FP model's own distribution: the gradients of
    this are the Fisher information of the model's KL."""
    out = logits(model, row, device, precision)
    with torch.no_grad():
        y = torch.multinomial(F.softmax(out, -1), 1, generator=generator)
    return F.log_softmax(out, -1).gather(-1, y).sum(), out.shape[0]


def fisher_costs(model, units, grids, rows, device, precision, seed: int = 0) -> torch.Tensor:
    matrices = [m for u in units for m in members(model, u)]
    params = [p for _, _, p, _ in matrices]
    squares = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    generator = torch.Generator(device=device).manual_seed(seed)
    tokens = 0
    for p in params:
        p.requires_grad_(True)
    try:
        for r in rows:
            loss, n = sampled_log_likelihood(model, r, device, precision, generator)
            for s, g in zip(squares, torch.autograd.grad(loss, params)):
                s += g.float() ** 2
            tokens += n
    finally:
        for p in params:
            p.requires_grad_(False)
    fisher = {id(p): s for p, s in zip(params, squares)}
    return weighted_costs(model, units, grids, lambda module, p, experts: as_rows(fisher[id(p)], module, experts),
                          0.5 / tokens)


@torch.no_grad()
def input_moments(model, modules, rows, device, precision, diagonal: bool) -> dict:
    """id(module) -> the running mean of 2 x x^T (its diagonal: 2 x^2) of the module's inputs over
    `rows`, one forward pass per row."""
    moments = {id(m): HessianAccumulator(weight_of(m).shape[1], device, diagonal) for m in modules}
    hooks = [m.register_forward_pre_hook(lambda m, args: moments[id(m)].add(args[0].detach())) for m in modules]
    try:
        for r in rows:
            logits(model, r, device, precision)
    finally:
        for h in hooks:
            h.remove()
    return moments


def hessian_costs(model, units, grids, rows, device, precision) -> torch.Tensor:
    moments = input_moments(model, dense_modules(model, units, "hessian"), rows, device, precision, diagonal=True)
    # sum (W - Q(W))^2 E[x^2] = 1/2 sum (W - Q(W))^2 E[2 x^2]
    return weighted_costs(model, units, grids, lambda module, p, experts: moments[id(module)].h[None, :], 0.5)


@torch.no_grad()
def weighted_costs(model, units, grids, weight, factor: float) -> torch.Tensor:
    """factor * sum weight * (W - Q(W))^2 over each unit's matrices, per option."""
    count = len(find_blocks(model)[1])
    out = torch.zeros(len(units), len(grids), dtype=torch.float64)
    for k, unit in enumerate(units):
        for j, grid in enumerate(grids):
            errors = error(model, unit, grid, count)
            out[k, j] = factor * sum(float((weight(module, p, experts) * e ** 2).sum())
                                     for (module, _, p, experts), e in zip(members(model, unit), errors))
    return out


HELD = 1 << 29  # GPTQ errors the gptq measure holds at once (2 GiB in float32); more units: one more pass each


def gptq_costs(model, units, grids, rows, device, precision, seed: int = 0) -> torch.Tensor:
    dense_modules(model, units, "gptq")  # refuses fused experts
    chunks, held = [[]], 0  # consecutive units whose errors at every option fit in HELD
    for k, unit in enumerate(units):
        if chunks[-1] and (held + unit.weights) * len(grids) > HELD:
            chunks.append([])
            held = 0
        chunks[-1].append(k)
        held += unit.weights
    out = torch.zeros(len(units), len(grids), dtype=torch.float64)
    for chunk in chunks:
        out[chunk] = gptq_chunk_costs(model, [units[i] for i in chunk], grids, rows, device, precision, seed)
    return out


def gptq_errors(model, units, grids, rows, device, precision) -> dict:
    """(unit index, option index) -> [(module, W - GPTQ(W))] of each member matrix, GPTQ in activation
    order on the Hessian of `rows` (one forward pass per row)."""
    hessians = input_moments(model, dense_modules(model, units, "gptq"), rows, device, precision, diagonal=False)
    count = len(find_blocks(model)[1])
    errors = {}  # (unit, option) -> [(module, W - GPTQ(W))]
    for k, unit in enumerate(units):
        for j, grid in enumerate(grids):
            errors[k, j] = []
            for module, local, p, _ in members(model, unit):
                w = as_rows(p.data, module, False).float()
                layer_grid = grid.for_layer(local, unit.block, count, w.shape[1])
                if layer_grid is not None:
                    base, scale, zero = gptq_on_grid(w, hessians[id(module)].h, layer_grid, act_order=True)
                    errors[k, j].append((module, w - layer_grid.fake_quantize(base, scale, zero)))
    return errors


def output_gradients(model, modules, rows, device, precision, seed: int):
    """For each row: (inputs, grads, tokens), id(module) -> the module's input and the gradient of
    log p(y) at its output (y sampled from the FP model with `seed`), one backward pass per row;
    no weight gradient is kept."""
    inputs, outputs = {}, {}

    def record(module, args, output):
        inputs[id(module)] = args[0].detach()
        outputs[id(module)] = output

    generator = torch.Generator(device=device).manual_seed(seed)
    hooks = [m.register_forward_hook(record) for m in modules]
    embeddings = model.get_input_embeddings().weight
    embeddings.requires_grad_(True)  # a graph through every layer's output
    try:
        for r in rows:
            inputs.clear()
            outputs.clear()
            loss, n = sampled_log_likelihood(model, r, device, precision, generator)
            keys = list(outputs)
            yield inputs, dict(zip(keys, torch.autograd.grad(loss, [outputs[key] for key in keys]))), n
    finally:
        embeddings.requires_grad_(False)
        inputs.clear()
        outputs.clear()
        for h in hooks:
            h.remove()


def gptq_chunk_costs(model, units, grids, rows, device, precision, seed: int) -> torch.Tensor:
    """The gptq measure of `units`: GPTQ's error at every option, then its output-form cost."""
    errors = gptq_errors(model, units, grids, rows, device, precision)
    return output_costs(model, dense_modules(model, units, "gptq"), errors, (len(units), len(grids)), rows, device,
                        precision, seed)


def output_costs(model, modules, errors: dict, shape, rows, device, precision, seed: int) -> torch.Tensor:
    """1/2 E[(g . e x)^2] over the tokens of `rows` of each entry of `errors`, (unit, option) ->
    [(module, e)], as a `shape` table: one backward pass per row (y sampled with `seed`: the same
    draws for every call); `modules` are every module the errors name."""
    out = torch.zeros(shape, dtype=torch.float64)
    tokens = 0
    for inputs, grads, n in output_gradients(model, modules, rows, device, precision, seed):
        with torch.no_grad():
            for (k, j), pairs in errors.items():
                for module, e in pairs:
                    x, g = inputs[id(module)].float(), grads[id(module)].float()
                    # g . (e x) per token: the output error along the gradient, all channels at once
                    out[k, j] += float((((x @ e.t()) * g).sum(-1) ** 2).sum())
        tokens += n
    return out * 0.5 / tokens


def dense_modules(model, units, measure: str) -> list[nn.Module]:
    """The modules of every unit's matrices; refused for fused MoE experts, whose inputs and
    outputs are internal to the experts module."""
    matrices = [m for u in units for m in members(model, u)]
    if any(experts for *_, experts in matrices):
        raise CrossblockError(f"bits measure {measure} does not see fused MoE experts' inputs (they are internal to "
                              "the experts module): use measure fisher or kl")
    return list({id(module): module for module, *_ in matrices}.values())


def costs(measure: str, model, units, grids, rows, device, precision, seed: int = 0) -> torch.Tensor:
    """The (units, options) sensitivity table by `measure` (MEASURES)."""
    if measure == "kl":
        return kl_costs(model, units, grids, rows, device, precision)
    if measure == "fisher":
        return fisher_costs(model, units, grids, rows, device, precision, seed)
    if measure == "gptq":
        return gptq_costs(model, units, grids, rows, device, precision, seed)
    return hessian_costs(model, units, grids, rows, device, precision)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two equally long sets of values (ties broken by position)."""
    ra, rb = (t.flatten().double().argsort().argsort().double() for t in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))
