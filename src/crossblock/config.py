"""Typed settings and the registries that name them.

Every section of a recipe (data, grid, activations, each stage, each rounding) is a small
dataclass deriving from `Config`: its fields are checked against their annotations strictly (a
YAML `"no"` is not a bool, `2.5` is not an int, `inf` is not a learning rate), then by the
class's own `check()`. A field declared with `setting(...)` also carries its help text, the values
it may take (`choices`) and when it has an effect (`needs`): the checks, the command-line flags and
the flat spelling (recipe.py) all read them there, so each setting is declared once. A `Registry`
maps the names used in YAML and on the command line to those classes, so a new grid, rounding,
stage or format is one file and one `@REGISTRY.register("name")` line.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable

from .errors import CrossblockError


@dataclass(frozen=True)
class Needs:
    """When a setting has an effect: `field` of the same section passes `test`. Otherwise a setting
    changed from its default is refused, `why` saying why ({name}: the field as the user spells it,
    {value}: its value), e.g. "damp has no effect without init gptq"."""
    field: str
    test: Callable[[Any], bool]
    why: str


def setting(default=MISSING, help: str = "", *, factory=MISSING, choices=None, needs: Needs | None = None,
            flat: str | bool | None = None, off=MISSING, registry=None, terse: bool = False):
    """A field of a settings dataclass, with what the checks and the command line read:
    - help: the flag's help text; choices: the values it may take (None always passes where the
      type allows it); needs: when it has an effect (`Needs`);
    - flat: its name in the flat spelling (flags, flat YAML) when not the class's `flat_prefix` +
      the field's name; False: not in the flat spelling;
    - off: its flat value when its section is absent; a section's first such field is its switch
      (iters 0: no training; finetune steps 0: no finetune stage);
    - registry: the field holds one of a registry's configs (the rounding), chosen by name;
    - terse: left out of `to_dict` and the flat form while at its default, so that recipes written
      before the setting existed keep their exact sections and flat form (and fingerprints)."""
    metadata = {"help": help, "choices": choices, "needs": needs, "flat": flat, "registry": registry,
                "terse": terse}
    if off is not MISSING:
        metadata["off"] = off
    return dataclasses.field(default=default, default_factory=factory, metadata=metadata)


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not MISSING else f.default


def no_effect(names: list[str], why: str) -> str:
    return f"{', '.join(names)} {'has' if len(names) == 1 else 'have'} no effect {why}"


class Config:
    """Base of every settings dataclass. Subclasses add `check()` for ranges and relations."""

    def check(self):
        pass

    def refuse(self, ok: bool, message: str):
        if not ok:
            raise CrossblockError(f"invalid {self.section()}: {message}")

    @classmethod
    def section(cls) -> str:
        return getattr(cls, "label", None) or cls.__name__.lower()

    def validated(self):
        hints = hints_of(type(self))
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, Config):
                value.validated()
            elif isinstance(value, list) and value and all(isinstance(v, Config) for v in value):
                for v in value:
                    v.validated()
            elif not type_ok(value, hints[f.name]):
                raise CrossblockError(f"invalid {self.section()}: {f.name} must be {type_name(hints[f.name])}, "
                                      f"got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value is not None:
                self.refuse(value in choices, f"{f.name} must be one of {', '.join(choices)}, got {value!r}")
        self.check_needs()
        self.check()
        return self

    def changed(self, *names: str) -> list[str]:
        """Those of `names` (default: all fields) whose value is not the field's declared default."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        return [n for n in names or fields if getattr(self, n) != field_default(fields[n])]

    def check_needs(self):
        """Refuse settings changed from their default where they have no effect (`Needs`)."""
        for needs, names in needs_groups(type(self)).items():
            value = getattr(self, needs.field)
            changed = self.changed(*names)
            self.refuse(needs.test(value) or not changed,
                        no_effect(changed, needs.why.format(name=needs.field, value=value)))

    def to_dict(self) -> dict:
        return {f.name: to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)
                if not (f.metadata.get("terse") and getattr(self, f.name) == field_default(f))}

    @classmethod
    def from_dict(cls, data, where: str | None = None):
        """Strict: a mapping of this class's fields only (nested Configs stay for the caller)."""
        where = where or cls.section()
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise CrossblockError(f"{where} must be a mapping of settings, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(map(str, data)) - known)
        if unknown:
            raise CrossblockError(f"unknown {where} setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**data)


@functools.cache
def hints_of(cls) -> dict:
    """A settings class's resolved field types (cached: classes do not change)."""
    return typing.get_type_hints(cls)


def needs_groups(cls) -> dict[Needs, list[str]]:
    """A settings class's fields by the condition under which they have an effect."""
    groups: dict[Needs, list[str]] = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("needs") is not None:
            groups.setdefault(f.metadata["needs"], []).append(f.name)
    return groups


def to_plain(value):
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, list):
        return [to_plain(v) for v in value]
    return value


def type_ok(value, hint) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # an int is a float; nan and inf are never meant
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is str:
        return isinstance(value, str)
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(type_ok(v, item) for v in value)
    return isinstance(value, hint) if isinstance(hint, type) else True


LIST_ITEMS = {str: "strings", int: "integers", float: "numbers"}


def type_name(hint) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {LIST_ITEMS.get(typing.get_args(hint)[0], 'items')}"
    names = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


class Registry:
    """Names -> classes, filled by `@registry.register("name")` where each class is defined."""

    def __init__(self, what: str):
        self.what, self.classes = what, {}

    def register(self, name: str):
        def add(cls):
            cls.kind_name, cls.label = name, f"{name} {self.what}"
            self.classes[name] = cls
            return cls
        return add

    def __contains__(self, name) -> bool:
        return name in self.classes

    def __getitem__(self, name: str):
        if not isinstance(name, str) or name not in self.classes:
            raise CrossblockError(f"unknown {self.what} {name!r}; choose one of {', '.join(self.classes)}")
        return self.classes[name]

    def names(self) -> list[str]:
        return list(self.classes)

    def build(self, spec, where: str):
        """A config from YAML: a name (`signround`) or a mapping with `type` (`{type: lora, rank: 8}`)."""
        if isinstance(spec, Config):
            return spec
        if isinstance(spec, str):
            return self[spec]()
        if not isinstance(spec, dict) or "type" not in spec:
            raise CrossblockError(f"{where} must be a {self.what} name ({', '.join(self.classes)}) or a mapping "
                                  f"with a 'type', got {spec!r}")
        rest = {k: v for k, v in spec.items() if k != "type"}
        return self[spec["type"]].from_dict(rest, f"{where} ({spec['type']})")

    @staticmethod
    def spec(config: Config) -> dict:
        return {"type": config.kind_name, **config.to_dict()}
