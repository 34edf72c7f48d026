"""The window engine: one loop that runs every method.

Two chains of calibration activations move down the model: `fp` (inputs of block i in the FP
model) and `q` (inputs of block i in the model quantized so far). For each window of the schedule:
wrap its new blocks in QuantLinears (initialized by RTN or GPTQ), compute the target once
(propagated: FP blocks on the FP chain; homologous: FP blocks on the quantized chain), optimize
the window's quantization parameters against it, then freeze the blocks that leave the schedule
and advance both chains past them, recording each block's output error against FP.
"""
from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..model.adapter import BlockCall, block_linears, set_submodule
from ..quant.linear import QuantLinear
from ..recipe import Recipe
from .gptq import HessianAccumulator, gptq_quantize
from .schedule import Window, make_schedule


class SignSGD(torch.optim.Optimizer):
    """p <- p - lr * sign(grad): SignRound's optimizer (Cheng et al., AutoRound)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(torch.sign(p.grad), alpha=-group["lr"])


def quant_layers(blocks) -> list[QuantLinear]:
    return [m for b in blocks for m in b.modules() if isinstance(m, QuantLinear)]


@contextlib.contextmanager
def layer_mode(blocks, mode: str):
    """Run wrapped blocks as "fp" (original weights) or "rtn" (round-to-nearest baseline)."""
    layers = quant_layers(blocks)
    for m in layers:
        m.mode = mode
    try:
        yield
    finally:
        for m in layers:
            m.mode = "quant"


def window_loss(out: torch.Tensor, target: torch.Tensor, recipe: Recipe) -> torch.Tensor:
    loss = F.mse_loss(out.float(), target.float())
    if recipe.loss == "mse+kl":
        # CBQ's L2 + KL: KL(softmax(target) || softmax(out)) over the hidden dimension, per token.
        kl = F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(target.float(), -1),
                      log_target=True, reduction="none").sum(-1).mean()
        loss = loss + recipe.kl_weight * kl
    return loss


class WindowEngine:
    def __init__(self, blocks: nn.ModuleList, calls: list[BlockCall], recipe: Recipe,
                 device: torch.device | str = "cpu", progress: bool = True):
        self.blocks, self.calls, self.recipe = blocks, calls, recipe
        self.device = torch.device(device)
        self.progress = progress
        self.schedule = make_schedule(len(blocks), recipe.window, recipe.stride, recipe.lookahead)
        self.report: dict = {"windows": [], "blocks": []}

    # -- running blocks ------------------------------------------------------------------------
    def autocast(self):
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def run(self, lo: int, hi: int, h: torch.Tensor) -> torch.Tensor:
        """Blocks lo..hi (inclusive) on one batch already on the device."""
        with self.autocast():
            for j in range(lo, hi + 1):
                h = self.calls[j](self.blocks[j], h)
        return h

    @torch.no_grad()
    def run_all(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks lo..hi on every sequence, batch by batch; result float32 on CPU."""
        outs = [self.run(lo, hi, b.to(self.device)).float().cpu() for b in x.split(self.recipe.batch_size)]
        return torch.cat(outs)

    # -- wrapping and initialization -------------------------------------------------------------
    def wrap(self, j: int, x_in: torch.Tensor, generator: torch.Generator):
        r = self.recipe
        for name, module in block_linears(self.blocks[j]):
            if any(s in name for s in r.skip):
                continue
            ql = QuantLinear(module, r.wbits, r.group_size, r.sym, r.rounding, r.lwc, r.lora_rank, generator)
            set_submodule(self.blocks[j], name, ql)
        if r.init == "gptq":
            self.init_gptq(j, x_in)

    @torch.no_grad()
    def init_gptq(self, j: int, x_in: torch.Tensor):
        layers = quant_layers([self.blocks[j]])
        acc = {m: HessianAccumulator(m.in_features, self.device) for m in layers}
        hooks = [m.register_forward_pre_hook(lambda m, args: acc[m].add(args[0])) for m in layers]
        try:
            with layer_mode([self.blocks[j]], "fp"):
                self.run_all(j, j, x_in)
        finally:
            for h in hooks:
                h.remove()
        r = self.recipe
        for m in layers:
            wq, scale, zero = gptq_quantize(m.weight, acc[m].h, r.wbits, r.group_size, r.sym, r.damp, act_order=r.act_order)
            m.set_init(wq, scale, zero)

    # -- one window ----------------------------------------------------------------------------
    def optimizer(self, params):
        r = self.recipe
        if r.rounding == "signround":
            opt = SignSGD(params, lr=r.lr or 1.0 / r.iters)
            return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1 - step / r.iters)
        opt = torch.optim.Adam(params, lr=r.lr or 1e-3)
        return opt, None

    @torch.no_grad()
    def full_loss(self, w: Window, x_in: torch.Tensor, target: torch.Tensor) -> float:
        total = 0.0
        for xb, tb in zip(x_in.split(self.recipe.batch_size), target.split(self.recipe.batch_size)):
            out = self.run(w.start, w.target, xb.to(self.device))
            total += window_loss(out, tb.to(self.device), self.recipe).item() * len(xb)
        return total / len(x_in)

    def train(self, w: Window, x_in: torch.Tensor, target: torch.Tensor, generator: torch.Generator) -> dict:
        r = self.recipe
        layers = quant_layers([self.blocks[j] for j in w.trained])
        params = [p for m in layers for p in m.parameters()]
        if not params:
            return {"steps": 0}
        start_state = [p.detach().clone() for p in params]
        soft = r.rounding in ("adaround", "lora")
        lr_scale = 1.0
        for attempt in range(2):  # a non-finite loss restores the start and retries at half lr
            opt, sched = self.optimizer(params)
            for g in opt.param_groups:
                g["lr"] *= lr_scale
            order = torch.randperm(len(x_in), generator=generator)
            bar = tqdm(range(r.iters), desc=f"  window {w.start}-{w.end - 1}", leave=False,
                       disable=not self.progress)
            finite = True
            for step in bar:
                pos = (step * r.batch_size) % len(x_in)
                if pos + r.batch_size > len(x_in):
                    order = torch.randperm(len(x_in), generator=generator)
                    pos = 0
                idx = order[pos:pos + r.batch_size]
                out = self.run(w.start, w.target, x_in[idx].to(self.device))
                loss = window_loss(out, target[idx].to(self.device), r)
                if soft:
                    loss = loss + r.round_reg * self.rounding_penalty(layers, step)
                if not torch.isfinite(loss):
                    finite = False
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                for m in layers:
                    m.project()
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4g}")
            bar.close()
            if finite:
                return {"steps": r.iters, "retried": attempt > 0}
            with torch.no_grad():
                for p, p0 in zip(params, start_state):
                    p.copy_(p0)
            lr_scale *= 0.5
        return {"steps": 0, "retried": True, "nonfinite": True}

    def rounding_penalty(self, layers, step: int) -> torch.Tensor:
        # AdaRound schedule: no regularizer for the first 20% of steps, then beta 20 -> 2.
        warm = 0.2 * self.recipe.iters
        if step < warm:
            return torch.zeros((), device=self.device)
        beta = 20 + (2 - 20) * (step - warm) / max(1.0, self.recipe.iters - warm)
        return sum(m.rounding_penalty(beta) for m in layers) / len(layers)

    # -- the whole schedule --------------------------------------------------------------------
    def quantize(self, x0: torch.Tensor):
        r = self.recipe
        # chains: FP model, quantized model, and (for the report) the RTN-quantized model
        chains = {"fp": x0, "q": x0}  # never modified in place
        if r.trains or r.init != "rtn":
            chains["rtn"] = x0
        wrapped = set()
        bar = tqdm(self.schedule, desc="windows", disable=not self.progress, unit="window")
        for wi, w in enumerate(bar):
            t0 = time.time()
            generator = torch.Generator().manual_seed(r.seed * 1_000_003 + wi)
            torch.manual_seed(r.seed * 1_000_003 + wi)
            for j in range(w.start, w.target + 1):
                self.blocks[j].to(self.device)
            q = chains["q"]
            for j in w.trained:
                if j not in wrapped:
                    x_j = q if j == w.start else self.run_all(w.start, j - 1, q)
                    self.wrap(j, x_j, generator)
                    wrapped.add(j)
            entry = {"window": [w.start, w.end, w.target]}
            if r.trains:
                with layer_mode([self.blocks[j] for j in w.trained], "fp"):
                    target = self.run_all(w.start, w.target, q if r.target == "homologous" else chains["fp"])
                entry["loss_before"] = self.full_loss(w, q, target)
                entry.update(self.train(w, q, target, generator))
                entry["loss_after"] = self.full_loss(w, q, target)
                del target
                bar.set_postfix(loss=f"{entry['loss_after']:.4g}")
            self.advance(w, chains)
            if self.device.type != "cpu":
                for j in range(w.start, w.target + 1):
                    self.blocks[j].to("cpu")
            entry["seconds"] = round(time.time() - t0, 3)
            self.report["windows"].append(entry)
        return self.report

    @torch.no_grad()
    def advance(self, w: Window, chains: dict):
        """Freeze the blocks that leave the schedule and move every chain past them."""
        for j in w.finished:
            for m in quant_layers([self.blocks[j]]):
                m.freeze()
            with layer_mode([self.blocks[j]], "fp"):
                chains["fp"] = fp = self.run_all(j, j, chains["fp"])
            chains["q"] = self.run_all(j, j, chains["q"])
            entry = {"block": j, **self.output_error(chains["q"], fp)}
            if "rtn" in chains:
                with layer_mode([self.blocks[j]], "rtn"):
                    chains["rtn"] = self.run_all(j, j, chains["rtn"])
                entry["rtn"] = self.output_error(chains["rtn"], fp)
            if not math.isfinite(entry["mse"]):
                raise FloatingPointError(f"block {j} produced non-finite outputs after quantization")
            self.report["blocks"].append(entry)

    @staticmethod
    def output_error(x: torch.Tensor, ref: torch.Tensor) -> dict:
        mse = F.mse_loss(x, ref).item()
        return {"mse": mse, "rel_mse": mse / ref.pow(2).mean().item()}

    def restore(self):
        """Put the original modules back, now holding fake-quantized weights."""
        for block in self.blocks:
            for name, m in list(block.named_modules()):
                if isinstance(m, QuantLinear):
                    set_submodule(block, name, m.restore())
