"""Recipe: what to quantize and how, as data + grid + activations + an ordered list of stages.

    name: block-60x2-token
    data: {nsamples: 128, seqlen: 512, seed: 0, batch_size: 2}
    grid: {type: uniform, bits: 3, group_size: 64, sym: false}
    activations: {bits: 16}
    precision: auto           # bf16 autocast where bf16 matmul is native, else fp32 (precision.py)
    stages:
      - cfp: {alpha: 0.7}
      - windows: {window: 1, stride: 1, lookahead: 0, init: rtn,
                  train: {iters: 60, loss: token-mse, rounding: signround, lwc: true}}

Every method is a preset: RTN and GPTQ are a `windows` stage with no training, `block`, `mb`,
`la` and `cbq` change its window shape, target, loss and rounding. The same settings also have a
flat spelling (`Flat`: one name per setting, e.g. `wbits`, `lora_rank`): command-line flags,
`Recipe.preset(name, **flat)` overrides and the recipe files of earlier versions use it, and it
converts both ways for recipes of the shape [rotate], [cfp], windows, [finetune]. Everything is validated before any
work starts, strictly: wrong types, out-of-range values and settings that would have no effect
are refused with one line.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .config import Config
from .errors import CrossblockError
from .grids import GRIDS, GgufGrid, UniformGrid
from .grids.fp4 import Fp4Grid
from .precision import PRECISIONS
from .roundings import ROUNDINGS, AdaRound, LoraRound
from .stages import STAGES, Cfp, Finetune, Rotate, Stage, Train, Windows

SECTIONS = ("name", "preset", "data", "grid", "activations", "skip", "precision", "stages")


@dataclass
class Data(Config):
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    batch_size: int = 8   # sequences per forward pass and per optimizer step

    def check(self):
        self.refuse(self.nsamples >= 1 and self.seqlen >= 2, "nsamples must be >= 1 and seqlen >= 2")
        self.refuse(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        # either may be the one the user set (e.g. --nsamples 2 under a preset's batch_size 8): both named
        self.refuse(self.batch_size <= self.nsamples,
                    f"nsamples {self.nsamples} is fewer than batch_size {self.batch_size} (sequences per step): "
                    f"set nsamples >= {self.batch_size} or batch_size <= {self.nsamples} (--nsamples, --batch-size)")


@dataclass
class Activations(Config):
    """Inputs of every quantized linear layer: full precision (bits 16) or fake-quantized."""
    bits: int = 16
    dynamic: bool = True   # per-token ranges at run time; False: one learned step per tensor
    sym: bool = False

    def check(self):
        self.refuse(4 <= self.bits <= 8 or self.bits == 16,
                    f"bits must be in 4..8, or 16 (no activation quantization), got {self.bits}")
        self.refuse(self.bits < 16 or (self.dynamic and not self.sym),
                    "dynamic and sym have no effect on full-precision activations (bits 16)")

    @property
    def static(self) -> bool:
        """One learned step per tensor (calibrated, then trained with the weights)."""
        return self.bits < 16 and not self.dynamic

    def scheme(self) -> dict | None:
        """The export's description of the activation quantizer, or None (see export/formats.py)."""
        from .quant.act import act_scheme
        return act_scheme(self.bits, self.dynamic, self.sym)


@dataclass
class Recipe(Config):
    name: str = "custom"
    data: Data = field(default_factory=Data)
    grid: Config = field(default_factory=UniformGrid)
    activations: Activations = field(default_factory=Activations)
    skip: list[str] = field(default_factory=list)  # layers left in full precision: names, globs (adapter.is_skipped)
    stages: list[Stage] = field(default_factory=lambda: [Windows()])
    precision: str = "auto"  # compute of blocks and model: auto, bf16 or fp32 (precision.py)
    # how the recipe was chosen (Recipe.default, --recipe auto): recorded in crossblock.json, not part of
    # the recipe itself (to_dict leaves it out, so checkpoints and fingerprints ignore it)
    chosen_by: dict | None = field(default=None, compare=False, repr=False)

    def check(self):
        self.refuse(self.precision in PRECISIONS,
                    f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        names = [s.kind_name for s in self.stages]
        self.refuse(sum(s.quantizes for s in self.stages) == 1,
                    f"needs exactly one stage that quantizes (windows), got stages {names}")
        self.refuse(len(set(names)) == len(names), f"a stage may appear once, got {names}")
        order = [n for n in ("rotate", "cfp", "windows", "finetune") if n in names]
        self.refuse([n for n in names if n in order] == order,
                    f"stages run in the order rotate, cfp (the FP model), windows, finetune; got {names}")
        self.refuse("finetune" not in names or isinstance(self.grid, UniformGrid),
                    f"finetune trains a uniform grid's scales; the {self.grid.kind_name} grid's scales are quantized "
                    "themselves (drop finetune)")
        w = self.windows
        self.grid.check_windows(w.init, w.train.rounding.kind_name if w.train is not None else None)
        if w.train is not None:
            self.refuse(w.trains(self.activations.static),
                        "windows.train has nothing to learn: rounding rtn without lwc or static activation steps "
                        "(drop train, or pick a rounding / lwc)")

    @property
    def windows(self) -> Windows:
        return next(s for s in self.stages if isinstance(s, Windows))

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.kind_name == name), None)

    def summary(self) -> str:
        g, w, a = self.grid, self.windows, self.activations
        acts = f"A{a.bits}" if a.bits < 16 else ""
        grid = (f"GGUF {g.quant}{' ' + acts if acts else ''}" if isinstance(g, GgufGrid) else
                f"{g.kind_name.upper()}{' ' + acts if acts else ''}" if isinstance(g, Fp4Grid) else
                f"W{g.bits}{acts} g{g.group_size} {'sym' if g.sym else 'asym'}")
        text = (f"{grid}, "
                f"stages {' -> '.join(s.kind_name for s in self.stages)}, window {w.window} stride {w.stride} "
                f"lookahead {w.lookahead}, init {w.init}")
        if w.train is not None:
            t = w.train
            text += (f", {t.iters} steps x batch {self.data.batch_size}, {t.rounding.kind_name}, target {t.target}, "
                     f"loss {t.loss}")
        return text

    # -- presets and files ------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "Recipe":
        """A preset, with flat overrides (`wbits=2, iters=60, ...`)."""
        if not isinstance(name, str) or name not in PRESETS:
            raise CrossblockError(f"unknown recipe {name!r}; presets: {', '.join(PRESETS)} (or a .yaml file)")
        return Flat.from_dict({**PRESETS[name], "name": name, **overrides}, "recipe").validated().recipe()

    @classmethod
    def default(cls, wbits: int = 4, abits: int = 16, group_size: int = 128, **overrides) -> "Recipe":
        """The best recipe measured for this bit width (`DEFAULTS`), with flat overrides: what
        `crossblock quantize` runs without --recipe. `recipe.chosen_by` says which entry and why."""
        key, entry = default_entry(wbits, abits)
        recipe = Flat.from_dict({**PRESETS[entry["preset"]], **entry.get("settings", {}), "name": entry.get("name", entry["preset"]),
                                 "wbits": wbits, "abits": abits, "group_size": group_size, **overrides},
                                "recipe").validated().recipe()
        recipe.chosen_by = {"default_for": key, "preset": entry["preset"], **entry.get("settings", {}),
                            "why": entry["why"]}
        return recipe

    @classmethod
    def flat(cls, **settings) -> "Recipe":
        """A recipe from flat settings alone (defaults: RTN, W4 g128)."""
        return Flat.from_dict(settings, "recipe").validated().recipe()

    @classmethod
    def load(cls, name_or_path: str, **overrides) -> "Recipe":
        """A preset name or a YAML file, with flat overrides."""
        if str(name_or_path).endswith((".yaml", ".yml")):
            return cls.from_yaml(name_or_path, **overrides)
        return cls.preset(name_or_path, **overrides)

    def with_flat(self, **overrides) -> "Recipe":
        if not overrides:
            return self.validated()
        return Flat.from_dict({**self.to_flat(), **overrides}, "recipe").validated().recipe()

    def to_flat(self) -> dict:
        return Flat.of(self).to_dict()

    # -- YAML --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"name": self.name, "data": self.data.to_dict(), "grid": GRIDS.spec(self.grid),
                "activations": self.activations.to_dict(), "skip": list(self.skip), "precision": self.precision,
                "stages": [{s.kind_name: s.to_dict()} for s in self.stages]}

    def to_yaml(self, path=None) -> str:
        import yaml
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict, **overrides) -> "Recipe":
        """Sections (data, grid, activations, stages), or the flat form of earlier versions; either
        may start from a preset (`preset: cbq`): flat fields override the preset's, sections merge
        into its sections and `stages` replaces its stages."""
        if not isinstance(data, dict):
            raise CrossblockError(f"a recipe must be a mapping, got {data!r}")
        base = data.get("preset")
        if base is not None and (not isinstance(base, str) or base not in PRESETS):
            raise CrossblockError(f"unknown preset {base!r} in recipe; presets: {', '.join(PRESETS)}")
        if not any(k in data for k in ("data", "grid", "activations", "stages")):
            flat = {k: v for k, v in data.items() if k != "preset"}
            start = {**PRESETS[base], "name": base} if base else {}
            return Flat.from_dict({**start, **flat, **overrides}, "recipe").validated().recipe()
        unknown = sorted(set(map(str, data)) - set(SECTIONS))
        if unknown:
            raise CrossblockError(f"unknown recipe section(s): {', '.join(unknown)} (known: {', '.join(SECTIONS)}; "
                                  "flat settings such as wbits go inside a section, or use the flat form alone)")
        start = cls.preset(base).to_dict() if base else cls().to_dict()
        if isinstance(data.get("grid"), dict) and data["grid"].get("type", "uniform") != start["grid"]["type"]:
            start["grid"] = {}  # another grid kind: nothing of the start's grid applies
        merged = {k: ({**start[k], **data[k]} if isinstance(start.get(k), dict) and isinstance(data.get(k), dict)
                      else data.get(k, start[k]))
                  for k in start}
        merged["name"] = data.get("name", base or "custom")
        return cls.from_sections(merged).with_flat(**overrides)

    @classmethod
    def from_sections(cls, d: dict) -> "Recipe":
        grid = d.get("grid")
        if isinstance(grid, dict) and "type" not in grid:
            grid = {"type": "uniform", **grid}
        stages = d.get("stages")
        if not isinstance(stages, list):
            raise CrossblockError(f"stages must be a list (e.g. [cfp, windows]), got {stages!r}")
        return cls(name=d["name"], data=Data.from_dict(d.get("data"), "data"), grid=GRIDS.build(grid, "grid"),
                   activations=Activations.from_dict(d.get("activations"), "activations"),
                   skip=[] if d.get("skip") is None else d["skip"],
                   stages=[parse_stage(s) for s in stages], precision=d.get("precision", "auto"))

    @classmethod
    def from_yaml(cls, path, **overrides) -> "Recipe":
        import yaml
        p = Path(path)
        if not p.is_file():
            raise CrossblockError(f"recipe file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise CrossblockError(f"recipe file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise CrossblockError(f"recipe file {p} must hold a mapping of recipe sections or fields")
        return cls.from_dict(data, **overrides)


def parse_stage(spec) -> Stage:
    """`cfp`, `{cfp: {alpha: 0.5}}` or `{windows: {...}}`."""
    if isinstance(spec, str):
        return STAGES[spec]()
    if not isinstance(spec, dict) or len(spec) != 1:
        raise CrossblockError(f"each stage must be a stage name or a mapping {{name: settings}}, got {spec!r}")
    (name, settings), = spec.items()
    return STAGES[name].from_dict(settings, f"{name} stage")


@dataclass
class Flat(Config):
    """The flat spelling of a recipe of shape [rotate], [cfp], windows, [finetune]: one name per setting (the CLI's
    flags). Settings that would have no effect in the combination given are refused."""
    name: str = "custom"
    # grid
    wbits: int = 4
    group_size: int = 128
    sym: bool = False
    scale_dtype: str | None = None
    gguf_type: str | None = None    # a GGUF type or mixture (Q4_K_M ...): the gguf grid instead of wbits etc.
    gguf_output: str | None = None  # the gguf grid's output-head type (default: llama.cpp's)
    # activations, rotation, CFP
    abits: int = 16
    act_dynamic: bool = True
    act_sym: bool = False
    rotate: bool = False
    rotate_kind: str = "hadamard"
    rotate_online: bool = True
    cfp: bool = False
    cfp_alpha: float = 0.7
    cfp_weights: bool = False
    # windows
    window: int = 1
    stride: int = 1
    lookahead: int = 0
    target: str = "propagated"
    loss: str = "mse"
    kl_weight: float = 1.0
    init: str = "rtn"
    rounding: str = "signround"
    lwc: bool = True
    clip_search: bool = False
    lora_rank: int = 4
    round_reg: float = 0.01
    ste: bool = True
    iters: int = 0                 # 0: no training (RTN, GPTQ)
    batch_size: int = 8
    lr: float | None = None
    damp: float = 0.01
    act_order: bool = False
    all_experts: bool = True       # MoE, init gptq: every token through every fused expert for the Hessians
    # finetune (end to end, after the windows): 0 steps = no finetune stage
    finetune_steps: int = 0
    finetune_lr: float = 2e-3
    finetune_batch_size: int = 2
    finetune_loss: str = "kl"
    finetune_zeros: bool = False
    finetune_norms: bool = False
    finetune_holdout: float = 0.125
    # data
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    skip: list[str] = field(default_factory=list)
    precision: str = "auto"

    @classmethod
    def section(cls) -> str:
        return "recipe"

    def check(self):
        default = Flat()
        changed = lambda *names: [n for n in names if getattr(self, n) != getattr(default, n)]  # noqa: E731
        if self.gguf_type is not None:  # "" too: not a uniform grid (checked before the rules below name it)
            self.refuse(self.gguf_type in GgufGrid.names(), f"gguf_type (--gguf-type) must be one of "
                                                            f"{', '.join(GgufGrid.names())}, got {self.gguf_type!r}")
        self.refuse(self.iters >= 0, f"iters must be >= 0, got {self.iters}")
        self.refuse(self.rounding in ROUNDINGS, f"rounding must be one of {', '.join(ROUNDINGS.names())}, "
                                                f"got {self.rounding!r}")
        rules = [
            (self.gguf_type is not None, changed("wbits", "group_size", "sym", "scale_dtype"), "with gguf_type"),
            (self.gguf_type is None, changed("gguf_output"), "without gguf_type"),
            (self.abits == 16, changed("act_dynamic", "act_sym"), "without abits < 16"),
            (not self.cfp, changed("cfp_alpha", "cfp_weights"), "without cfp"),
            (not self.rotate, changed("rotate_kind", "rotate_online"), "without rotate"),
            (self.finetune_steps == 0, changed(*FINETUNE_FLAT), "without finetune_steps > 0"),
            (self.init != "gptq", changed("damp", "act_order", "all_experts"), "without init gptq"),
            (self.rounding not in ("adaround", "lora"), changed("round_reg", "ste"), f"with rounding {self.rounding}"),
            (self.rounding != "lora", changed("lora_rank"), f"with rounding {self.rounding}"),
        ]
        for applies, names, why in rules:
            self.refuse(not (applies and names), f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} "
                                                 f"no effect {why}")

    @property
    def trains(self) -> bool:
        """Steps, and something to learn. Recipes that do not train (rtn, gptq) ignore the training
        settings, so that `compare` can apply one set of flags to every recipe it ranks."""
        static_acts = self.abits < 16 and not self.act_dynamic
        return self.iters > 0 and (self.rounding != "rtn" or self.lwc or static_acts)

    def recipe(self) -> Recipe:
        r = self
        rounding = {"lora": lambda: LoraRound(r.lora_rank, r.round_reg, r.ste),
                    "adaround": lambda: AdaRound(r.round_reg, r.ste)}.get(r.rounding, ROUNDINGS[r.rounding])()
        train = Train(r.iters, r.target, r.loss, r.kl_weight, rounding, r.lwc, r.lr) if r.trains else None
        stages = [Rotate(r.rotate_kind, r.seed, r.rotate_online)] if r.rotate else []
        stages += [Cfp(r.cfp_alpha, r.cfp_weights)] if r.cfp else []
        stages.append(Windows(r.window, r.stride, r.lookahead, r.init, r.damp, r.act_order, r.clip_search, train,
                              all_experts=r.all_experts))
        if r.finetune_steps:
            stages.append(Finetune(r.finetune_steps, **{f.removeprefix("finetune_"): getattr(r, f) for f in FINETUNE_FLAT}))
        return Recipe(r.name, Data(r.nsamples, r.seqlen, r.seed, r.batch_size),
                      GgufGrid(r.gguf_type, r.gguf_output) if r.gguf_type is not None else
                      UniformGrid(r.wbits, r.group_size, r.sym, r.scale_dtype),
                      Activations(r.abits, r.act_dynamic, r.act_sym), list(r.skip), stages, r.precision).validated()

    @classmethod
    def of(cls, recipe: Recipe) -> "Flat":
        kinds = [s.kind_name for s in recipe.stages]
        g = recipe.grid
        flat_grid = isinstance(g, UniformGrid) or (isinstance(g, GgufGrid) and g.embeddings is None)
        if [k for k in kinds if k not in ("rotate", "cfp", "finetune")] != ["windows"] or not flat_grid:
            raise CrossblockError(f"recipe {recipe.name!r} (stages {kinds}, grid {recipe.grid.kind_name}) has no flat "
                                  "form: flat settings apply to a uniform or gguf grid and stages [rotate], [cfp], "
                                  "windows, [finetune]")
        a, d, w = recipe.activations, recipe.data, recipe.windows
        cfp, rotate, finetune = recipe.stage("cfp"), recipe.stage("rotate"), recipe.stage("finetune")
        grid = (dict(gguf_type=g.quant, gguf_output=g.output) if isinstance(g, GgufGrid) else
                dict(wbits=g.bits, group_size=g.group_size, sym=g.sym, scale_dtype=g.scale_dtype))
        flat = dict(name=recipe.name, **grid,
                    abits=a.bits, act_dynamic=a.dynamic, act_sym=a.sym, cfp=cfp is not None,
                    window=w.window, stride=w.stride, lookahead=w.lookahead, init=w.init, damp=w.damp,
                    act_order=w.act_order, clip_search=w.clip_search, all_experts=w.all_experts, batch_size=d.batch_size,
                    nsamples=d.nsamples, seqlen=d.seqlen, seed=d.seed, skip=list(recipe.skip),
                    precision=recipe.precision)
        if cfp is not None:
            flat.update(cfp_alpha=cfp.alpha, cfp_weights=cfp.weights)
        if rotate is not None:
            if rotate.seed != d.seed:
                raise CrossblockError(f"recipe {recipe.name!r} has no flat form: its rotate seed differs from data.seed")
            flat.update(rotate=True, rotate_kind=rotate.kind, rotate_online=rotate.online)
        if finetune is not None:
            if finetune.eval_every != Finetune.eval_every:
                raise CrossblockError(f"recipe {recipe.name!r} has no flat form: finetune eval_every is not a flag")
            flat.update(finetune_steps=finetune.steps, **{f: getattr(finetune, f.removeprefix("finetune_"))
                                                          for f in FINETUNE_FLAT})
        t = w.train
        if t is None:
            flat.update(iters=0, rounding="rtn", lwc=False)
        else:
            flat.update(iters=t.iters, target=t.target, loss=t.loss, kl_weight=t.kl_weight, lwc=t.lwc, lr=t.lr,
                        rounding=t.rounding.kind_name)
            if isinstance(t.rounding, (AdaRound, LoraRound)):
                flat.update(round_reg=t.rounding.reg, ste=t.rounding.ste)
            if isinstance(t.rounding, LoraRound):
                flat.update(lora_rank=t.rounding.rank)
        return cls(**flat)


FINETUNE_FLAT = ("finetune_lr", "finetune_batch_size", "finetune_loss", "finetune_zeros", "finetune_norms",
                 "finetune_holdout")

# The methods, in the flat spelling. Training presets share AutoRound's defaults (SignRound +
# clipping, 200 steps, batch 8), so that schedules compare at the same budget per window.
_TRAIN = dict(rounding="signround", lwc=True, iters=200, batch_size=8)
PRESETS: dict[str, dict] = {
    "rtn": dict(init="rtn", rounding="rtn", lwc=False, iters=0),
    "gptq": dict(init="gptq", rounding="rtn", lwc=False, iters=0),
    "block": dict(_TRAIN, window=1, stride=1, lookahead=0),
    "mb": dict(_TRAIN, window=2, stride=2, lookahead=0),
    "la": dict(_TRAIN, window=1, stride=1, lookahead=1),
    "cbq": dict(_TRAIN, window=2, stride=1, lookahead=0, target="homologous", loss="mse+kl",
                rounding="lora", lora_rank=4),
    # the best recipe measured (recipes/block-60x2-token.yaml; SmolLM2 W2 and W3 g64 at 128 x 512
    # tokens: bench/results/smollm2_w*g64_c128.md): the command line's default
    "best": dict(_TRAIN, window=1, stride=1, lookahead=0, loss="token-mse", iters=60, batch_size=2),
}


# Default recipe per bit width: what `crossblock quantize` runs without --recipe (and
# `Recipe.default`). Keys: (wbits, abits), None = any; the most specific key wins. Each entry
# cites the measurement that chose it; crossblock.json records the entry and its reason.
DEFAULTS: dict[tuple, dict] = {
    # weights only, any width: bench/results/smollm2_w3g64_c128.md (W3 g64: best 36.93 vs block
    # 40.72, la 41.93, mb 45.26, cbq 58.96, GPTQ 78.10, AutoRound 45.11) and smollm2_w2g64_c128.md (W2 g64)
    (None, 16): dict(preset="best", why="best measured weights-only recipe: SmolLM2-135M W3 g64 ppl 36.93 "
                                        "(gptq 78.10, block 40.72, la 41.93, mb 45.26, cbq 58.96; "
                                        "bench/results/smollm2_w3g64_c128.md), W2 g64 bench/results/smollm2_w2g64_c128.md"),
    # W4A8: bench/results/rotate_smollm2.md (best + rotate 30.77, GPTQ + rotate 31.90, GPTQ W4A16 35.91)
    (None, 8): dict(preset="best", name="best-rotate", settings=dict(rotate=True),
                    why="best schedule with Hadamard rotation: SmolLM2-135M W4A8 g64 ppl 30.77 (FP 28.74; "
                        "gptq + rotate 31.90, gptq W4A16 35.91; bench/results/rotate_smollm2.md)"),
    # W4A4 (and any abits below 8): bench/results/rotate_smollm2.md (best + rotate 44.37 = 1.54x FP;
    # GPTQ + rotate 54.31, rtn + rotate 109.91, rtn 1351.69)
    (None, None): dict(preset="best", name="best-rotate", settings=dict(rotate=True),
                       why="best schedule with Hadamard rotation: SmolLM2-135M W4A4 g64 ppl 44.37 = 1.54x FP "
                           "(gptq + rotate 54.31, rtn + rotate 109.91, rtn 1351.69; bench/results/rotate_smollm2.md)"),
}


def default_entry(wbits: int, abits: int) -> tuple[str, dict]:
    """(key as text, entry) of DEFAULTS for these bits: an exact key first, then any wbits, then any abits."""
    for key in ((wbits, abits), (None, abits), (wbits, None), (None, None)):
        if key in DEFAULTS:
            w, a = key
            return f"W{'*' if w is None else w}A{'*' if a is None else a}", DEFAULTS[key]
    raise CrossblockError(f"no default recipe for W{wbits}A{abits}")  # unreachable: (None, None) is there
