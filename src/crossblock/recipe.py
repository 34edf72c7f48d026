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
derived from the sections' dataclasses (`flat_settings`: a field declared once, with its default,
help and checks, is a flag), and converts both ways for recipes of the shape [rotate], [cfp],
windows, [finetune]. Everything is validated before any work starts, strictly: wrong types,
out-of-range values and settings that would have no effect are refused with one line.
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Config, Needs, field_default, hints_of, needs_groups, no_effect, setting, type_name, type_ok
from .errors import CrossblockError
from .grids import GRIDS, GgufGrid, UniformGrid
from .precision import PRECISIONS
from .stages import STAGES, Stage, Windows

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
    """Inputs of every quantized linear layer: full precision (bits 16) or fake-quantized."""
    flat_prefix = "act_"
    bits: int = setting(16, "activation bits: 4..8, or 16 (none)", flat="abits")
    dynamic: bool = setting(True, "per-token ranges at run time; off: one learned static step per tensor",
                            needs=QUANTIZED)
    sym: bool = setting(False, "symmetric activation grid", needs=QUANTIZED)

    def check(self):
        self.refuse(4 <= self.bits <= 8 or self.bits == 16,
                    f"bits must be in 4..8, or 16 (no activation quantization), got {self.bits}")

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
    name: str = setting("custom", "the recipe's name (crossblock.json)")
    data: Data = field(default_factory=Data)
    grid: Config = setting(factory=UniformGrid, registry=GRIDS, flat=False)  # flat: picked by a grid's switch
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
        return from_flat({**PRESETS[name], "name": name, **overrides})

    @classmethod
    def default(cls, wbits: int = 4, abits: int = 16, group_size: int = 128, **overrides) -> "Recipe":
        """The best recipe measured for this bit width (`DEFAULTS`), with flat overrides: what
        `crossblock quantize` runs without --recipe. `recipe.chosen_by` says which entry and why."""
        key, entry = default_entry(wbits, abits)
        recipe = from_flat({**PRESETS[entry["preset"]], **entry.get("settings", {}),
                            "name": entry.get("name", entry["preset"]),
                            "wbits": wbits, "abits": abits, "group_size": group_size, **overrides})
        recipe.chosen_by = {"default_for": key, "preset": entry["preset"], **entry.get("settings", {}),
                            "why": entry["why"]}
        return recipe

    @classmethod
    def flat(cls, **settings) -> "Recipe":
        """A recipe from flat settings alone (defaults: RTN, W4 g128)."""
        return from_flat(settings)

    @classmethod
    def load(cls, name_or_path: str, **overrides) -> "Recipe":
        """A preset name or a YAML file, with flat overrides."""
        if str(name_or_path).endswith((".yaml", ".yml")):
            return cls.from_yaml(name_or_path, **overrides)
        return cls.preset(name_or_path, **overrides)

    def with_flat(self, **overrides) -> "Recipe":
        if not overrides:
            return self.validated()
        return from_flat({**self.to_flat(), **overrides})

    def to_flat(self) -> dict:
        return to_flat(self)

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
            return from_flat({**start, **flat, **overrides})
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


# -- the flat spelling ------------------------------------------------------------------------
# One name per setting: the command line's flags, `Recipe.preset(name, **flat)` and the flat recipe
# files of earlier versions. Everything here is derived from the sections' dataclasses; nothing
# names a setting. A field's flat name is its class's `flat_prefix` + its name (registered kinds:
# `<kind>_`, e.g. finetune_lr, lora_rank; data, train, windows: plain) unless `setting(flat=...)`
# says otherwise (wbits, abits, round_reg); its type, default, choices and help are the field's. A
# section that may be absent is on when its switch is: its first field with an `off` value (iters 0:
# no training; finetune_steps 0: no finetune; gguf_type unset: the uniform grid), or, for a stage
# without one, a boolean named after it (rotate, cfp). Settings that would have no effect in the
# combination given are refused, except those of a section that says it ignores them (`Train`).


@dataclass
class FlatSetting:
    """One flat name: its type, flat default and help, and the fields it sets."""
    name: str
    hint: Any
    default: Any
    help: str
    choices: Any = None
    owners: list = field(default_factory=list)  # [(config class, field name)]: two for a shared name (seed)
    picks: bool = False  # a switch or a kind's name: it decides which sections there are


def stage_classes() -> list[type]:
    """The registered stages in the order they run."""
    return sorted(STAGES.classes.values(), key=lambda c: c.order)


def flat_prefix(cls) -> str:
    if "flat_prefix" in vars(cls):
        return cls.flat_prefix
    return f"{cls.kind_name}_" if "kind_name" in vars(cls) else ""


def flat_name(cls, f: dataclasses.Field) -> str:
    return f.metadata.get("flat") or flat_prefix(cls) + f.name


def config_class(hint):
    """The Config subclass a field holds (`Train | None` -> Train), or None."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    found = [a for a in args if isinstance(a, type) and issubclass(a, Config)]
    return found[0] if found else None


@functools.cache
def parts(cls) -> tuple:
    """(field, what, sub) for the fields of a section in the flat spelling: "setting"; "section" (a
    nested config, sub its class); "slot" (one of a registry's configs, sub the registry); "stages"."""
    out = []
    for f in dataclasses.fields(cls):
        hint = hints_of(cls)[f.name]
        if f.metadata.get("registry") is not None:
            out.append((f, "slot", f.metadata["registry"]))
        elif f.metadata.get("flat") is False:
            continue
        elif typing.get_origin(hint) is list and config_class(typing.get_args(hint)[0]) is Stage:
            out.append((f, "stages", None))
        elif config_class(hint) is not None:
            out.append((f, "section", config_class(hint)))
        else:
            out.append((f, "setting", None))
    return tuple(out)


def off_field(cls) -> tuple[str, Any] | None:
    """(flat name, off value) of a section's first field with an `off` value, or None."""
    return next(((flat_name(cls, f), f.metadata["off"]) for f in dataclasses.fields(cls) if "off" in f.metadata), None)


def has_flag_switch(cls) -> bool:
    """A stage turned on by a boolean named after it (--rotate): it does not quantize, and has no off field."""
    return issubclass(cls, Stage) and not cls.quantizes and off_field(cls) is None


def switch(cls) -> tuple[str, Any] | None:
    """(flat name, off value) of what turns a section or stage on; None: always on."""
    return (cls.kind_name, False) if has_flag_switch(cls) else off_field(cls)


def is_on(cls, flat: dict) -> bool:
    sw = switch(cls)
    return sw is None or flat[sw[0]] != sw[1]


def off_reason(cls) -> str:
    """Why the settings of an absent section or stage have no effect."""
    name, off = switch(cls)
    return f"without {name} > 0" if off == 0 and off is not False else f"without {name}"


def selector(f: dataclasses.Field, cls) -> str | None:
    """The flat name that picks a slot's kind by name (rounding), or None (picked by switches: grid)."""
    return None if f.metadata.get("flat") is False else flat_name(cls, f)


def slot_kinds(f: dataclasses.Field, cls, registry) -> list[type]:
    """A slot's kinds in the flat spelling: all of a registry's if picked by name; else the default
    first, then those with a switch (a grid with neither has no flat spelling)."""
    if selector(f, cls):
        return list(registry.classes.values())
    default_kind = type(field_default(f))
    return [default_kind] + [c for c in registry.classes.values() if c is not default_kind and switch(c)]


def flat_settings() -> dict[str, FlatSetting]:
    """Every flat name, in the order of the recipe's sections (read from the registries each time, so
    that a registered stage, grid or rounding brings its settings)."""
    table: dict[str, FlatSetting] = {}

    def add(name, owner, hint, default, help, choices=None, picks=False):
        known = table.get(name)
        if known is None:
            table[name] = FlatSetting(name, hint, default, help, choices, [owner], picks)
        elif (known.hint, known.default) != (hint, default):
            raise TypeError(f"flat name {name} is two settings: {known.owners[0]} and {owner}")  # a bug, not input
        else:
            known.owners.append(owner)

    def walk(cls):
        hints, sw = hints_of(cls), switch(cls)
        for f, what, sub in parts(cls):
            if what == "setting":
                name, hint, default = flat_name(cls, f), hints[f.name], field_default(f)
                picks = sw is not None and name == sw[0]
                if picks:  # the switch: off by default
                    default = sw[1]
                    hint = hint if type_ok(default, hint) else typing.Optional[hint]
                add(name, (cls, f.name), hint, default, f.metadata.get("help", ""), f.metadata.get("choices"), picks)
            elif what == "section":
                walk(sub)
            elif what == "slot":
                default_kind = type(field_default(f))
                if selector(f, cls):
                    add(selector(f, cls), (cls, f.name), str, default_kind.kind_name, f.metadata.get("help", ""),
                        tuple(sub.names()), picks=True)
                for kind in slot_kinds(f, cls, sub):
                    walk(kind)
            else:
                for stage in stage_classes():
                    if has_flag_switch(stage):
                        doc = (stage.__doc__ or "").strip().splitlines()[0] if stage.__doc__ else ""
                        add(stage.kind_name, (stage, None), bool, False, f"run the {stage.kind_name} stage: {doc}",
                            picks=True)
                    walk(stage)

    walk(Recipe)
    return table


def refuse(ok: bool, message: str):
    if not ok:
        raise CrossblockError(f"invalid recipe: {message}")


def chosen_kind(f: dataclasses.Field, cls, registry, flat: dict) -> type:
    """The kind a slot holds: the one whose switch is on, else the one named (rounding), else the default."""
    default_kind = type(field_default(f))
    switched = [k for k in registry.classes.values() if k is not default_kind and switch(k) and is_on(k, flat)]
    refuse(len(switched) <= 1, f"{' and '.join(switch(k)[0] for k in switched)} pick different {registry.what}s")
    if switched:
        return switched[0]
    return registry[flat[selector(f, cls)]] if selector(f, cls) else default_kind


def layout(flat: dict) -> list[tuple[type, bool, str | None]]:
    """(section class, on, why its settings have no effect when off; None: they are ignored), for
    every section of the flat spelling, in order."""
    out = []

    def walk(cls, on, why):
        out.append((cls, on, why))
        for f, what, sub in parts(cls):
            if what == "section":
                optional = switch(sub) is not None
                walk(sub, is_on(sub, flat), None if getattr(sub, "ignored_when_off", False) or not optional
                     else off_reason(sub))
            elif what == "slot":
                chosen = chosen_kind(f, cls, sub, flat)
                for kind in slot_kinds(f, cls, sub):
                    if kind is chosen:
                        why = None
                    elif selector(f, cls):
                        why = f"with {selector(f, cls)} {chosen.kind_name}"
                    else:  # picked by switches: the default kind's settings go with no switch on
                        why = off_reason(kind) if switch(kind) else f"with {switch(chosen)[0]}"
                    walk(kind, kind is chosen, why)
            elif what == "stages":
                for stage in stage_classes():
                    walk(stage, is_on(stage, flat), None if stage.quantizes else off_reason(stage))

    walk(Recipe, True, None)
    return out


def check_flat(flat: dict, table: dict[str, FlatSetting]):
    """Types; then the switches and names that pick sections (whatever else is on); then settings
    that would do nothing: those of a section that is off, and those whose `Needs` fail."""
    for name, s in table.items():
        refuse(type_ok(flat[name], s.hint), f"{name} must be {type_name(s.hint)}, got {flat[name]!r}")
    for name, s in table.items():
        value = flat[name]
        if s.picks and s.choices is not None and value is not None:
            refuse(value in s.choices, f"{name} must be one of {', '.join(s.choices)}, got {value!r}")
        if s.picks and type(s.default) is int:  # a count whose off value is 0
            refuse(value >= s.default, f"{name} must be >= {s.default}, got {value}")
    sections = layout(flat)
    settled = {cls for cls, on, why in sections if on or why is None}  # on, or its settings ignored
    for cls, on, why in sections:
        if not on:
            names = [name for name, s in table.items() if flat[name] != s.default
                     and any(o is cls for o, _ in s.owners) and not any(o in settled for o, _ in s.owners)]
            refuse(not names, no_effect(names, why))
    for cls, on, _ in sections:
        if on and not getattr(cls, "ignored_when_off", False):
            names = {f.name: flat_name(cls, f) for f in dataclasses.fields(cls)}
            for needs, fields in needs_groups(cls).items():
                value = flat[names[needs.field]]
                changed = [names[n] for n in fields if flat[names[n]] != table[names[n]].default]
                refuse(needs.test(value) or not changed,
                       no_effect(changed, needs.why.format(name=names[needs.field], value=value)))


def build(cls, flat: dict):
    """The section `cls` of the flat settings, with the sections, kinds and stages they turn on."""
    kwargs = {}
    for f, what, sub in parts(cls):
        if what == "setting":
            value = flat[flat_name(cls, f)]
            kwargs[f.name] = list(value) if isinstance(value, list) else value
        elif what == "section":
            kwargs[f.name] = build(sub, flat) if is_on(sub, flat) else None
        elif what == "slot":
            kwargs[f.name] = build(chosen_kind(f, cls, sub, flat), flat)
        else:
            kwargs[f.name] = [build(stage, flat) for stage in stage_classes() if is_on(stage, flat)]
    return cls(**kwargs)


def from_flat(settings: dict) -> Recipe:
    """A recipe from flat settings, the others at their defaults (`Recipe.flat`)."""
    table = flat_settings()
    unknown = sorted(set(map(str, settings)) - set(table))
    if unknown:
        raise CrossblockError(f"unknown recipe setting(s): {', '.join(unknown)} (known: {', '.join(sorted(table))})")
    flat = {name: settings.get(name, s.default) for name, s in table.items()}
    check_flat(flat, table)
    recipe = build(Recipe, flat)
    w = recipe.windows
    if w.train is not None and not w.trains(recipe.activations.static):
        w.train = None  # steps but nothing to learn (rtn, gptq with --iters): no training, as documented
    return recipe.validated()


def to_flat(recipe: Recipe) -> dict:
    """The flat settings of a recipe of the flat spelling's shape; `from_flat` gives it back."""
    kinds_now = [s.kind_name for s in recipe.stages]
    stages = [("" if c.quantizes else "[") + c.kind_name + ("" if c.quantizes else "]") for c in stage_classes()]
    grid_field = next(f for f in dataclasses.fields(Recipe) if f.name == "grid")
    grids = slot_kinds(grid_field, Recipe, GRIDS)
    shaped = (len(set(kinds_now)) == len(kinds_now) and sum(s.quantizes for s in recipe.stages) == 1
              and type(recipe.grid) in grids)
    if not shaped:
        raise CrossblockError(f"recipe {recipe.name!r} (stages {kinds_now}, grid {recipe.grid.kind_name}) has no "
                              f"flat form: flat settings apply to a {' or '.join(g.kind_name for g in grids)} grid and "
                              f"stages {', '.join(stages)}")
    found: dict[str, list] = {}  # name -> [(value, from a section that is there)]

    def read(cls, obj):  # obj None: the section is absent
        for f, what, sub in parts(cls):
            value = None if obj is None else getattr(obj, f.name)
            if what == "setting":
                absent = f.metadata.get("off", field_default(f))
                found.setdefault(flat_name(cls, f), []).append((absent, False) if obj is None else (value, True))
            elif what == "section":
                read(sub, value)
            elif what == "slot":
                if selector(f, cls):
                    found.setdefault(selector(f, cls), []).append(
                        (f.metadata.get("off"), False) if value is None else (value.kind_name, True))
                for kind in slot_kinds(f, cls, sub):
                    read(kind, value if type(value) is kind else None)
            else:
                for stage in stage_classes():
                    there = next((s for s in value if type(s) is stage), None) if value is not None else None
                    if has_flag_switch(stage):
                        found.setdefault(stage.kind_name, []).append((there is not None, True))
                    read(stage, there)

    read(Recipe, recipe)
    flat = {}
    for name, values in found.items():
        there = [v for v, present in values if present]
        if any(v != there[0] for v in there):
            raise CrossblockError(f"recipe {recipe.name!r} has no flat form: its sections set {name} to different "
                                  f"values ({', '.join(map(repr, there))})")
        flat[name] = there[0] if there else values[0][0]
    return flat


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
