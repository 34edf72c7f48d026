"""`windows` stage: the window engine (engine/reconstruct.py) that quantizes every block. Without
`train` it is RTN or GPTQ; with it, block-wise / multi-block / look-ahead / CBQ reconstruction."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..distributed import is_main, shard
from ..engine.chains import ChainStore
from ..engine.reconstruct import WindowEngine
from ..errors import CrossblockError
from ..model.adapter import capture, find_blocks
from ..roundings import ROUNDINGS, Rounding, SignRound
from ..config import Config
from ..engine.schedule import LOSS_SAMPLES, REPORT_SAMPLES
from .base import STAGES, Stage

TARGETS = ("propagated", "homologous")
LOSSES = ("mse", "mse+kl", "token-mse", "token-mse+kl")
INITS = ("rtn", "gptq")


@dataclass
class Train(Config):
    """What a window optimizes and how."""
    iters: int = 200               # optimizer steps per window
    target: str = "propagated"     # propagated: FP model on FP input; homologous: FP blocks on quantized input
    loss: str = "mse"              # token-mse: each token's squared error relative to its target's
                                   # squared norm (attention sinks do not dominate); +kl: CBQ's KL term
    kl_weight: float = 1.0
    rounding: Rounding = field(default_factory=SignRound)
    lwc: bool = True               # learnable clipping multipliers
    lr: float | None = None        # None: the rounding's default (signround 1/iters, Adam 1.5/iters)

    def check(self):
        self.refuse(self.iters >= 1, f"iters must be >= 1, got {self.iters}")
        self.refuse(self.target in TARGETS, f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        self.refuse(self.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        self.refuse(self.loss.endswith("+kl") or self.kl_weight == 1.0,
                    f"kl_weight has no effect with loss {self.loss!r} (use a +kl loss)")
        self.refuse(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        self.refuse(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")

    def to_dict(self):
        return {**super().to_dict(), "rounding": ROUNDINGS.spec(self.rounding)}

    @classmethod
    def from_dict(cls, data, where=None):
        data = dict(data or {}) if isinstance(data, dict) else data
        if isinstance(data, dict) and "rounding" in data:
            data["rounding"] = ROUNDINGS.build(data["rounding"], "windows.train.rounding")
        return super().from_dict(data, where or "windows.train")


@STAGES.register("windows")
@dataclass
class Windows(Stage):
    """Windows of `window` blocks every `stride` blocks, the loss read after `lookahead` more
    (FP, frozen) blocks; each block starts from RTN or GPTQ and is trained if `train` is set."""
    quantizes = True
    window: int = 1
    stride: int = 1
    lookahead: int = 0
    init: str = "rtn"
    damp: float = 0.01             # GPTQ's dampening (init gptq)
    act_order: bool = False        # GPTQ's column order by decreasing Hessian diagonal (init gptq)
    clip_search: bool = False      # start each group's clipping at its least-weight-error ratio (1 .. 0.7)
    train: Train | None = None     # None: no training (RTN, GPTQ)
    all_experts: bool = True       # MoE, init gptq: every token through every fused expert for the Hessians
                                   # (the block's output keeps the real routing)

    def check(self):
        self.refuse(self.window >= 1, f"window must be >= 1, got {self.window}")
        self.refuse(1 <= self.stride <= self.window, f"stride must be in 1..window ({self.window}), got {self.stride}")
        self.refuse(self.lookahead >= 0, f"lookahead must be >= 0, got {self.lookahead}")
        self.refuse(self.init in INITS, f"init must be one of {', '.join(INITS)}, got {self.init!r}")
        self.refuse(0 < self.damp < 1, f"damp must be in (0, 1), got {self.damp}")
        self.refuse(self.init == "gptq" or (self.damp == 0.01 and not self.act_order and self.all_experts),
                    "damp, act_order and all_experts have no effect without init gptq")

    @classmethod
    def from_dict(cls, data, where=None):
        data = dict(data or {}) if isinstance(data, dict) else data
        if isinstance(data, dict) and isinstance(data.get("train"), dict):
            data["train"] = Train.from_dict(data["train"])
        return super().from_dict(data, where or "windows stage")

    # what a run of this stage does, given whether activations get static (trained) steps
    def trains(self, static_acts: bool) -> bool:
        """Whether windows optimize anything: steps, and a parameter to learn."""
        return self.train is not None and (self.train.rounding.trainable or self.train.lwc or static_acts)

    def needs_block_input(self, static_acts: bool) -> bool:
        """Whether wrapping a block needs its calibration input: GPTQ, static activation steps."""
        return self.init == "gptq" or static_acts

    def rtn_reference(self, static_acts: bool) -> bool:
        """Whether the engine carries an RTN chain (its report compares with RTN): not for RTN itself."""
        return self.trains(static_acts) or self.init != "rtn"

    def chain_rows(self, static_acts: bool, n: int) -> dict[str, int]:
        """How many of the first of `n` calibration sequences each chain of the engine carries (the
        engine and the plan both read this). The FP chain feeds the targets of training, the
        quantized one also GPTQ's Hessians and static steps; without those, they and the RTN
        reference serve only the per-block error report, on REPORT_SAMPLES sequences."""
        trains = self.trains(static_acts)
        report = min(n, LOSS_SAMPLES if trains else REPORT_SAMPLES)
        rows = {"fp": n if trains else report, "q": n if trains or self.needs_block_input(static_acts) else report}
        if self.rtn_reference(static_acts):
            rows["rtn"] = report
        return rows

    def run(self, model, job):
        # data parallel (torchrun): each rank captures and carries only its shard of the sequences
        store = ChainStore(job.offload, job.checkpoint_dir)
        # RTN: the report's few sequences are all that is ever run through the model
        needed = job.ids[:max(self.chain_rows(job.activations.static, len(job.ids)).values())]
        ids = shard(needed)
        with job.blocks.before_blocks(ids):
            x0, calls = capture(model, ids, batch_size=job.data.batch_size, empty=store.empty)
        store.release(x0)
        prefix, _ = find_blocks(model)
        engine = WindowEngine(job.blocks, calls, self, job.grid, job.activations, job.data, job.skip, device=job.device,
                              progress=job.progress and is_main(), num_sequences=len(needed), store=store,
                              prefix=prefix, precision=job.precision)
        inputs = [x0]
        del x0  # the engine frees the block-0 inputs once every chain has moved past block 0
        try:
            job.report.update(engine.quantize(inputs, resume=job.resume, on_window=job.on_window))
        except FloatingPointError as e:
            raise CrossblockError(str(e)) from None
