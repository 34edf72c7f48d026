"""The flat spelling (flags, flat YAML keys) is derived from the sections' dataclasses: every old
flag and key keeps its meaning and default (checked against cddcf56's hand-written `Flat`, frozen in
flat_spelling_before.json by flat_spelling_cases.py), and a new field of a registered stage or
rounding is a flag with nothing else edited."""
import dataclasses
import json
from pathlib import Path

import pytest

import flat_spelling_cases as cases
from crossblock.cli import build_parser, recipe_from_args
from crossblock.config import Needs, setting
from crossblock.errors import CrossblockError
from crossblock.flat import flat_settings
from crossblock.recipe import PRESETS, Recipe
from crossblock.roundings import ROUNDINGS
from crossblock.roundings.signround import SignRound
from crossblock.stages import STAGES, Stage

BEFORE = json.loads((Path(__file__).parent / "flat_spelling_before.json").read_text())
NEW_KEYS = {"gguf_embeddings": None, "finetune_eval_every": 20,  # fields that had no flag before
            "bpw": None, "bits_options": ["2", "3", "4"], "pin": [], "bits_measure": "fisher", "bits_rows": 8,
            "bits_tie": "fused"}
# the only answers that changed: error messages, the recipe still refused
CHANGED_MESSAGES = {
    "invalid recipe: gguf_type (--gguf-type) must be one of": "invalid recipe: gguf_type must be one of",
    "invalid finetune stage: steps must be >= 1, got -1": "invalid recipe: finetune_steps must be >= 0, got -1",
    "init must be one of rtn, gptq, got": "init must be one of rtn, gptq, imatrix, got",  # imatrix: a third init
    "all_experts has no effect without init gptq": "all_experts has no effect without init gptq or imatrix",
}


# a preset's values changed on purpose since cddcf56 (recipe.py says why): its base and every recipe
# built on it carry them
CHANGED_PRESETS = {"preset:gptq": {"flat": {"act_order": True}, "sections": {"stages.windows.act_order": True}}}


def with_preset_changes(base: str, before: dict) -> dict:
    """A non-error answer of cddcf56 on `base` with CHANGED_PRESETS applied."""
    change = CHANGED_PRESETS.get(base)
    if change is None or "error" in before:
        return before
    return {part: {**before[part], **change[part]} for part in before}


def as_now(before: dict) -> dict:
    """An answer of cddcf56 as the code under test gives it (CHANGED_MESSAGES applied)."""
    if "error" in before:
        message = before["error"]
        for old, new in CHANGED_MESSAGES.items():
            message = message.replace(old, new)
        return {"error": message}
    return before


def answer(base: str, overrides: dict) -> dict:
    now = json.loads(json.dumps(cases.result(base, overrides)))
    if "flat" in now and "error" not in now["flat"]:
        assert {k: now["flat"].pop(k) for k in NEW_KEYS} == NEW_KEYS  # no old key sets them
    return now


@pytest.mark.parametrize("base", cases.BASES)
def test_old_flat_keys_give_the_recipes_they_gave(base):
    """Each old key (valid values and not) on each base, alone and with the setting that gives it an
    effect: the same sections, the same flat form, the same refusal; and the flat form gives the
    recipe back."""
    assert answer(base, {}) == with_preset_changes(base, BEFORE[f"base: {base}"])
    for case, (case_base, overrides) in cases.cases().items():
        if case_base != base or not overrides:
            continue
        now = answer(base, overrides)
        if "error" not in now:
            b = BEFORE[f"base: {base}"]
            recipe = cases.make(base, overrides)
            assert Recipe.flat(**recipe.to_flat()) == recipe, case
            now = {"sections": cases.diff(now["sections"], b["sections"]), "flat": cases.diff(now["flat"], b["flat"])}
        assert now == with_preset_changes(base, as_now(BEFORE[f"case: {case}"])), case


def test_old_flags_give_the_recipes_they_gave():
    assert sorted(set(BEFORE["quantize_flags"]) - set(cases.expected_flags())) == []
    assert sorted(set(cases.expected_flags()) - set(BEFORE["quantize_flags"])) == [
        "--act-type", "--bits-measure", "--bits-options", "--bits-rows", "--bits-tie", "--bpw", "--calib-mix",
        "--finetune-eval-every", "--gguf-embeddings", "--grid", "--pin"]
    for case, argv in cases.cli_cases().items():
        assert json.loads(json.dumps(cases.cli_diff(argv))) == as_now(BEFORE[f"cli: {case}"]), case


def test_old_flat_defaults_are_the_fields_defaults():
    table = flat_settings(Recipe)
    assert {k: table[k].default for k in cases.OLD_FLAT} == cases.OLD_FLAT
    assert {k: table[k].default for k in NEW_KEYS} == NEW_KEYS


def test_flag_help_comes_from_the_field():
    text = build_parser()._subparsers._group_actions[0].choices["quantize"].format_help()
    assert "GPTQ's dampening (default 0.01)" in " ".join(text.split())
    assert "(one of rtn, gptq, imatrix; default rtn)" in " ".join(text.split())


def test_every_flag_is_in_the_command_line_doc():
    doc = (Path(__file__).parents[1] / "docs" / "cli.md").read_text()
    flags = [f"`--{name.replace('_', '-')}`" for name in flat_settings(Recipe) if name != "name"]
    assert [flag for flag in flags if flag not in doc] == []


# -- a new setting is one field --------------------------------------------------------------------
@dataclasses.dataclass
class ToyRound(SignRound):
    """A rounding with a setting of its own."""
    strength: float = setting(0.5, "how hard the toy pushes")


@dataclasses.dataclass
class ToyStage(Stage):
    """A stage that runs after the windows."""
    order = 35
    passes: int = setting(1, "times the toy runs")
    gain: float = setting(1.0, "what each extra pass adds",
                          needs=Needs("passes", lambda p: p > 1, "without {name} > 1"))

    def check(self):
        self.refuse(self.passes >= 1, f"passes must be >= 1, got {self.passes}")


@pytest.fixture
def toys():
    ROUNDINGS.register("toy")(ToyRound)
    STAGES.register("toy")(ToyStage)
    try:
        yield
    finally:
        del ROUNDINGS.classes["toy"], STAGES.classes["toy"]


def quantize_args(*flags):
    return build_parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o", *flags])


def test_a_registered_rounding_and_stage_bring_their_flags(toys):
    r = recipe_from_args(quantize_args("--recipe", "block", "--rounding", "toy", "--toy-strength", "2"))
    assert r.windows.train.rounding == ToyRound(strength=2.0)
    r = recipe_from_args(quantize_args("--recipe", "block", "--toy", "--toy-passes", "3", "--toy-gain", "0.5"))
    assert [s.kind_name for s in r.stages] == ["windows", "toy"] and r.stages[1] == ToyStage(passes=3, gain=0.5)
    assert Recipe.flat(**r.to_flat()) == r and r.to_flat()["toy_passes"] == 3
    assert Recipe.from_dict(r.to_dict()) == r  # and its sections
    with pytest.raises(CrossblockError, match="toy_strength has no effect with rounding signround"):
        Recipe.preset("block", toy_strength=2.0)
    with pytest.raises(CrossblockError, match="toy_passes has no effect without toy"):
        Recipe.preset("block", toy_passes=2)
    with pytest.raises(CrossblockError, match="toy_gain has no effect without toy_passes > 1"):
        Recipe.preset("block", toy=True, toy_gain=2.0)
    with pytest.raises(CrossblockError, match="invalid toy stage: passes must be >= 1, got 0"):
        Recipe.preset("block", toy=True, toy_passes=0)


def test_the_toys_leave_no_trace():
    assert "toy" not in ROUNDINGS and "toy" not in STAGES and "toy_strength" not in flat_settings(Recipe)
    with pytest.raises(SystemExit):
        quantize_args("--toy-strength", "2")


def test_no_effect_is_judged_against_the_field_default():
    """Windows declares when damp, act_order and all_experts matter (init gptq): a value equal to the
    field's default passes, any other is refused, in the sections as in the flat spelling."""
    from crossblock.stages import Windows
    assert Windows(damp=Windows.damp).validated() == Windows()
    with pytest.raises(CrossblockError, match="invalid windows stage: damp, act_order have no effect without "
                                              "init gptq"):
        Windows(damp=0.02, act_order=True).validated()
    with pytest.raises(CrossblockError, match="invalid activations: sym has no effect without bits < 16"):
        Recipe.from_dict({"activations": {"sym": True}, "stages": ["windows"]})
    assert Recipe.preset("gptq", damp=0.02).windows.damp == 0.02 and PRESETS["gptq"]["init"] == "gptq"
