"""The flat spelling of a recipe: one name per setting (`wbits`, `lora_rank`, `finetune_steps`), used by
the command line's flags, `Recipe.preset(name, **flat)` and the flat recipe files of earlier
versions, for recipes of the shape [rotate], [cfp], windows, [finetune].

Everything here is derived from the sections' dataclasses (recipe.py, stages/, grids/,
roundings/); nothing names a setting. A field's flat name is its class's `flat_prefix` + its
name (registered kinds: `<kind>_`, e.g. finetune_lr, lora_rank; data, train, windows: plain)
unless `setting(flat=...)` says otherwise (wbits, abits, round_reg); its type, default, choices
and help are the field's. A section that may be absent is on when its switch is: its first field
with an `off` value (iters 0: no training; finetune_steps 0: no finetune; gguf_type unset: the
uniform grid), or, for a stage without one, a boolean named after it (rotate, cfp). A slot (the
grid, the rounding) holds the kind picked by a switch or by name (`rounding`). Settings that would
have no effect in the combination given are refused, except those of a section that says it
ignores them (`Train`).
"""
from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from .config import Config, field_default, hints_of, needs_groups, no_effect, type_name, type_ok
from .errors import CrossblockError
from .grids import GRIDS
from .stages import Stage, stage_classes


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
    terse: bool = False  # left out of the flat form at its default (config.setting)


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
    """The flat name that picks a slot's kind by name (rounding, grid), or None (picked by switches only)."""
    return None if f.metadata.get("flat") is False else flat_name(cls, f)


def slot_kinds(f: dataclasses.Field, cls, registry) -> list[type]:
    """A slot's kinds in the flat spelling: all of a registry's if picked by name; else the default
    first, then those with a switch."""
    if selector(f, cls):
        return list(registry.classes.values())
    default_kind = type(field_default(f))
    return [default_kind] + [c for c in registry.classes.values() if c is not default_kind and switch(c)]


def named_kinds(registry) -> tuple[str, ...]:
    """The kinds a slot's selector may name: those without a switch of their own (a kind with one,
    the gguf grid, is picked by it: --gguf-type)."""
    return tuple(name for name, c in registry.classes.items() if not switch(c))


def flat_settings(root) -> dict[str, FlatSetting]:
    """Every flat name of `root` (recipe.Recipe), in the order of its sections (read from the
    registries each time, so that a registered stage, grid or rounding brings its settings)."""
    table: dict[str, FlatSetting] = {}

    def add(name, owner, hint, default, help, choices=None, picks=False, terse=False):
        known = table.get(name)
        if known is None:
            table[name] = FlatSetting(name, hint, default, help, choices, [owner], picks, terse)
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
                add(name, (cls, f.name), hint, default, f.metadata.get("help", ""), f.metadata.get("choices"), picks,
                    f.metadata.get("terse", False))
            elif what == "section":
                walk(sub)
            elif what == "slot":
                default_kind = type(field_default(f))
                if selector(f, cls):
                    add(selector(f, cls), (cls, f.name), str, default_kind.kind_name, f.metadata.get("help", ""),
                        named_kinds(sub), picks=True, terse=f.metadata.get("terse", False))
                for kind in slot_kinds(f, cls, sub):
                    walk(kind)
            else:
                for stage in stage_classes():
                    if has_flag_switch(stage):
                        doc = (stage.__doc__ or "").strip().splitlines()[0] if stage.__doc__ else ""
                        add(stage.kind_name, (stage, None), bool, False, f"run the {stage.kind_name} stage: {doc}",
                            picks=True)
                    walk(stage)

    walk(root)
    return table


def refuse(ok: bool, message: str):
    if not ok:
        raise CrossblockError(f"invalid recipe: {message}")


def chosen_kind(f: dataclasses.Field, cls, registry, flat: dict) -> type:
    """The kind a slot holds: the one whose switch is on, else the one named (rounding, grid), else the default."""
    default_kind = type(field_default(f))
    switched = [k for k in registry.classes.values() if k is not default_kind and switch(k) and is_on(k, flat)]
    refuse(len(switched) <= 1, f"{' and '.join(switch(k)[0] for k in switched)} pick different {registry.what}s")
    named = flat[selector(f, cls)] if selector(f, cls) else None
    if switched:
        refuse(named in (None, default_kind.kind_name), f"{selector(f, cls)} {named} and {switch(switched[0])[0]} "
                                                        f"pick different {registry.what}s")
        return switched[0]
    return registry[named] if named is not None else default_kind


def layout(root, flat: dict) -> list[tuple[type, bool, str | None]]:
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
                    elif switch(kind):  # a kind with a switch (gguf): its settings need it on
                        why = off_reason(kind)
                    elif switch(chosen):  # the others' settings have none with a switch on
                        why = f"with {switch(chosen)[0]}"
                    else:
                        why = f"with {selector(f, cls)} {chosen.kind_name}"
                    walk(kind, kind is chosen, why)
            elif what == "stages":
                for stage in stage_classes():
                    walk(stage, is_on(stage, flat), None if stage.quantizes else off_reason(stage))

    walk(root, True, None)
    return out


def check_flat(root, flat: dict, table: dict[str, FlatSetting]):
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
    sections = layout(root, flat)
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
                value, choices = flat[names[needs.field]], table[names[needs.field]].choices
                if choices is not None and value not in choices:
                    continue  # not a value it can take: the section refuses that first, when built
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


def from_flat(root, settings: dict):
    """A `root` (recipe.Recipe) from flat settings, the others at their defaults (`Recipe.flat`)."""
    table = flat_settings(root)
    unknown = sorted(set(map(str, settings)) - set(table))
    if unknown:
        raise CrossblockError(f"unknown recipe setting(s): {', '.join(unknown)} (known: {', '.join(sorted(table))})")
    flat = {name: settings.get(name, s.default) for name, s in table.items()}
    check_flat(root, flat, table)
    recipe = build(root, flat)
    w = recipe.windows
    if w.train is not None and not w.trains(recipe.activations.static):
        w.train = None  # steps but nothing to learn (rtn, gptq with --iters): no training, as documented
    return recipe.validated()


def to_flat(root, recipe) -> dict:
    """The flat settings of a recipe of the flat spelling's shape; `from_flat` gives it back."""
    kinds_now = [s.kind_name for s in recipe.stages]
    stages = [("" if c.quantizes else "[") + c.kind_name + ("" if c.quantizes else "]") for c in stage_classes()]
    grid_field = next(f for f in dataclasses.fields(root) if f.name == "grid")
    grids = slot_kinds(grid_field, root, GRIDS)
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
                    # a kind picked by its own switch (gguf_type) is not named again
                    name = None if value is None else (type(field_default(f)).kind_name if switch(type(value))
                                                       else value.kind_name)
                    found.setdefault(selector(f, cls), []).append(
                        (f.metadata.get("off"), False) if value is None else (name, True))
                for kind in slot_kinds(f, cls, sub):
                    read(kind, value if type(value) is kind else None)
            else:
                for stage in stage_classes():
                    there = next((s for s in value if type(s) is stage), None) if value is not None else None
                    if has_flag_switch(stage):
                        found.setdefault(stage.kind_name, []).append((there is not None, True))
                    read(stage, there)

    read(root, recipe)
    flat = {}
    for name, values in found.items():
        there = [v for v, present in values if present]
        if any(v != there[0] for v in there):
            raise CrossblockError(f"recipe {recipe.name!r} has no flat form: its sections set {name} to different "
                                  f"values ({', '.join(map(repr, there))})")
        flat[name] = there[0] if there else values[0][0]
    table = flat_settings(root)
    return {name: v for name, v in flat.items() if not (table[name].terse and v == table[name].default)}
