"""`windows` stage: the window engine (engine/reconstruct.py) that quantizes every block. Without
`train` it is RTN or GPTQ; with it, block-wise / multi-block / look-ahead / CBQ reconstruction."""
from __future__ import annotations

from dataclasses import dataclass

from ..distributed import is_main, shard
from ..engine.chains import ChainStore
from ..engine.reconstruct import WindowEngine
from ..errors import CrossblockError
from ..model.adapter import capture, find_blocks
from ..roundings import ROUNDINGS, Rounding, SignRound
from ..config import Config, Needs, setting
from ..engine.schedule import LOSS_SAMPLES, REPORT_SAMPLES
from .base import STAGES, Stage

TARGETS = ("propagated", "homologous")
LOSSES = ("mse", "mse+kl", "token-mse", "token-mse+kl")
INITS = ("rtn", "gptq", "imatrix")
GPTQ_ONLY = Needs("init", lambda init: init == "gptq", "without {name} gptq")
WITH_KL = Needs("loss", lambda loss: loss.endswith("+kl"), "with {name} {value!r} (use a +kl loss)")


@dataclass
class Train(Config):
    """What a window optimizes and how."""
    # flat spelling: a recipe that does not train (iters 0, or nothing to learn) ignores the training
    # flags instead of refusing them, so that `compare` applies one set of flags to every recipe it ranks
    ignored_when_off = True
    iters: int = setting(200, "optimizer steps per window (RTN and GPTQ: none)", off=0)
    target: str = setting("propagated", "propagated: the FP model on FP input; homologous: FP blocks on "
                                        "quantized input", choices=TARGETS)
    loss: str = setting("mse", "token-mse: each token's squared error relative to its target's squared norm "
                               "(attention sinks do not dominate); +kl: CBQ's KL term", choices=LOSSES)
    kl_weight: float = setting(1.0, "weight of the KL term", needs=WITH_KL)
    rounding: Rounding = setting(factory=SignRound, help="how a window picks each weight's grid point",
                                 registry=ROUNDINGS, off="rtn")
    lwc: bool = setting(True, "learnable clipping multipliers", off=False)
    lr: float | None = setting(None, "learning rate; default: the rounding's (signround 1/iters, Adam 1.5/iters)")

    def check(self):
        self.refuse(self.iters >= 1, f"iters must be >= 1, got {self.iters}")
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
    order = 30
    flat_prefix = ""
    window: int = setting(1, "blocks trained together")
    stride: int = setting(1, "blocks from one window's start to the next's (1..window)")
    lookahead: int = setting(0, "FP blocks after the window before its loss is read (LA-PTQ)")
    init: str = setting("rtn", "each block's start: round to nearest, GPTQ, or imatrix: round to nearest with each "
                               "group's clipping of least error weighted by the mean squared input of its columns "
                               "(llama.cpp's importance matrix, on the block's calibration input)", choices=INITS)
    damp: float = setting(0.01, "GPTQ's dampening", needs=GPTQ_ONLY)
    act_order: bool = setting(False, "GPTQ's column order by decreasing Hessian diagonal", needs=GPTQ_ONLY)
    clip_search: bool = setting(False, "start each group's clipping at its least-weight-error ratio (1 .. 0.7)",
                                needs=Needs("init", lambda init: init != "imatrix",
                                            "with {name} imatrix (it searches the clipping on the inputs)"))
    train: Train | None = setting(None, "what a window optimizes; none: no training (RTN, GPTQ)")
    all_experts: bool = setting(True, "MoE: every token through every fused expert for GPTQ's (imatrix's) Hessians "
                                      "(the block's output keeps the real routing)",
                                needs=Needs("init", lambda init: init in ("gptq", "imatrix"),
                                            "without {name} gptq or imatrix"))

    def check(self):
        self.refuse(self.window >= 1, f"window must be >= 1, got {self.window}")
        self.refuse(1 <= self.stride <= self.window, f"stride must be in 1..window ({self.window}), got {self.stride}")
        self.refuse(self.lookahead >= 0, f"lookahead must be >= 0, got {self.lookahead}")
        self.refuse(0 < self.damp < 1, f"damp must be in (0, 1), got {self.damp}")

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

    @property
    def init_reads_inputs(self) -> bool:
        """Whether each block's start is computed from its layers' inputs (one pass for their Hessians)."""
        return self.init in ("gptq", "imatrix")

    def needs_block_input(self, calibrated_acts: bool) -> bool:
        """Whether wrapping a block needs its calibration input: GPTQ, imatrix, activation quantizers that
        observe it (static steps, nvfp4's global scale: Activations.calibrated)."""
        return self.init_reads_inputs or calibrated_acts

    def rtn_reference(self, static_acts: bool) -> bool:
        """Whether the engine carries an RTN chain (its report compares with RTN): not for RTN itself."""
        return self.trains(static_acts) or self.init != "rtn"

    def chain_rows(self, static_acts: bool, n: int, calibrated_acts: bool | None = None) -> dict[str, int]:
        """How many of the first of `n` calibration sequences each chain of the engine carries (the
        engine and the plan both read this). The FP chain feeds the targets of training, the
        quantized one also GPTQ's Hessians and static steps; without those, they and the RTN
        reference serve only the per-block error report, on REPORT_SAMPLES sequences.
        `calibrated_acts`: activation quantizers observe the block's input (default: static_acts)."""
        calibrated_acts = static_acts if calibrated_acts is None else calibrated_acts
        trains = self.trains(static_acts)
        report = min(n, LOSS_SAMPLES if trains else REPORT_SAMPLES)
        rows = {"fp": n if trains else report,
                "q": n if trains or self.needs_block_input(calibrated_acts) else report}
        if self.rtn_reference(static_acts):
            rows["rtn"] = report
        return rows

    def run(self, model, job):
        # data parallel (torchrun): each rank captures and carries only its shard of the sequences
        store = ChainStore(job.offload, job.checkpoint_dir)
        # RTN: the report's few sequences are all that is ever run through the model
        acts = job.activations
        needed = job.ids[:max(self.chain_rows(acts.static, len(job.ids), acts.calibrated).values())]
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
