"""Recipe: every setting of a quantization run, as one plain dataclass.

Every method is a preset of this one dataclass, run by the one window engine:
RTN and GPTQ are windows with no training, `block` is single-block reconstruction (AutoRound
style), `mb`, `la` and `cbq` change the window shape, target and loss. Recipes round-trip through
YAML (`recipes/*.yaml` mirror the presets) and are validated before any work starts.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CrossblockError

TARGETS = ("propagated", "homologous")
LOSSES = ("mse", "mse+kl", "token-mse", "token-mse+kl")
INITS = ("rtn", "gptq")
ROUNDINGS = ("rtn", "signround", "adaround", "lora")
FORMATS = ("fake", "compressed-tensors", "gptq")


@dataclass
class Recipe:
    name: str = "custom"
    # weight grid
    wbits: int = 4
    group_size: int = 128          # -1: per output channel
    sym: bool = False
    scale_dtype: str | None = None  # round scales to what the checkpoint stores ("float16" for gptq)
    # activations (inputs of every quantized linear) and CBQ's coarse-to-fine preprocessing
    abits: int = 16                # 16: activations stay in full precision; else 4..8
    act_dynamic: bool = True       # per-token ranges at run time; False: one learned step per tensor
    act_sym: bool = False
    cfp: bool = False              # scale outlier channels into the norms, truncate outlier weights
    cfp_alpha: float = 0.7         # outlier channel c is divided by (max_c / max_non_outlier) ** alpha
    cfp_weights: bool = False      # True: CFP also truncates outlier weights (CBQ; hurt SmolLM2, see README)
    # schedule: windows of `window` blocks every `stride` blocks, loss after `lookahead` FP blocks
    window: int = 1
    stride: int = 1
    lookahead: int = 0
    target: str = "propagated"     # propagated: FP model on FP input; homologous: FP blocks on quantized input
    loss: str = "mse"              # token-mse: each token's squared error relative to its target's
                                   # squared norm (attention sinks do not dominate); +kl: CBQ's KL term
    kl_weight: float = 1.0
    # learnable quantization parameters
    init: str = "rtn"
    rounding: str = "signround"
    lwc: bool = True               # learnable clipping multipliers
    clip_search: bool = False      # start clipping at each group's least-weight-error ratio (1 .. 0.7)
    lora_rank: int = 4
    round_reg: float = 0.01        # AdaRound/LoRA regularizer weight (annealed beta 20 -> 2)
    ste: bool = True               # AdaRound/LoRA: train the hard rounding through a straight-through
                                   # estimator; False: the soft relaxation (needs many more steps)
    iters: int = 0                 # optimizer steps per window; 0: no training (RTN, GPTQ)
    batch_size: int = 8
    lr: float | None = None        # None: 1/iters for signround (offsets: at most 1/15), 1.5/iters for Adam
    # GPTQ
    damp: float = 0.01
    act_order: bool = False
    # calibration
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    # layers left in full precision besides embeddings and lm_head (name substrings)
    skip: list[str] = field(default_factory=list)

    # -- presets -----------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "Recipe":
        if name not in PRESETS:
            raise CrossblockError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)} (or a .yaml file)")
        return cls(**{**PRESETS[name], "name": name, **overrides}).validated()

    @classmethod
    def load(cls, name_or_path: str, **overrides) -> "Recipe":
        """A preset name or a YAML file."""
        if str(name_or_path).endswith((".yaml", ".yml")):
            return cls.from_yaml(name_or_path, **overrides)
        return cls.preset(name_or_path, **overrides)

    # -- YAML --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self, path=None) -> str:
        import yaml
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)} | {"preset"}
        unknown = set(data) - known
        if unknown:
            raise CrossblockError(f"unknown recipe field(s): {', '.join(sorted(unknown))}")
        base = data.get("preset")
        if base is not None and base not in PRESETS:
            raise CrossblockError(f"unknown preset {base!r} in recipe; presets: {', '.join(PRESETS)}")
        data = {k: v for k, v in data.items() if k != "preset"}
        start = {**PRESETS[base], "name": base} if base else {}
        return cls(**{**start, **data, **overrides}).validated()

    @classmethod
    def from_yaml(cls, path, **overrides) -> "Recipe":
        import yaml
        p = Path(path)
        if not p.is_file():
            raise CrossblockError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise CrossblockError(f"recipe file {p} is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise CrossblockError(f"recipe file {p} must hold a mapping of recipe fields")
        return cls.from_dict(data, **overrides)

    # -- validation --------------------------------------------------------------------------
    def validated(self) -> "Recipe":
        def need(ok, msg):
            if not ok:
                raise CrossblockError(f"invalid recipe {self.name!r}: {msg}")
        need(isinstance(self.wbits, int) and 2 <= self.wbits <= 8, f"wbits must be an integer in 2..8, got {self.wbits}")
        need(isinstance(self.group_size, int) and (self.group_size == -1 or self.group_size > 0),
             f"group_size must be -1 (per channel) or a positive integer, got {self.group_size}")
        need(isinstance(self.abits, int) and (4 <= self.abits <= 8 or self.abits == 16),
             f"abits must be an integer in 4..8, or 16 (no activation quantization), got {self.abits}")
        need(0 < self.cfp_alpha <= 1, f"cfp_alpha must be in (0, 1], got {self.cfp_alpha}")
        need(self.window >= 1, f"window must be >= 1, got {self.window}")
        need(1 <= self.stride <= self.window, f"stride must be in 1..window ({self.window}), got {self.stride}")
        need(self.lookahead >= 0, f"lookahead must be >= 0, got {self.lookahead}")
        need(self.target in TARGETS, f"target must be one of {TARGETS}, got {self.target!r}")
        need(self.loss in LOSSES, f"loss must be one of {LOSSES}, got {self.loss!r}")
        need(self.init in INITS, f"init must be one of {INITS}, got {self.init!r}")
        need(self.rounding in ROUNDINGS, f"rounding must be one of {ROUNDINGS}, got {self.rounding!r}")
        need(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        need(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        need(self.nsamples >= 1 and self.seqlen >= 2, "nsamples must be >= 1 and seqlen >= 2")
        need(self.lora_rank >= 1, f"lora_rank must be >= 1, got {self.lora_rank}")
        need(self.lr is None or self.lr > 0, f"lr must be positive, got {self.lr}")
        need(0 < self.damp < 1, f"damp must be in (0, 1), got {self.damp}")
        need(self.scale_dtype in (None, "float32", "float16", "bfloat16"),
             f"scale_dtype must be float32, float16 or bfloat16, got {self.scale_dtype!r}")
        need(self.batch_size <= self.nsamples, f"batch_size ({self.batch_size}) exceeds nsamples ({self.nsamples})")
        return self

    def check_model(self, in_features: dict[str, int]):
        """Checks that need the model: every quantized layer's width against the group size."""
        # Ragged last groups are supported by fake-quant (see quant/grid.py); the packed formats
        # refuse them in export.check_format.
        if self.group_size != -1:
            too_narrow = [n for n, k in in_features.items() if k < self.group_size]
            if too_narrow:
                raise CrossblockError(
                    f"group_size {self.group_size} is larger than the input width of {too_narrow[0]} "
                    f"({in_features[too_narrow[0]]}); use a smaller group size or -1 (per channel)")

    @property
    def scale_torch_dtype(self):
        import torch
        return None if self.scale_dtype is None else getattr(torch, self.scale_dtype)

    @property
    def trains(self) -> bool:
        """Whether windows optimize anything: steps, and a parameter to learn."""
        learnable = self.rounding != "rtn" or self.lwc or self.static_act_steps
        return self.iters > 0 and learnable

    @property
    def needs_block_input(self) -> bool:
        """Whether wrapping a block needs its calibration input: GPTQ, static activation steps."""
        return self.init == "gptq" or self.static_act_steps

    @property
    def static_act_steps(self) -> bool:
        """Activations quantized with one learned step per tensor (calibrated, then trained)."""
        return self.abits < 16 and not self.act_dynamic

    @property
    def rtn_reference(self) -> bool:
        """Whether the engine carries an RTN chain (its report compares with RTN): not for RTN itself."""
        return self.trains or self.init != "rtn"


# The methods, as data. Training presets share AutoRound's defaults (SignRound + clipping,
# 200 steps, batch 8), so that schedules compare at the same budget per window.
_TRAIN = dict(rounding="signround", lwc=True, iters=200, batch_size=8)
PRESETS: dict[str, dict] = {
    "rtn": dict(init="rtn", rounding="rtn", lwc=False, iters=0),
    "gptq": dict(init="gptq", rounding="rtn", lwc=False, iters=0),
    "block": dict(_TRAIN, window=1, stride=1, lookahead=0),
    "mb": dict(_TRAIN, window=2, stride=2, lookahead=0),
    "la": dict(_TRAIN, window=1, stride=1, lookahead=1),
    "cbq": dict(_TRAIN, window=2, stride=1, lookahead=0, target="homologous", loss="mse+kl",
                rounding="lora", lora_rank=4),
}
