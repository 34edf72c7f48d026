import dataclasses
from pathlib import Path

import pytest

from crossblock.errors import CrossblockError
from crossblock.recipe import PRESETS, Recipe

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_files_mirror_the_presets(name):
    assert Recipe.from_yaml(RECIPES / f"{name}.yaml") == Recipe.preset(name)


def test_best_recipe_file_is_block_with_token_mse_and_more_steps():
    r = Recipe.load(str(RECIPES / "block-60x2-token.yaml"), wbits=3, group_size=64)
    expected = Recipe.preset("block", wbits=3, group_size=64, loss="token-mse", iters=60, batch_size=2)
    assert r == dataclasses.replace(expected, name="block-60x2-token")


def test_yaml_round_trip(tmp_path):
    r = Recipe.preset("cbq", wbits=2, group_size=64, lookahead=1, skip=["o_proj"])
    r.to_yaml(tmp_path / "r.yaml")
    assert Recipe.from_yaml(tmp_path / "r.yaml") == r


def test_yaml_may_start_from_a_preset(tmp_path):
    (tmp_path / "r.yaml").write_text("preset: la\nlookahead: 3\nwbits: 2\n")
    r = Recipe.load(str(tmp_path / "r.yaml"))
    assert (r.name, r.lookahead, r.wbits, r.rounding) == ("la", 3, 2, "signround")


@pytest.mark.parametrize("field,value,message", [
    ("wbits", 1, "wbits must be an integer in 2..8"),
    ("wbits", 9, "wbits must be an integer in 2..8"),
    ("group_size", 0, "group_size must be -1"),
    ("group_size", -2, "group_size must be -1"),
    ("stride", 3, "stride must be in 1..window"),
    ("target", "nope", "target must be one of"),
    ("rounding", "stochastic", "rounding must be one of"),
    ("batch_size", 512, "exceeds nsamples"),
])
def test_invalid_settings_are_refused_with_the_reason(field, value, message):
    with pytest.raises(CrossblockError, match=message):
        Recipe.preset("block", **{field: value})


def test_unknown_preset_and_unknown_yaml_field(tmp_path):
    with pytest.raises(CrossblockError, match="unknown recipe 'gptqq'"):
        Recipe.preset("gptqq")
    (tmp_path / "r.yaml").write_text("wbitz: 3\n")
    with pytest.raises(CrossblockError, match="unknown recipe field.*wbitz"):
        Recipe.from_yaml(tmp_path / "r.yaml")


def test_group_wider_than_a_layer_is_refused():
    with pytest.raises(CrossblockError, match="larger than the input width of down"):
        Recipe(group_size=256).check_model({"up": 512, "down": 172})


@pytest.mark.parametrize("path", sorted((RECIPES / "activations").glob("*.yaml")), ids=lambda p: p.stem)
def test_activation_recipes_load_as_the_cbq_preset_with_their_bits(path):
    wbits, abits = (int(c) for c in path.stem.split("-")[1][1:].split("a"))
    assert Recipe.from_yaml(path) == Recipe.preset("cbq", wbits=wbits, abits=abits, cfp=True)


def test_steps_without_learnable_parameters_do_not_train():
    assert not Recipe.preset("rtn", iters=10).trains  # `compare --iters 10` applies to every recipe
    assert not Recipe.preset("gptq", iters=10).trains
    assert Recipe.preset("rtn", iters=10, lwc=True).trains
    assert Recipe.preset("rtn", iters=10, abits=8, act_dynamic=False).trains
    assert Recipe.preset("block").trains and not Recipe.preset("block", iters=0).trains
