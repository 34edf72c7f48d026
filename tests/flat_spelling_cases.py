"""The flat spelling's cases: every flag / flat YAML key of recipe.Flat (removed after cddcf56), on
every preset, default and recipe file, alone and with the setting that gives it an effect.

Imported by test_flat_spelling.py (the code under test) and run as a script against cddcf56's
source, the last with the hand-written `Flat`, to write the expected results
(`PYTHONPATH=REF/src python tests/flat_spelling_cases.py --out tests/flat_spelling_before.json`).
Each result is the recipe's sections (`to_dict`) and flat form (`to_flat`), as the paths that
differ from its base's (the base without overrides), or the error message.
"""
from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the old Flat's keys (cddcf56), each with values to try (valid and not)
VALUES = {
    "name": ["x"],
    "wbits": [3, 2, 8, 1, "3"], "group_size": [64, -1, 0], "sym": [True, False], "scale_dtype": ["float16", "bogus"],
    "gguf_type": ["Q4_K_M", "Q3_K", "Q9", ""], "gguf_output": ["Q8_0"],
    "abits": [8, 4, 3], "act_dynamic": [False], "act_sym": [True],
    "rotate": [True, False, "yes"], "rotate_kind": ["random-orthogonal"], "rotate_online": [False],
    "cfp": [True], "cfp_alpha": [0.5, 2.0], "cfp_weights": [True],
    "window": [2, 3, 0, 2.5], "stride": [2], "lookahead": [1, -1], "target": ["homologous", "nope"],
    "loss": ["mse+kl", "token-mse", "bad"], "kl_weight": [0.5, -1.0, float("nan")], "init": ["gptq", "x"],
    "rounding": ["rtn", "signround", "adaround", "lora", "weights", "dice"], "lwc": [False, True, "no"],
    "clip_search": [True], "lora_rank": [8, 0], "round_reg": [0.1, -1.0], "ste": [False],
    "iters": [0, 10, -1, "10"], "batch_size": [2, 0, 512], "lr": [1e-3, -1.0, float("inf")],
    "damp": [0.1, 2.0], "act_order": [True], "all_experts": [False],
    "finetune_steps": [5, -1], "finetune_lr": [1e-3], "finetune_batch_size": [4], "finetune_loss": ["ce", "x"],
    "finetune_zeros": [True], "finetune_norms": [True], "finetune_holdout": [0.25, 1.5],
    "nsamples": [64, 2], "seqlen": [256, 1], "seed": [3], "skip": [["o_proj"], "down_proj"],
    "precision": ["bf16", "fp64"],
}
# the old Flat's defaults: every key a flat recipe file of an earlier version holds (its to_yaml wrote them all)
OLD_FLAT = {
    "name": "custom", "wbits": 4, "group_size": 128, "sym": False, "scale_dtype": None, "gguf_type": None,
    "gguf_output": None, "abits": 16, "act_dynamic": True, "act_sym": False, "rotate": False, "rotate_kind": "hadamard",
    "rotate_online": True, "cfp": False, "cfp_alpha": 0.7, "cfp_weights": False, "window": 1, "stride": 1,
    "lookahead": 0, "target": "propagated", "loss": "mse", "kl_weight": 1.0, "init": "rtn", "rounding": "signround",
    "lwc": True, "clip_search": False, "lora_rank": 4, "round_reg": 0.01, "ste": True, "iters": 0, "batch_size": 8,
    "lr": None, "damp": 0.01, "act_order": False, "all_experts": True, "finetune_steps": 0, "finetune_lr": 0.002,
    "finetune_batch_size": 2, "finetune_loss": "kl", "finetune_zeros": False, "finetune_norms": False,
    "finetune_holdout": 0.125, "nsamples": 128, "seqlen": 512, "seed": 0, "skip": [], "precision": "auto",
}
# settings that give others an effect, with those others
PAIRS = [
    (dict(rotate=True), dict(rotate_kind="random-orthogonal", rotate_online=False, seed=3, abits=8)),
    (dict(cfp=True), dict(cfp_alpha=0.5, cfp_weights=True)),
    (dict(finetune_steps=5), dict(finetune_lr=1e-3, finetune_batch_size=4, finetune_loss="ce", finetune_zeros=True,
                                  finetune_norms=True, finetune_holdout=0.25, sym=True)),
    (dict(rounding="lora"), dict(lora_rank=8, round_reg=0.1, ste=False, iters=0, iters_=10)),
    (dict(rounding="adaround"), dict(round_reg=0.1, ste=False, lora_rank=8)),
    (dict(init="gptq"), dict(damp=0.1, act_order=True, all_experts=False)),
    (dict(abits=8), dict(act_dynamic=False, act_sym=True)),
    (dict(abits=4, act_dynamic=False), dict(rounding="rtn", lwc=False, iters=5, act_sym=True)),
    (dict(gguf_type="Q4_K_M"), dict(gguf_output="Q8_0", wbits=3, group_size=64, sym=True, scale_dtype="float16",
                                    rounding="lora", init="gptq")),
    (dict(loss="mse+kl"), dict(kl_weight=0.5)),
    (dict(iters=10), dict(rounding="rtn", lwc=False, kl_weight=0.5, target="nope", lr=-1.0)),
    (dict(iters=10, rounding="rtn", lwc=False), dict(lr=1e-3, loss="bad", abits=8)),
    (dict(window=2), dict(stride=2, lookahead=1)),
    (dict(nsamples=4), dict(batch_size=2, finetune_steps=3)),
]
BASES = ["flat", *(f"preset:{p}" for p in ("rtn", "gptq", "block", "cbq", "best")), "default:4:8", "default:2:16:-1",
         "yaml:rtn.yaml", "yaml:best-finetune.yaml", "yaml:activations/cbq-w4a8.yaml",
         "file:cbq", "file:rtn", "file:best"]
PAIR_BASES = ["flat", "preset:rtn", "preset:block", "preset:cbq", "default:4:8", "yaml:best-finetune.yaml"]


def cases() -> dict[str, tuple[str, dict]]:
    """case id -> (base, flat overrides)"""
    out = {}
    for base in BASES:
        out[f"{base} |"] = (base, {})
        for key, values in VALUES.items():
            for v in values:
                out[f"{base} | {key}={v!r}"] = (base, {key: v})
    for base in PAIR_BASES:
        for on, others in PAIRS:
            out[f"{base} | {on}"] = (base, dict(on))
            for key, v in others.items():
                out[f"{base} | {on} + {key}={v!r}"] = (base, {**on, key.rstrip("_"): v})
    return out


def make(base: str, overrides: dict):
    from crossblock.recipe import Recipe
    kind, _, arg = base.partition(":")
    if kind == "flat":
        return Recipe.flat(**overrides)
    if kind == "preset":
        return Recipe.preset(arg, **overrides)
    if kind == "file":  # an old flat file: every key, the preset's values over the defaults
        from crossblock.recipe import PRESETS
        return Recipe.from_dict({**OLD_FLAT, **PRESETS[arg], "name": arg, **overrides})
    if kind == "default":
        w, a, *g = (int(x) for x in arg.split(":"))
        # the weights-only default gained a finetune (bench/results/smollm2_w3g64_split.md): the spellings
        # are compared on what it had before, its windows
        return Recipe.default(w, a, *g, **overrides).without_default_finetune("spelling cases")
    return Recipe.load(str(ROOT / "recipes" / arg), **overrides)


def paths(value, prefix="") -> dict:
    """A nested dict / list as {path: leaf}; lists of scalars stay leaves, stages go by name (and
    their order as a leaf)."""
    out = {}
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and value and all(isinstance(v, dict) and len(v) == 1 for v in value):
        items = [next(iter(v.items())) for v in value]
        out[f"{prefix}.order"] = [k for k, _ in items]
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    for k, v in items:
        out.update(paths(v, f"{prefix}.{k}" if prefix else str(k)))
    return out or {prefix: value}


def result(base: str, overrides: dict):
    """{"sections": {...}, "flat": {...}} of the recipe, or {"error": message}; flat is None when the
    recipe has no flat form (its message then)."""
    from crossblock.errors import CrossblockError
    try:
        r = make(base, overrides)
    except CrossblockError as e:
        return {"error": str(e)}
    except TypeError as e:  # e.g. preset(name, name=...), default(wbits, wbits=...): the API's own arguments
        return {"error": f"TypeError: {e}"}
    try:
        flat = r.to_flat()
    except CrossblockError as e:
        flat = {"error": str(e)}
    return {"sections": paths(r.to_dict()), "flat": flat}


def diff(new: dict, old: dict) -> dict:
    """The entries of `new` that differ from `old`'s, and `old`'s that `new` lacks (as "<absent>")."""
    out = {k: v for k, v in new.items() if k not in old or old[k] != v or type(old[k]) is not type(v)}
    out.update({k: "<absent>" for k in old if k not in new})
    return out


def expected_form(all_cases: dict) -> dict:
    bases = {b: result(b, {}) for b in BASES}
    out = {"bases": bases, "cases": {}}
    for case, (base, overrides) in all_cases.items():
        if not overrides:
            continue
        r = result(base, overrides)
        if "error" not in r:
            b = bases[base]
            r = {"sections": diff(r["sections"], b["sections"]), "flat": diff(r["flat"], b["flat"])}
        out["cases"][case] = r
    return out


# the command line: each old flag on the default recipe and on --recipe block
def cli_cases() -> dict[str, list[str]]:
    out = {}
    for key, values in VALUES.items():
        if key == "name":
            continue
        flag = "--" + key.replace("_", "-")
        for v in values:
            if isinstance(v, bool):
                argv = [flag if v else "--no-" + flag[2:]]
            elif isinstance(v, list):
                argv = [flag, ",".join(v)]
            else:
                argv = [flag, str(v)]
            for recipe in ([], ["--recipe", "block"]):
                out[" ".join(recipe + argv)] = recipe + argv
    return out


@functools.cache
def parser():
    from crossblock.cli import build_parser
    return build_parser()


def cli_result(argv: list[str]):
    from crossblock.cli import recipe_from_args
    from crossblock.errors import CrossblockError
    try:
        args = parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o", *argv])
    except SystemExit as e:
        return {"argparse_exit": e.code}
    try:
        # the default's finetune left out, as in make(): the spellings are compared on its windows
        return {"sections": paths(recipe_from_args(args).without_default_finetune("spelling cases").to_dict())}
    except CrossblockError as e:
        return {"error": str(e)}


def cli_diff(argv: list[str]):
    """cli_result as the paths that differ from the same --recipe's without the flag."""
    base = cli_result(argv[:2] if argv[0] == "--recipe" else [])
    r = cli_result(argv)
    return {"sections": diff(r["sections"], base["sections"])} if "sections" in r else r


def expected_flags() -> list[str]:
    """Every option string of `crossblock quantize`."""
    from crossblock.cli import build_parser
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    return sorted(s for a in quantize._actions for s in a.option_strings)


def expected_lines() -> dict:
    """What the file holds: the bases ("base: ..."), the quantize flags, then one entry per case
    ("case: ...", "cli: ...")."""
    expected = expected_form(cases())
    return {**{f"base: {k}": v for k, v in expected["bases"].items()},
            "quantize_flags": expected_flags(),
            **{f"case: {k}": v for k, v in expected["cases"].items()},
            **{f"cli: {k}": cli_diff(argv) for k, argv in cli_cases().items()}}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    # one line per entry: a diff of the file shows the cases that changed
    lines = [f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in expected_lines().items()]
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")


if __name__ == "__main__":
    main()
