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

from ..model.adapter import BlockCall, block_experts, block_linears, is_skipped, set_submodule
from ..quant.act import act_quantizer, calibrated, observing
from ..quant.experts import ExpertInputs, QuantExperts, QuantExpertWeight, expert_params
from ..quant.linear import QuantLinear, weight_of
from ..roundings import Nearest
from .blocks import BlockStore, InMemoryBlocks
from .chains import ChainStore, trim_heap
from .checkpoint import EngineState, block_of
from ..distributed import all_reduce_, all_reduce_grads_, local_part, rank_and_size
from .gptq import HessianAccumulator, gptq_on_grid
from .schedule import LOSS_SAMPLES, Window, make_schedule
from ..precision import autocast


def quant_layers(blocks) -> list[QuantLinear]:
    return [m for b in blocks for m in b.modules() if isinstance(m, QuantLinear)]


@contextlib.contextmanager
def layer_mode(blocks, mode: str):
    """Run wrapped blocks as "fp" (original weights), "hard" (hard rounding) or "rtn"."""
    layers = quant_layers(blocks)
    for m in layers:
        m.mode = mode
    try:
        yield
    finally:
        for m in layers:
            m.mode = "quant"


def shuffled_batches(n: int, batch_size: int, generator: torch.Generator):
    """Index batches drawn without replacement, reshuffled every epoch."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1, batch_size):
            yield order[i:i + batch_size]


def window_loss(out: torch.Tensor, target: torch.Tensor, train) -> torch.Tensor:
    """The loss `train` (a windows stage's Train) names, between a window's output and its target."""
    if train.loss.startswith("token-mse"):
        # A model's first token often becomes an attention sink whose hidden state is 10^3-10^4x
        # the median token's (SmolLM2 at block 20: 96% of the squared norm, and 86% of RTN's
        # squared error, at 1 of 512 positions): plain MSE would spend the window on it.
        loss = ((out.float() - target.float()) ** 2).sum(-1).div(target.float().pow(2).sum(-1).clamp_min(1e-12)).mean()
    else:
        loss = F.mse_loss(out.float(), target.float())
    if train.loss.endswith("+kl"):
        # CBQ's L2 + KL: KL(softmax(target) || softmax(out)) over the hidden dimension, per token.
        kl = F.kl_div(F.log_softmax(out.float(), -1), F.log_softmax(target.float(), -1),
                      log_target=True, reduction="none").sum(-1).mean()
        loss = loss + train.kl_weight * kl
    return loss


class WindowEngine:
    def __init__(self, blocks: BlockStore | nn.ModuleList, calls: list[BlockCall], stage, grid, activations, data,
                 skip: list[str] = (), device: torch.device | str = "cpu", progress: bool = True,
                 num_sequences: int | None = None, store: ChainStore | None = None, prefix: str = "",
                 precision: str = "fp32"):
        """`blocks`: where the decoder blocks live (engine/blocks.py; a plain ModuleList: in
        memory); `stage`: the windows stage's settings (schedule, init, train); `grid`,
        `activations`, `data`: the recipe's sections; `skip`: patterns of layers left in full
        precision, matched against the full names under `prefix`, the blocks' name in the model
        (adapter.is_skipped); `store`: where the activation chains live (engine/chains.py);
        `precision`: bf16 (blocks run under autocast) or fp32, as precision.resolve gave it."""
        self.block_store = blocks if isinstance(blocks, BlockStore) else InMemoryBlocks(blocks)
        self.blocks, self.calls = self.block_store.blocks, calls
        self.stage, self.train_cfg, self.grid, self.acts, self.skip = stage, stage.train, grid, activations, skip
        self.prefix = prefix
        self.batch_size, self.seed = data.batch_size, data.seed
        self.static_acts = activations.static
        self.calibrated_acts = activations.calibrated  # static steps, nvfp4's global scale
        self.trains = stage.trains(self.static_acts)
        self.store = store or ChainStore("ram")
        self.num_sequences = num_sequences  # across all ranks (data parallel); None: this process's
        self.device = torch.device(device)
        self.precision = precision
        self.released: set[int] = set()  # finished blocks the store dropped: their layers are in their block files
        self.pending: dict[int, dict] = {}  # resume: checkpointed layers of blocks not fetched yet
        self.read_block = None  # resume: reads a finished block's layers from its checkpoint block file
        self.dtype = [next(b.parameters()).dtype for b in self.blocks]  # the model's, before wrapping
        self.progress = progress
        self.schedule = make_schedule(len(self.blocks), stage.window, stage.stride, stage.lookahead)
        self.report: dict = {"windows": [], "blocks": []}

    # -- running blocks ------------------------------------------------------------------------
    def run(self, lo: int, hi: int, h: torch.Tensor) -> torch.Tensor:
        """Blocks lo..hi (inclusive) on one batch already on the device."""
        if self.precision != "bf16":  # no autocast: the float32 chains meet the blocks' dtype
            h = h.to(self.dtype[lo])
        with autocast(self.device, self.precision):
            for j in range(lo, hi + 1):
                h = self.calls[j](self.blocks[j], h)
        return h

    @torch.no_grad()
    def run_all(self, lo: int, hi: int, x: torch.Tensor) -> torch.Tensor:
        """Blocks lo..hi on every sequence, batch by batch; result float32 on CPU, in the store."""
        out = None
        for i in range(0, len(x), self.batch_size):
            h = self.run(lo, hi, x[i:i + self.batch_size].to(self.device)).float().cpu()
            out = self.store.empty((len(x), *h.shape[1:])) if out is None else out
            out[i:i + len(h)] = h
            for chain in (x, out):  # with --offload disk, only the batch in flight stays resident
                self.store.release_rows(chain, i, i + len(h))
        return out

    # -- wrapping and initialization -------------------------------------------------------------
    def learned(self) -> tuple:
        """(rounding, lwc) of every layer this engine wraps: the train section's, or RTN's."""
        t = self.train_cfg if self.trains else None
        return (t.rounding, t.lwc) if t else (Nearest(), False)

    def new_layer(self, module: nn.Module, generator: torch.Generator | None, grid) -> QuantLinear:
        ql = QuantLinear(module, grid, *self.learned(), generator, self.stage.clip_search)
        if self.acts.bits < 16:
            ql.act_quant = act_quantizer(self.acts.bits, self.acts.dynamic, self.acts.sym,
                                         self.acts.type).to(ql.weight.device)
        return ql

    def new_experts(self, module: nn.Module, generator: torch.Generator | None, grid) -> QuantExperts:
        """A fused experts module wrapped: one QuantExpertWeight per 3-D parameter, set up as
        new_layer sets up a linear (activations are refused for fused experts by the API)."""
        return QuantExperts(module, lambda experts, param: QuantExpertWeight(
            experts, param, grid, *self.learned(), generator, self.stage.clip_search))

    def targets(self, j: int) -> list[tuple[str, nn.Module, bool]]:
        """(name, module, is fused experts) of everything in block j that gets quantized."""
        block = self.blocks[j]
        return [(n, m, False) for n, m in block_linears(block) if not is_skipped(self.skip, self.prefix, j, n)] + \
               [(n, m, True) for n, m in block_experts(block) if not is_skipped(self.skip, self.prefix, j, n)]

    def layer_grid(self, j: int, name: str, module: nn.Module, fused: bool):
        """The grid of block j's layer `name`: it may differ per layer (a GGUF mixture, mixed
        precision), or be None: the layer stays in full precision."""
        width = next(iter(expert_params(module).values())).shape[2] if fused else weight_of(module).shape[1]
        return self.grid.for_layer(name, j, len(self.blocks), width)

    def wrap(self, j: int, block_input, generator: torch.Generator):
        """Wrap block j's linears and fused experts; `block_input()` gives its calibration input,
        computed only if the initialization needs it (GPTQ, imatrix, static activation steps,
        nvfp4's activation global scale)."""
        targets = self.targets(j)
        # a grid may tie a block's layers together (nvfp4: vLLM's fused q/k/v share a global scale)
        tied = self.grid.for_block({n: weight_of(m) for n, m, fused in targets if not fused})
        for name, module, fused in targets:
            grid = tied.get(name) or self.layer_grid(j, name, module, fused)
            if grid is not None:
                set_submodule(self.blocks[j], name, (self.new_experts if fused else self.new_layer)(module, generator, grid))
        if not self.stage.needs_block_input(self.calibrated_acts):
            return
        x_in = block_input()
        if self.stage.init_reads_inputs:
            self.init_from_inputs(j, x_in)
        if self.calibrated_acts:
            # static steps start from the range observed on the block's input (nvfp4: its global scale)
            with observing(calibrated(m.act_quant for m in quant_layers([self.blocks[j]]))):
                self.run_all(j, j, x_in)

    @torch.no_grad()
    def init_from_inputs(self, j: int, x_in: torch.Tensor):
        """GPTQ (or imatrix's clipping search) for every wrapped layer from its inputs' Hessian
        (imatrix: its diagonal); each expert of a fused experts parameter gets its own, from the
        tokens it sees (with `all_experts`, every token). A matrix that no token reached is
        rounded to nearest (imatrix: clipped by plain weight error) and reported."""
        block = self.blocks[j]
        names = {m: n for n, m in block.named_modules()}
        layers = quant_layers([block])
        linears = [m for m in layers if not isinstance(m, QuantExpertWeight)]
        imatrix = self.stage.init == "imatrix"  # the Hessian's diagonal is all it reads
        acc = {m: [HessianAccumulator(m.in_features, self.device, imatrix)] for m in linears}
        acc.update({m: [HessianAccumulator(m.in_features, self.device, imatrix) for _ in range(m.num_experts)]
                    for m in layers if isinstance(m, QuantExpertWeight)})
        hooks = [m.register_forward_pre_hook(lambda m, args: acc[m][0].add(m.transformed_input(args[0])))
                 for m in linears]
        wrappers = [m for m in block.modules() if isinstance(m, QuantExperts)]
        for ex in wrappers:
            ex.recorder = ExpertInputs(lambda param, e, x, ex=ex: acc[ex.weights[param]][e].add(x),
                                       self.stage.all_experts)
        try:
            with layer_mode([block], "fp"):
                self.run_all(j, j, x_in)
        finally:
            for h in hooks:
                h.remove()
            for ex in wrappers:
                ex.recorder = None
        for m in layers:
            parts = []
            weights = m.weight.reshape(len(acc[m]), -1, m.in_features)
            for e, a in enumerate(acc[m]):
                a.all_reduce()
                if a.count == 0:
                    self.report.setdefault("rtn_fallback", []).append(
                        {"block": j, "layer": names[m], "expert": e if isinstance(m, QuantExpertWeight) else None,
                         "tokens": 0, "why": "no calibration token reached it: rounded to nearest"})
                if imatrix:
                    parts.append(m.grid.search_clip(weights[e], a.h if a.count else None))
                else:
                    parts.append(self.rtn_init(weights[e], m.grid) if a.count == 0 else
                                 self.gptq_init(weights[e], a.h, m.grid))
            if imatrix:
                m.start_clip(torch.cat(parts))
            else:
                m.set_init(*(torch.cat(t) for t in zip(*parts)))

    def gptq_init(self, w: torch.Tensor, h: torch.Tensor, g):
        st = self.stage
        return gptq_on_grid(w, h, g, st.damp, st.act_order, st.clip_search)

    def rtn_init(self, w: torch.Tensor, grid):
        """(base, scale, zero) of round-to-nearest on the layer's min/max grid (clipped with clip_search)."""
        w = w.float()
        ratio = grid.search_clip(w) if self.stage.clip_search else None
        scale, zero = grid.params(w, ratio, ratio)
        return w, scale, zero

    # -- one window ----------------------------------------------------------------------------
    @torch.no_grad()
    def full_loss(self, w: Window, x_in: torch.Tensor, target: torch.Tensor) -> float:
        """Window loss with hard rounding (as the blocks will be frozen) over the first
        LOSS_SAMPLES calibration sequences (a fixed subset keeps the check cheap)."""
        with layer_mode([self.blocks[j] for j in w.trained], "hard"):
            return self.subset_loss(lambda idx: self.run(w.start, w.target, x_in[idx].to(self.device)), target)

    @torch.no_grad()
    def subset_loss(self, outputs, target: torch.Tensor) -> float:
        """Window loss of `outputs(rows)` over the first LOSS_SAMPLES sequences, batch by batch."""
        total = torch.zeros(2, dtype=torch.float64)
        for idx in self.loss_rows(target).split(self.batch_size):
            loss = window_loss(outputs(idx), target[idx].to(self.device), self.train_cfg)
            total += torch.tensor([loss.item() * len(idx), len(idx)], dtype=torch.float64)
        total = all_reduce_(total)
        return (total[0] / total[1]).item()

    @torch.no_grad()
    def hard_chain(self, w: Window, x_in: torch.Tensor) -> list[torch.Tensor]:
        """The quantized chain past each block of a window that finishes all its blocks, with hard
        rounding (bit for bit what the frozen blocks give): the window's loss after training is
        read from it, so that pass is also the chain's advance, not one more."""
        outs = []
        for j in w.finished:
            with layer_mode([self.blocks[j]], "hard"):
                outs.append(self.run_all(j, j, outs[-1] if outs else x_in))
        return outs

    def global_len(self, x: torch.Tensor) -> int:
        return self.num_sequences or len(x)

    def loss_rows(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the first LOSS_SAMPLES sequences (a prefix of its shard)."""
        return local_part(torch.arange(min(LOSS_SAMPLES, self.global_len(x))))

    def train(self, w: Window, x_in: torch.Tensor, target: torch.Tensor, generator: torch.Generator,
              loss_after=None) -> dict:
        """Optimize the window's parameters. A non-finite loss restores the start and retries
        once at half the learning rate; a result worse than the start on the calibration subset
        is reverted (as AutoRound keeps its best iterate), so a window never hurts.
        `loss_after()` measures the result (default: `full_loss`)."""
        layers = quant_layers([self.blocks[j] for j in w.trained])
        params = [p for m in layers for p in m.parameters() if p.requires_grad]
        before = self.full_loss(w, x_in, target)
        info = {"loss_before": before, "steps": 0}
        if not params:
            return dict(info, loss_after=before)
        start = [p.detach().clone() for p in params]

        def reset():
            with torch.no_grad():
                for p, p0 in zip(params, start):
                    p.copy_(p0)

        for lr_scale in (1.0, 0.5):
            trace = self.optimize(w, layers, params, x_in, target, generator, lr_scale)
            if trace is not None:
                info["steps"], info["loss_trace"] = self.train_cfg.iters, [round(v, 6) for v in trace]
                break
            reset()
            info["nonfinite_retries"] = info.get("nonfinite_retries", 0) + 1
        loss_after = loss_after or (lambda: self.full_loss(w, x_in, target))
        after = loss_after() if info["steps"] else before
        if not after <= before:  # also catches NaN
            reset()
            after, info["reverted"] = before, True
        return dict(info, loss_after=after)

    def optimize(self, w, layers, params, x_in, target, generator, lr_scale: float) -> list[float] | None:
        """The optimizer loop; returns the loss of every step, or None if it became non-finite."""
        t = self.train_cfg
        rounding = t.rounding
        opt, sched = rounding.optimizer(params, layers, t.iters, t.lr)
        for g in opt.param_groups:
            g["lr"] *= lr_scale
        batches = shuffled_batches(self.global_len(x_in), self.batch_size, generator)
        bar = tqdm(range(t.iters), desc=f"  window {w.start}-{w.end - 1}", leave=False, disable=not self.progress)
        world = rank_and_size()[1]
        trace = []
        for step in bar:
            batch = next(batches)          # global indices, the same on every rank
            idx = local_part(batch)        # the rows of it this rank holds
            opt.zero_grad(set_to_none=True)
            loss = torch.zeros((), device=self.device)
            if len(idx):
                out = self.run(w.start, w.target, x_in[idx].to(self.device))
                loss = window_loss(out, target[idx].to(self.device), t) * (len(idx) / len(batch))
            penalty = rounding.penalty(layers, step, t.iters)
            if penalty is not None:
                loss = loss + penalty / world
            global_loss = all_reduce_(loss.detach().clone())
            if not torch.isfinite(global_loss):  # every rank sees the same value and stops together
                bar.close()
                return None
            if loss.requires_grad:
                loss.backward()
            all_reduce_grads_(params)
            trace.append(global_loss.item())
            opt.step()
            if sched is not None:
                sched.step()
            for m in layers:
                m.project()
            if step % 10 == 0:
                bar.set_postfix(loss=f"{trace[-1]:.4g}")
        bar.close()
        return trace

    # -- the whole schedule --------------------------------------------------------------------
    def quantize(self, inputs: list[torch.Tensor], resume: EngineState | None = None, on_window=None):
        """Run the schedule on `inputs` = [block-0 inputs], a list the engine empties so that it
        holds the only reference. `resume` continues a checkpointed run; `on_window(state)` is
        called after every window with what a checkpoint needs."""
        x0 = inputs.pop()
        # chains: FP model, quantized model, and (for the report) the RTN-quantized model, each on
        # the first sequences it needs (stage.chain_rows): a third full chain would cost 12% of a
        # 128 x 512 `block` run, and an untrained recipe needs FP outputs only for its report
        rows = self.stage.chain_rows(self.static_acts, self.global_len(x0), self.calibrated_acts)
        local = {name: len(local_part(torch.arange(k))) for name, k in rows.items()}
        # never modified in place; a whole chain stays x0 itself (--offload disk releases it by identity)
        chains = {name: x0 if k == len(x0) else x0[:k] for name, k in local.items()}
        wrapped: set[int] = set()
        first = 0
        if resume is not None:
            self.report, first = resume.report, resume.next_window
            wrapped = self.resume_layers(resume)
            self.replay(chains, self.schedule[:first])
        del x0
        self.report.setdefault("report_sequences", rows["fp"])
        bar = tqdm(self.schedule, desc="windows", disable=not self.progress, unit="window", initial=first)
        for wi, w in enumerate(self.schedule[first:], start=first):
            t0 = time.time()
            for j in range(w.start, w.target + 1):  # first: restoring a resumed layer may draw random numbers
                self.fetch(j)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + wi)
            torch.manual_seed(self.seed * 1_000_003 + wi)
            q = chains["q"]
            for j in w.trained:
                if j not in wrapped:
                    self.wrap(j, lambda: q if j == w.start else self.run_all(w.start, j - 1, q), generator)
                    wrapped.add(j)
            entry = {"window": [w.start, w.end, w.target]}
            target, q_next = None, None
            if self.trains:
                homologous = self.train_cfg.target == "homologous"
                with layer_mode([self.blocks[j] for j in w.trained], "fp"):
                    target = self.run_all(w.start, w.target, q if homologous else chains["fp"])
                loss_after = None
                if w.finishes_through_target:
                    def loss_after():
                        nonlocal q_next
                        q_next = self.hard_chain(w, q)
                        return self.subset_loss(lambda idx: q_next[-1][idx].to(self.device), target)
                entry.update(self.train(w, q, target, generator, loss_after))
                if entry.get("reverted"):
                    q_next = None
                self.store.release(q)
                trim_heap()
                bar.set_postfix(loss=f"{entry['loss_after']:.4g}")
            self.advance(w, chains, None if not self.trains or homologous else target, q_next)
            del target, q, q_next  # the chains have moved on: free what they were
            trim_heap()
            entry["seconds"] = round(time.time() - t0, 3)
            self.report["windows"].append(entry)
            bar.update()
            if on_window is not None:
                on_window(EngineState(wi + 1, self.layer_states(), self.report, released=sorted(self.released)))
            for j in range(w.start, w.target + 1):  # after the checkpoint, which reads the frozen layers
                self.put_back(j, j in w.finished)
        bar.close()
        return self.report

    def resume_layers(self, resume: EngineState) -> set[int]:
        """The blocks a checkpoint had wrapped. Their layers are restored as each block is
        fetched: from the checkpoint's state, or, for a finished block the store had dropped,
        from that block's own checkpoint file (`resume.read_block`)."""
        for key, state in resume.layers.items():
            self.pending.setdefault(block_of(key), {})[key] = state
        self.read_block = resume.read_block
        self.released = set(resume.released)
        return set(self.pending) | self.released

    def fetch(self, j: int):
        """Block j on the device, from its store, with its checkpointed layers on a resumed run."""
        self.block_store.fetch(j)
        states = self.pending.pop(j, None)
        if states is None and j in self.released:
            states = self.read_block(j)
        if states:
            self.restore_layers(states)
        self.released.discard(j)
        self.blocks[j].to(self.device)

    def put_back(self, j: int, finished: bool):
        """Block j leaves the device, back to its store (which may drop a finished block)."""
        if self.block_store.leave(j, finished):
            self.released.add(j)

    def layer_states(self) -> dict[str, dict[str, torch.Tensor]]:
        return {f"{j}.{name}": m.checkpoint_state() for j, block in enumerate(self.blocks)
                for name, m in block.named_modules() if isinstance(m, QuantLinear)}

    def restore_layers(self, states: dict[str, dict[str, torch.Tensor]]):
        """Re-wrap the blocks a checkpoint had wrapped and load their state."""
        for j in sorted({block_of(key) for key in states}):
            for name, module, fused in self.targets(j):
                grid = self.layer_grid(j, name, module, fused)
                if grid is None:
                    continue
                if fused:
                    wrapper = self.new_experts(module, None, grid)
                    layers = {f"{j}.{name}.weights.{p}": m for p, m in wrapper.weights.items()}
                else:
                    wrapper = self.new_layer(module, None, grid)
                    layers = {f"{j}.{name}": wrapper}
                if not all(key in states for key in layers):
                    continue
                for key, m in layers.items():
                    m.load_checkpoint_state(states[key])
                set_submodule(self.blocks[j], name, wrapper)

    @torch.no_grad()
    def advance(self, w: Window, chains: dict, fp_target: torch.Tensor | None = None,
                q_next: list[torch.Tensor] | None = None):
        """Freeze the blocks that leave the schedule and move every chain past them. A propagated
        target is the FP chain past w.target: reused when that block finishes (block, mb), which
        saves one pass over the calibration set per window and gives the same bits; so is the
        quantized chain past each finished block when training measured it (`hard_chain`)."""
        for i, j in enumerate(w.finished):
            for m in quant_layers([self.blocks[j]]):
                m.freeze()
            self.step_chains(j, chains, fp_target if j == w.target else None, q_next[i] if q_next else None)
            fp = chains["fp"]  # the report's sequences: all, or the first few (stage.chain_rows)
            entry = {"block": j, **self.output_error(chains["q"][:len(fp)], fp)}
            if "rtn" in chains:  # RTN vs this model on the same (first) sequences
                k = len(chains["rtn"])
                entry["rtn"] = {**self.output_error(chains["rtn"], chains["fp"][:k]),
                                "quantized_rel_mse": self.output_error(chains["q"][:k], chains["fp"][:k])["rel_mse"]}
            if not math.isfinite(entry["mse"]):
                raise FloatingPointError(f"block {j} produced non-finite outputs after quantization")
            self.report["blocks"].append(entry)

    def step_chains(self, j: int, chains: dict, fp_next: torch.Tensor | None = None,
                    q_next: torch.Tensor | None = None):
        """Every chain one block further: FP weights for "fp", frozen quantized weights for "q"
        (`fp_next`, `q_next`: those already computed)."""
        known = {"fp": fp_next, "q": q_next}
        for name, mode in (("fp", "fp"), ("q", "quant"), ("rtn", "rtn")):
            if known.get(name) is not None:
                chains[name] = known[name]
            elif name in chains:
                with layer_mode([self.blocks[j]], mode):
                    chains[name] = self.run_all(j, j, chains[name])

    @torch.no_grad()
    def replay(self, chains: dict, done: list[Window]):
        """Resume: recompute the chains past the blocks a checkpoint had frozen (one forward pass
        per block, the same batches and kernels as the first run, so bit-identical) instead of
        storing gigabytes of activations in every checkpoint."""
        for j in (j for w in done for j in w.finished):
            self.fetch(j)
            self.step_chains(j, chains)
            self.put_back(j, True)

    def output_error(self, x: torch.Tensor, ref: torch.Tensor) -> dict:
        """mse; rel_mse = squared error / squared norm of FP, summed over all tokens (a sink
        token can own most of both); token_rel_mse = the mean over tokens of that ratio."""
        sums = torch.zeros(5, dtype=torch.float64)
        for i in range(len(x)):  # per sequence: no chain-sized float64 temporaries
            a, b = x[i].double(), ref[i].double()
            err, norm = (a - b).pow(2).sum(-1), b.pow(2).sum(-1)
            sums += torch.stack([err.sum(), norm.sum(), torch.tensor(float(b.numel())),
                                 (err / norm.clamp_min(1e-30)).sum(), torch.tensor(float(err.numel()))])
        sums = all_reduce_(sums)
        return {"mse": (sums[0] / sums[2]).item(), "rel_mse": (sums[0] / sums[1]).item(),
                "token_rel_mse": (sums[3] / sums[4]).item()}
