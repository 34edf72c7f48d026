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
flat spelling (one name per setting, e.g. `wbits`, `lora_rank`): command-line flags,
`Recipe.preset(name, **flat)` overrides and the recipe files of earlier versions use it. It is
derived from the sections' dataclasses (flat.py: a field declared once, with its default, help
and checks, is a flag), and converts both ways for recipes of the shape [rotate], [cfp],
windows, [finetune]. Everything is validated before any work starts, strictly: wrong types,
out-of-range values and settings that would have no effect are refused with one line.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .config import Config, Needs, setting
from .errors import CrossblockError
from .flat import from_flat, to_flat
from .grids import GRIDS, GgufGrid, UniformGrid
from .grids.fp4 import Fp4Grid
from .precision import PRECISIONS
from .quant.act import FLOAT_TYPES, TYPES as ACT_TYPES
from .quant import fp4
from .stages import STAGES, Stage, Windows, stage_classes

SECTIONS = ("name", "preset", "data", "grid", "activations", "skip", "precision", "stages")
SKIP_HELP = ("comma-separated layers to leave in full precision: full names as crossblock.json lists them "
             "(model.layers.0.self_attn.q_proj, or a block: model.layers.0), block-relative names or parts of them "
             "(q_proj, mlp), or globs (layers.0.*); a pattern that matches no layer is refused")
QUANTIZED = Needs("bits", lambda bits: bits < 16, "without {name} < 16")


@dataclass
class Data(Config):
    nsamples: int = setting(128, "calibration sequences")
    seqlen: int = setting(512, "tokens per calibration sequence")
    seed: int = setting(0, "which windows of the calibration text are drawn (and the rotations' signs)")
    batch_size: int = setting(8, "sequences per forward pass and per optimizer step")

    def check(self):
        self.refuse(self.nsamples >= 1 and self.seqlen >= 2, "nsamples must be >= 1 and seqlen >= 2")
        self.refuse(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        # either may be the one the user set (e.g. --nsamples 2 under a preset's batch_size 8): both named
        self.refuse(self.batch_size <= self.nsamples,
                    f"nsamples {self.nsamples} is fewer than batch_size {self.batch_size} (sequences per step): "
                    f"set nsamples >= {self.batch_size} or batch_size <= {self.nsamples} (--nsamples, --batch-size)")


@dataclass
class Activations(Config):
    """Inputs of every quantized linear layer: full precision (bits 16) or fake-quantized, on an
    integer grid (type int) or in a float format: nvfp4 / mxfp4 (4 bits, dynamic group scales;
    nvfp4's global scale calibrated) or fp8 (E4M3 per token), as compressed-tensors runs them."""
    flat_prefix = "act_"
    bits: int = setting(16, "activation bits: 4..8, or 16 (none)", flat="abits")
    dynamic: bool = setting(True, "per-token ranges at run time; off: one learned static step per tensor",
                            needs=QUANTIZED)
    sym: bool = setting(False, "symmetric activation grid", needs=QUANTIZED)
    # terse: recipes that leave it at int keep the sections and flat form they had before it
    type: str = setting("int", "activation format: int (the integer grid of --abits), nvfp4 or mxfp4 (with "
                               "--abits 4: E2M1, dynamic scales per 16 / 32 values), fp8 (with --abits 8: E4M3 "
                               "per token)", choices=ACT_TYPES, needs=QUANTIZED, terse=True)

    def check(self):
        self.refuse(4 <= self.bits <= 8 or self.bits == 16,
                    f"bits must be in 4..8, or 16 (no activation quantization), got {self.bits}")
        if self.type == "int" or self.bits == 16:
            return
        width = FLOAT_TYPES[self.type]
        self.refuse(self.bits == width, f"type {self.type} is {width}-bit: bits must be {width}, got {self.bits}")
        self.refuse(self.dynamic, f"type {self.type} computes its scales at run time: dynamic must be true "
                                  "(static steps: type int)")
        self.refuse(not self.sym, f"type {self.type} is symmetric by format: leave sym false (it has no effect)")

    @property
    def static(self) -> bool:
        """One learned step per tensor (calibrated, then trained with the weights)."""
        return self.bits < 16 and not self.dynamic

    @property
    def calibrated(self) -> bool:
        """Quantizers that observe the calibration inputs: static steps, NVFP4's global scale."""
        return self.static or (self.bits < 16 and self.type == "nvfp4")

    def scheme(self) -> dict | None:
        """The export's description of the activation quantizer, or None (see export/formats.py)."""
        from .quant.act import act_scheme
        return act_scheme(self.bits, self.dynamic, self.sym, self.type)


@dataclass
class Recipe(Config):
    name: str = setting("custom", "the recipe's name (crossblock.json)")
    data: Data = field(default_factory=Data)
    # flat: --grid names the kind (uniform, nvfp4, mxfp4); gguf is picked by its own switch, --gguf-type
    grid: Config = setting(factory=UniformGrid, registry=GRIDS, flat="grid", terse=True,
                           help="weight grid: uniform (integers: --wbits, --group-size, --sym), nvfp4 or mxfp4 "
                                "(microscaling FP4, group and scales fixed by the format); GGUF types: --gguf-type")
    activations: Activations = field(default_factory=Activations)
    skip: list[str] = setting(factory=list, help=SKIP_HELP)
    stages: list[Stage] = field(default_factory=lambda: [Windows()])
    precision: str = setting("auto", "compute of blocks and model: auto (bf16 autocast where bf16 matmul is "
                                     "native, else fp32), bf16 or fp32", choices=PRECISIONS)
    # how the recipe was chosen (Recipe.default, --recipe auto): recorded in crossblock.json, not part of
    # the recipe itself (to_dict leaves it out, so checkpoints and fingerprints ignore it)
    chosen_by: dict | None = field(default=None, compare=False, repr=False, metadata={"flat": False})

    def check(self):
        names = [s.kind_name for s in self.stages]
        self.refuse(sum(s.quantizes for s in self.stages) == 1,
                    f"needs exactly one stage that quantizes (windows), got stages {names}")
        self.refuse(len(set(names)) == len(names), f"a stage may appear once, got {names}")
        self.refuse(names == [s.kind_name for s in sorted(self.stages, key=lambda s: s.order)],
                    f"stages run in the order {', '.join(c.kind_name for c in stage_classes())}; got {names}")
        self.refuse("finetune" not in names or isinstance(self.grid, UniformGrid),
                    f"finetune trains a uniform grid's scales; the {self.grid.kind_name} grid's scales are quantized "
                    "themselves (drop finetune)")
        bits = self.stage("bits")
        if bits is not None:
            bits.grids(self.grid)  # every option and pin is a grid of the recipe's kind
        w = self.windows
        self.grid.check_windows(w.init, w.train.rounding.kind_name if w.train is not None else None)
        if w.train is not None:
            self.refuse(w.trains(self.activations.static),
                        "windows.train has nothing to learn: rounding rtn without lwc or static activation steps "
                        "(drop train, or pick a rounding / lwc)")

    @property
    def windows(self) -> Windows:
        return next(s for s in self.stages if isinstance(s, Windows))

    def layer_grids(self) -> list:
        """The grids any block layer may be quantized on: the bits stage's options (the recipe's own
        grid then reaches no block layer, only its defaults: '3' takes its group size), or that grid."""
        bits = self.stage("bits")
        return [self.grid] if bits is None else bits.option_grids(self.grid)

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.kind_name == name), None)

    def summary(self) -> str:
        g, w, a = self.grid, self.windows, self.activations
        acts = (f"A{a.bits}" + (f" {a.type}" if a.type != "int" else "")) if a.bits < 16 else ""
        bits = self.stage("bits")
        grid = (f"GGUF {g.quant}{' ' + acts if acts else ''}" if isinstance(g, GgufGrid) else
                f"{g.kind_name.upper()}{' ' + acts if acts else ''}" if isinstance(g, Fp4Grid) else
                f"W{g.bits}{acts} g{g.group_size} {'sym' if g.sym else 'asym'}")
        if bits is not None:
            grid = f"mixed {'/'.join(bits.options)} at {bits.bpw} bpw ({bits.measure}), base grid {grid}"
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
        return from_flat(Recipe, {**PRESETS[name], "name": name, **overrides})

    @classmethod
    def default(cls, wbits: int = 4, abits: int = 16, group_size: int = 128, **overrides) -> "Recipe":
        """The best recipe measured for this bit width (`DEFAULTS`), with flat overrides: what
        `crossblock quantize` runs without --recipe. `recipe.chosen_by` says which entry and why.
        An entry's finetune is left out where it cannot run (`finetune_unfit`) unless asked for."""
        key, entry = default_entry(wbits, abits)
        settings, name = dict(entry.get("settings", {})), entry.get("name", entry["preset"])
        flat = {**PRESETS[entry["preset"]], "wbits": wbits, "abits": abits, "group_size": group_size}
        dropped = None
        if settings.get("finetune_steps"):
            without = {k: v for k, v in settings.items() if not k.startswith("finetune_")}
            if "finetune_steps" not in overrides:
                dropped = finetune_unfit(from_flat(Recipe, {**flat, **without, "name": name, **overrides}))
            if dropped or "finetune_steps" in overrides:  # cannot run, or the user's own finetune (or none)
                settings, name = without, entry["preset"]
        unrotated = (rotate_unfit(abits, overrides.get("act_type", "int"))
                     if settings.get("rotate") and "rotate" not in overrides else None)  # --rotate: the user's own
        if unrotated:
            settings, name = {k: v for k, v in settings.items() if not k.startswith("rotate")}, entry["preset"]
        recipe = from_flat(Recipe, {**flat, **settings, "name": name, **overrides})
        recipe.chosen_by = {"default_for": key, "preset": entry["preset"], **settings, "why": entry["why"],
                            **({"finetune_dropped": dropped} if dropped else {}),
                            **({"rotate_dropped": unrotated} if unrotated else {})}
        return recipe

    def without_default_finetune(self, why: str) -> "Recipe":
        """A default recipe whose finetune this run cannot do (e.g. --low-memory), without it; a
        finetune the user asked for stays (and is refused where it cannot run)."""
        if not (self.chosen_by or {}).get("finetune_steps"):  # no finetune, or not the default entry's
            return self
        entry = next(e for k, e in DEFAULTS.items() if key_text(k) == self.chosen_by["default_for"])
        name = self.chosen_by["preset"] if self.name == entry.get("name") else self.name  # a name given stays
        recipe = from_flat(Recipe, {**{k: v for k, v in self.to_flat().items() if not k.startswith("finetune_")},
                                    "name": name})
        recipe.chosen_by = {**{k: v for k, v in self.chosen_by.items() if not k.startswith("finetune_")},
                            "finetune_dropped": why}
        return recipe

    @classmethod
    def flat(cls, **settings) -> "Recipe":
        """A recipe from flat settings alone (defaults: RTN, W4 g128)."""
        return from_flat(Recipe, settings)

    @classmethod
    def load(cls, name_or_path: str, **overrides) -> "Recipe":
        """A preset name or a YAML file, with flat overrides."""
        if str(name_or_path).endswith((".yaml", ".yml")):
            return cls.from_yaml(name_or_path, **overrides)
        return cls.preset(name_or_path, **overrides)

    def with_flat(self, **overrides) -> "Recipe":
        if not overrides:
            return self.validated()
        return from_flat(Recipe, {**self.to_flat(), **overrides})

    def to_flat(self) -> dict:
        return to_flat(Recipe, self)

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
            return from_flat(Recipe, {**start, **flat, **overrides})
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


# The methods, in the flat spelling. Training presets share AutoRound's defaults (SignRound +
# clipping, 200 steps, batch 8), so that schedules compare at the same budget per window.
_TRAIN = dict(rounding="signround", lwc=True, iters=200, batch_size=8)
PRESETS: dict[str, dict] = {
    "rtn": dict(init="rtn", rounding="rtn", lwc=False, iters=0),
    # columns by decreasing Hessian diagonal, groups fixed up front (llm-compressor's "static" order):
    # SmolLM2 W3 g64 80.11 -> 59.06, MXFP4 38.55 -> 34.27 (bench/results/smollm2_w3g64_gptq_order.md,
    # fp4_smollm2.md); less layer output error at W2/W3/W4 and both FP4 grids
    "gptq": dict(init="gptq", rounding="rtn", lwc=False, iters=0, act_order=True),
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
FT_STEPS = 30  # the default's finetune: evaluated on the held-out rows at its start and end only
DEFAULTS: dict[tuple, dict] = {
    # weights only, any width: the windows of `best` (bench/results/smollm2_w3g64_c128.md: best 36.93 vs
    # block 40.72, la 41.93, mb 45.26, cbq 58.96, GPTQ 78.10) and then FT_STEPS finetune steps, the split
    # of AutoRound 50x8's wall time that measured best (bench/results/smollm2_w3g64_split.md, _w2g64_split.md)
    (None, 16): dict(preset="best", name="best+finetune",
                     settings=dict(finetune_steps=FT_STEPS, finetune_eval_every=FT_STEPS),
                     why=f"best windows (60 x 2 steps) + {FT_STEPS} finetune steps: the split of AutoRound 50x8's "
                         "wall time that measured best on SmolLM2-135M W3 g64 and W2 g64, both texts "
                         "(bench/results/smollm2_w3g64_split.md, smollm2_w2g64_split.md); windows alone: "
                         "bench/results/smollm2_w3g64_c128.md"),
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


def finetune_unfit(recipe: Recipe) -> str | None:
    """Why a default recipe's finetune cannot run with these settings, or None."""
    if not isinstance(recipe.grid, UniformGrid):
        return f"the {recipe.grid.kind_name} grid's scales are quantized themselves"
    if recipe.data.nsamples < 2:
        return "it needs 2 calibration sequences (one held out)"
    return None


def rotate_unfit(abits: int, act_type: str) -> str | None:
    """Why a default recipe's rotation would hurt these activations, or None."""
    if abits < 16 and act_type in fp4.GROUP:  # the microscaling formats
        return (f"{act_type} activations: their scales per 16 / 32 values already hold the outliers a whole-width "
                "rotation spreads (Egiazarian et al. 2025); NVFP4 W4A4 on SmolLM2: best + rotate 43.26, best 34.66, "
                "FP 28.74 (bench/results/fp4_smollm2.md)")
    return None


def key_text(key: tuple) -> str:
    w, a = key
    return f"W{'*' if w is None else w}A{'*' if a is None else a}"


def default_entry(wbits: int, abits: int) -> tuple[str, dict]:
    """(key as text, entry) of DEFAULTS for these bits: an exact key first, then any wbits, then any abits."""
    for key in ((wbits, abits), (None, abits), (wbits, None), (None, None)):
        if key in DEFAULTS:
            return key_text(key), DEFAULTS[key]
    raise CrossblockError(f"no default recipe for W{wbits}A{abits}")  # unreachable: (None, None) is there
