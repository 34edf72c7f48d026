"""`finetune` stage: after the windows, the whole model as one last window.

The integers stay frozen; each quantized layer's scales (and, optionally, its zero points and the
blocks' norm weights) are trained end to end so that the quantized model's next-token
distribution matches the FP model's: KL(FP || quantized) on the calibration tokens (or plain
next-token cross-entropy). EfficientQAT's end-to-end step (Llama-2-7B W2 g64: 8.53 -> 7.68 avg.
ppl after block-wise training) is this stage.

- The FP teacher costs no memory: until the pipeline ends every quantized layer still wraps its
  FP weight, so the teacher is the same model with its layers in "fp" mode, run per batch
  (no-grad). Its logits are never stored: a 49k-152k vocabulary x 65k calibration tokens would
  be 13-40 GB in float32. Per batch, they are kept in the compute precision (bf16 under
  autocast) and the KL is taken a chunk of tokens at a time (ChunkedKL): neither model's float32
  log-softmax over the vocabulary exists whole.
- Scales train as s0 * exp(p) (p from 0): the learning rate is relative to each group's step,
  whatever the weights' magnitude, and a scale never changes sign. Zero points train through a
  straight-through round, so they stay integers. Scales are rounded (straight-through) to the
  dtype the format stores, so the exported checkpoint is what was trained.
- The last `holdout` of the calibration sequences is never trained on: the stage measures the
  KL there before training and every `eval_every` steps, and keeps the best step (the start, if
  no step beat it), so it never makes the model worse on tokens it did not fit.
- Blocks run under activation checkpointing (memory: one block's activations for backward) unless
  every block's activations for a batch fit in a quarter of the free memory (`keeps_activations`):
  on a small model the recompute is a sixth of a step for nothing (SmolLM2 on CPU: -16%).
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..distributed import all_reduce_, all_reduce_grads_, local_part, shard
from ..errors import CrossblockError
from ..engine.checkpoint import checkpoint_path, read_layers, write_atomic
from ..engine.reconstruct import shuffled_batches
from ..model.adapter import find_blocks
from ..precision import autocast
from ..quant.grid import round_ste
from ..quant.linear import QuantLinear
from ..config import setting
from .base import STAGES, Stage

LOSSES = ("kl", "ce")


@STAGES.register("finetune")
@dataclass
class Finetune(Stage):
    """The whole model as one last window: scales trained end to end against the FP model."""
    needs_whole_model = True
    order = 40
    steps: int = setting(100, "optimizer steps of the end-to-end finetune", off=0)
    # Adam, on log-scales (relative): ~0.2% of a scale per step (EfficientQAT's 2e-5 on raw scales of ~0.01)
    lr: float = setting(2e-3, "Adam's learning rate on log-scales (relative)")
    batch_size: int = setting(2, "sequences per step")
    loss: str = setting("kl", "kl: KL(FP || quantized) per token; ce: next-token cross-entropy", choices=LOSSES)
    zeros: bool = setting(False, "also train zero points (rounded straight-through: they stay integers)")
    norms: bool = setting(False, "also train the blocks' norm weights")
    holdout: float = setting(0.125, "fraction of the calibration sequences kept to pick the best step")
    eval_every: int = setting(20, "steps between measurements on the held-out sequences")

    def check(self):
        self.refuse(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        self.refuse(self.lr > 0, f"lr must be positive, got {self.lr}")
        self.refuse(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        self.refuse(0 < self.holdout < 1, f"holdout must be in (0, 1), got {self.holdout}")
        self.refuse(self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}")

    def run(self, model, job):
        t0 = time.time()
        layers = [m for m in model.modules() if isinstance(m, QuantLinear) and m.q is not None]
        if not layers:
            raise RuntimeError("finetune runs after a stage that quantizes (windows)")
        if self.zeros and job.grid.sym:
            raise CrossblockError("finetune zeros has no effect on a symmetric grid (its zero point is fixed)")
        n = job.ids.shape[0]
        held = max(1, round(self.holdout * n))
        if n - held < 1:
            raise CrossblockError(f"finetune needs at least 2 calibration sequences (holdout {held} of {n})")
        train_ids, held_ids = job.ids[:n - held], job.ids[n - held:]
        with job.blocks.whole_model(model, self, job.device):  # every block at once (a streamed store refuses)
            state, resumed_at = self.fit(model, job, layers, train_ids, held_ids)
        job.report["finetune"] = {"held_out_sequences": len(held_ids), "held_out_loss_before": state["start"],
                                  "held_out_loss_after": state["best"], "best_step": state["best_step"],
                                  "evals": state["evals"], "loss_trace": state["trace"],
                                  "recompute": state.get("recompute"),
                                  **({"stopped": state["stopped"]} if "stopped" in state else {}),
                                  "resumed_at_step": resumed_at, "seconds": round(time.time() - t0, 2)}

    def fit(self, model, job, layers, train_ids: torch.Tensor, held_ids: torch.Tensor) -> tuple[dict, int | None]:
        """Train the grids of `layers` (the model on the device) and bake the best step into them;
        returns the training state and the step a checkpoint resumed at (None: from the start)."""
        device = torch.device(job.device)
        params = trainable(model, layers, self, job.grid.scale_torch_dtype)
        teacher_norms = {k: p.detach().clone() for k, p in params.items() if k.startswith("norm.")}
        # zero points move in integer units: about 1.5 units over the stage, like Adam's roundings
        zero_shifts = [p for k, p in params.items() if k.endswith("zero_shift")]
        groups = [{"params": [p for k, p in params.items() if not k.endswith("zero_shift")], "lr": self.lr},
                  {"params": zero_shifts, "lr": 1.5 / self.steps}]
        opt = torch.optim.Adam([g for g in groups if g["params"]], lr=self.lr)
        generator = torch.Generator().manual_seed(job.data.seed * 1_000_003 + 999_983)
        batches = shuffled_batches(len(train_ids), min(self.batch_size, len(train_ids)), generator)
        local_train, local_held = shard(train_ids), shard(held_ids)

        forward = lambda ids: forward_logits(model, ids, device, job.precision)  # noqa: E731
        held_out = lambda: self.held_out_loss(forward, layers, params, teacher_norms, local_held, device)  # noqa: E731
        ckpt = None if job.checkpoint_dir is None else checkpoint_file(job.checkpoint_dir)
        saved = read_state(ckpt, job.fingerprint, params) if ckpt is not None and ckpt.is_file() else None
        if saved is None:
            best = held_out()
            state = {"step": 0, "start": best, "best": best, "best_step": 0, "evals": [(0, round(best, 6))],
                     "trace": []}
            best_state = snapshot(params)
        else:  # resume: parameters, optimizer moments and the batch order as they were
            state, best_state, moments = saved
            for name, p in params.items():
                opt.state[p] = {k: moments[f"{k}/{name}"] for k in ("step", "exp_avg", "exp_avg_sq")}
            for _ in range(state["step"]):
                next(batches)
        bar = tqdm(range(state["step"] + 1, self.steps + 1), desc="finetune", disable=not job.progress, leave=False)
        state["recompute"] = not keeps_activations(layers, self.batch_size * train_ids.shape[1], device)
        with checkpointing(model) if state["recompute"] else contextlib.nullcontext():
            for step in bar:
                batch = next(batches)
                idx = local_part(batch)
                opt.zero_grad(set_to_none=True)
                loss = torch.zeros((), device=device)
                if len(idx):
                    ids = local_train[idx].to(device)
                    loss = self.batch_loss(forward, layers, params, teacher_norms, ids) * (len(idx) / len(batch))
                global_loss = all_reduce_(loss.detach().clone())
                if not torch.isfinite(global_loss):
                    state["stopped"] = f"non-finite loss at step {step}"
                    break
                if loss.requires_grad:
                    loss.backward()
                all_reduce_grads_(list(params.values()))
                opt.step()
                state["trace"].append(round(global_loss.item(), 6))
                state["step"] = step
                if step % self.eval_every == 0 or step == self.steps:
                    held_loss = held_out()
                    state["evals"].append((step, round(held_loss, 6)))
                    if held_loss < state["best"]:
                        state["best"], state["best_step"], best_state = held_loss, step, snapshot(params)
                    bar.set_postfix(held_out=f"{held_loss:.4g}")
                    if ckpt is not None:
                        write_state(ckpt, job.fingerprint, state, params, best_state, opt)
        bar.close()
        restore(params, best_state)
        for m in layers:
            bake(m, self.zeros, job.grid.scale_torch_dtype)
        return state, saved[0]["step"] if saved else None

    def batch_loss(self, forward, layers, params, teacher_norms, ids: torch.Tensor) -> torch.Tensor:
        """Mean per-token loss of the quantized model on `ids` (`forward(ids)`: its logits; teacher:
        the same model in fp mode, with its original norm weights)."""
        logits = forward(ids)
        if self.loss == "ce":
            return F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        with torch.no_grad(), teacher_mode(layers, params, teacher_norms):
            teacher = forward(ids)  # no graph; bf16 under autocast: half a float32 copy
        return ChunkedKL.apply(logits.flatten(0, 1), teacher.flatten(0, 1), kl_chunk_rows(logits.shape[-1]))

    @torch.no_grad()
    def held_out_loss(self, forward, layers, params, teacher_norms, local_held: torch.Tensor, device) -> float:
        sums = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(local_held), self.batch_size):
            ids = local_held[i:i + self.batch_size].to(device)
            loss = self.batch_loss(forward, layers, params, teacher_norms, ids).item()
            sums += torch.tensor([loss * len(ids), len(ids)], dtype=torch.float64)
        sums = all_reduce_(sums)
        return (sums[0] / sums[1]).item() if sums[1] else math.nan


KL_CHUNK_ELEMENTS = 1 << 24  # logits per chunk of the KL: 64 MiB of float32 temporaries at a time


def kl_chunk_rows(vocab: int) -> int:
    return max(1, KL_CHUNK_ELEMENTS // vocab)


def token_kl(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """KL(softmax(teacher) || softmax(student)) of each row of (tokens, vocab) logits, in float32."""
    return F.kl_div(F.log_softmax(student.float(), -1), F.log_softmax(teacher.float(), -1), log_target=True,
                    reduction="none").sum(-1)


class ChunkedKL(torch.autograd.Function):
    """token_kl(student, teacher).mean() and its gradient, `rows` tokens at a time: no float32
    log-softmax of either model over the whole batch ever exists (autograd would keep the
    student's and exp of the teacher's, 2 x 200 MB for 2 x 512 tokens of a 49k vocabulary); the
    backward recomputes each chunk's. Both are, op for op, what autograd computes through
    token_kl (kl_div is exp(t) * (t - s)), so the result is the same to the bit."""

    @staticmethod
    def forward(ctx, student, teacher, rows: int):
        ctx.save_for_backward(student, teacher)
        ctx.rows = rows
        return torch.cat([token_kl(s, t) for s, t in zip(student.split(rows), teacher.split(rows))]).mean()

    @staticmethod
    def backward(ctx, grad):
        student, teacher = ctx.saved_tensors
        g = grad / student.shape[0]  # mean's backward
        out = torch.empty_like(student)
        for s, t, o in zip(student.split(ctx.rows), teacher.split(ctx.rows), out.split(ctx.rows)):
            log_s, log_t = F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1)
            # d/d log_s of exp(log_t) * (log_t - log_s), summed: -g exp(log_t); then log_softmax's backward
            o.copy_(torch._log_softmax_backward_data(-(g * log_t.exp()), log_s, -1, torch.float32))
        return out, None, None


def forward_logits(model, ids: torch.Tensor, device, precision: str) -> torch.Tensor:
    """The model's next-token logits for every position but the last, computed in `precision`
    (bf16: autocast; the losses are taken in float32 outside it)."""
    with autocast(device, precision):
        return model(input_ids=ids, use_cache=False).logits[:, :-1]


@contextlib.contextmanager
def teacher_mode(layers, params, teacher_norms):
    """The FP model: quantized layers run their FP weights, trained norms their original weights."""
    trained = {k: params[k].detach().clone() for k in teacher_norms}
    for m in layers:
        m.mode = "fp"
    for k, w in teacher_norms.items():
        params[k].data.copy_(w)
    try:
        yield
    finally:
        for m in layers:
            m.mode = "quant"
        for k, w in trained.items():
            params[k].data.copy_(w)


def free_memory(device) -> int | None:
    """Bytes the device can still give: CUDA's free memory, or the host's available RAM as
    --low-memory's automatic choice reads it (None where neither /proc nor psutil says)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    from ..stream import available_ram
    try:
        return available_ram()
    except ImportError:  # no /proc/meminfo and no psutil
        return None


def keeps_activations(layers, tokens: int, device) -> bool:
    """Whether a step may keep every block's activations for backward: a bound on what it keeps
    (each linear's input and output in float32, twice over for norms, attention and the MLP's
    products; every quantized weight decoded in float32 and bf16) within a quarter of free memory."""
    free = free_memory(device)
    if free is None:
        return False
    per_token = sum(m.in_features + m.out_features for m in layers) * 4 * 2
    weights = sum(m.in_features * m.out_features for m in layers) * (4 + 2)
    return tokens * per_token + weights < free // 4


@contextlib.contextmanager
def checkpointing(model):
    """Every block's activations are recomputed in backward instead of kept (memory: one block)."""
    _, blocks = find_blocks(model)
    originals = [b.forward for b in blocks]

    def checkpointed(forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return run

    for b, f in zip(blocks, originals):
        b.forward = checkpointed(f)
    try:
        yield
    finally:
        for b in blocks:
            del b.forward


class TrainedGrid(nn.Module):
    """A frozen layer's grid made trainable: scale = s0 * exp(log_scale) (rounded straight-through to
    the stored dtype), zero = round_ste(zero0 + zero_shift)."""

    def __init__(self, layer: QuantLinear, zeros: bool, scale_dtype):
        super().__init__()
        self.scale_dtype = scale_dtype
        self.register_buffer("s0", layer.scale.detach().clone())
        self.register_buffer("z0", layer.zero.detach().clone())
        self.log_scale = nn.Parameter(torch.zeros_like(self.s0))
        self.zero_shift = nn.Parameter(torch.zeros_like(self.z0)) if zeros else None

    def grid(self):
        scale = self.s0 * self.log_scale.exp()
        if self.scale_dtype is not None:
            scale = scale + (scale.to(self.scale_dtype).float() - scale).detach()
        zero = self.z0 if self.zero_shift is None else round_ste(self.z0 + self.zero_shift)
        return scale, zero


def trainable(model, layers, cfg: Finetune, scale_dtype) -> dict[str, nn.Parameter]:
    """Attach a TrainedGrid to every frozen layer (its weight is decoded live from then on) and
    return every trained parameter by name; norm weights too with cfg.norms."""
    params = {}
    for i, m in enumerate(layers):
        m.trained_grid = TrainedGrid(m, cfg.zeros, scale_dtype)
        params[f"{i}.log_scale"] = m.trained_grid.log_scale
        if cfg.zeros:
            params[f"{i}.zero_shift"] = m.trained_grid.zero_shift
    if cfg.norms:
        _, blocks = find_blocks(model)
        for j, block in enumerate(blocks):
            for name, module in block.named_modules():
                if "norm" in type(module).__name__.lower() and getattr(module, "weight", None) is not None:
                    module.weight.requires_grad_(True)
                    params[f"norm.{j}.{name}"] = module.weight
    return params


def snapshot(params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in params.items()}


@torch.no_grad()
def restore(params, state):
    for k, p in params.items():
        p.copy_(state[k])
        p.requires_grad_(False)


@torch.no_grad()
def bake(layer: QuantLinear, zeros: bool, scale_dtype):
    """Write the trained grid into the layer's scale / zero point and drop the trainable form."""
    scale, zero = layer.trained_grid.grid()
    if scale_dtype is not None:
        scale = scale.to(scale_dtype).float()
    layer.scale.copy_(scale)
    layer.zero.copy_(zero.round().clamp(0, layer.grid.qmax))
    layer.trained_grid = None


# -- checkpoints: every eval_every steps, so that --resume continues the stage bit-identically ------
def checkpoint_file(folder) -> Path:
    path = checkpoint_path(folder)
    return path.with_name(f"{path.stem}.finetune.safetensors")


def write_state(path: Path, fingerprint: str, state: dict, params, best_state, opt):
    tensors = {f"param/{k}": p.detach().cpu() for k, p in params.items()}
    tensors.update({f"best/{k}": v.cpu() for k, v in best_state.items()})
    for name, p in params.items():
        for key, value in opt.state[p].items():
            tensors[f"{key}/{name}"] = value.detach().cpu().reshape(value.shape)
    write_atomic(path, {"finetune": tensors}, {"fingerprint": fingerprint, "state": json.dumps(state)})


def read_state(path: Path, fingerprint: str, params):
    """(state, best parameters, optimizer moments) of a checkpoint of this run, parameters loaded."""
    meta, layers = read_layers(path, fingerprint)
    tensors = layers.get("finetune", {})
    missing = [k for k in params if f"param/{k}" not in tensors or f"best/{k}" not in tensors]
    if missing:
        raise CrossblockError(f"cannot resume from {path}: it lacks {missing[0]} (start over with --overwrite)")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(tensors[f"param/{k}"])
    device = next(iter(params.values())).device
    moments = {k: v.to(device) if not k.startswith("step/") else v for k, v in tensors.items()
               if k.split("/", 1)[0] in ("step", "exp_avg", "exp_avg_sq")}
    best = {k: tensors[f"best/{k}"].to(device) for k in params}
    return json.loads(meta["state"]), best, moments
