import dataclasses
from pathlib import Path

import pytest

from crossblock.errors import CrossblockError
from crossblock.grids import UniformGrid
from crossblock.recipe import PRESETS, Recipe
from crossblock.roundings import AdaRound, LoraRound, Nearest, SignRound
from crossblock.stages import Cfp, Train, Windows

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


@pytest.mark.parametrize("name", PRESETS)
def test_yaml_files_mirror_the_presets(name):
    file = RECIPES / ("block-60x2-token.yaml" if name == "best" else f"{name}.yaml")
    assert dataclasses.replace(Recipe.from_yaml(file), name=name) == Recipe.preset(name)


def test_the_command_line_runs_the_best_recipe_by_default():
    """Without --recipe: `best`'s windows and then the default's finetune (recipe.DEFAULTS)."""
    from crossblock.cli import build_parser, recipe_from_args
    from crossblock.recipe import FT_STEPS
    args = build_parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o", "--wbits", "3"])
    best = Recipe.preset("best", wbits=3, finetune_steps=FT_STEPS, finetune_eval_every=FT_STEPS)
    assert recipe_from_args(args) == dataclasses.replace(best, name="best+finetune")
    assert recipe_from_args(args).windows.train.loss == "token-mse"


def test_best_recipe_file_is_block_with_token_mse_and_more_steps():
    r = Recipe.load(str(RECIPES / "block-60x2-token.yaml"), wbits=3, group_size=64)
    expected = Recipe.preset("block", wbits=3, group_size=64, loss="token-mse", iters=60, batch_size=2)
    assert r == dataclasses.replace(expected, name="block-60x2-token")


@pytest.mark.parametrize("path", sorted((RECIPES / "activations").glob("*.yaml")), ids=lambda p: p.stem)
def test_activation_recipes_are_the_cbq_preset_with_their_bits(path):
    wbits, abits = (int(c) for c in path.stem.split("-")[1][1:].split("a"))
    expected = Recipe.preset("cbq", wbits=wbits, abits=abits, cfp=True)
    assert Recipe.from_yaml(path) == dataclasses.replace(expected, name=path.stem)


def test_presets_are_sections_and_stages():
    r = Recipe.preset("cbq", wbits=2, group_size=64, cfp=True, cfp_alpha=0.5)
    assert r.grid == UniformGrid(bits=2, group_size=64)
    assert r.stages == [Cfp(alpha=0.5), Windows(window=2, stride=1, train=Train(
        iters=200, target="homologous", loss="mse+kl", rounding=LoraRound(rank=4)))]
    assert Recipe.preset("gptq").windows == Windows(init="gptq", act_order=True, train=None)
    assert Recipe.preset("block").windows.train.rounding == SignRound()


def test_sectioned_yaml_round_trip(tmp_path):
    r = Recipe.preset("cbq", wbits=2, group_size=64, lookahead=1, skip=["o_proj"], rounding="adaround",
                      round_reg=0.02)
    r.to_yaml(tmp_path / "r.yaml")
    assert "stages:" in (tmp_path / "r.yaml").read_text()
    assert Recipe.from_yaml(tmp_path / "r.yaml") == r
    assert r.windows.train.rounding == AdaRound(reg=0.02)


def test_flat_files_of_earlier_versions_still_load(tmp_path):
    """Every field of the old flat Recipe, as its to_yaml wrote them (recipes/ before the stages)."""
    from flat_spelling_cases import OLD_FLAT
    flat = {**OLD_FLAT, "name": "cbq", **PRESETS["cbq"], "wbits": 3, "group_size": 64}
    import yaml
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(flat, sort_keys=False))
    assert Recipe.from_yaml(tmp_path / "old.yaml") == Recipe.preset("cbq", wbits=3, group_size=64)


def test_yaml_may_start_from_a_preset_flat_or_sectioned(tmp_path):
    (tmp_path / "flat.yaml").write_text("preset: la\nlookahead: 3\nwbits: 2\n")
    r = Recipe.load(str(tmp_path / "flat.yaml"))
    assert (r.name, r.windows.lookahead, r.grid.bits, r.windows.train.rounding.kind_name) == ("la", 3, 2, "signround")
    (tmp_path / "sections.yaml").write_text("preset: la\ngrid: {bits: 2}\ndata: {nsamples: 64}\n")
    r = Recipe.load(str(tmp_path / "sections.yaml"))
    assert r == Recipe.preset("la", wbits=2, nsamples=64)


def test_flags_override_a_sectioned_recipe_and_a_pipeline_without_flat_form_says_so(tmp_path):
    (tmp_path / "r.yaml").write_text(Recipe.preset("block").to_yaml())
    assert Recipe.load(str(tmp_path / "r.yaml"), iters=7).windows.train.iters == 7
    two = dataclasses.replace(Recipe.preset("rtn"), stages=[Windows(), Windows(window=2)])
    with pytest.raises(CrossblockError, match="exactly one stage that quantizes"):
        two.validated()
    with pytest.raises(CrossblockError, match="has no flat form"):
        two.with_flat(wbits=3)


@pytest.mark.parametrize("field,value,message", [
    ("wbits", 1, "bits must be in 2..8"),
    ("wbits", 9, "bits must be in 2..8"),
    ("group_size", 0, "group_size must be -1"),
    ("group_size", -2, "group_size must be -1"),
    ("stride", 3, "stride must be in 1..window"),
    ("target", "nope", "target must be one of"),
    ("rounding", "stochastic", "rounding must be one of"),
    ("batch_size", 512, r"nsamples 128 is fewer than batch_size 512"),
    ("batch_size", 0, "batch_size must be >= 1"),
    ("nsamples", 2, r"nsamples 2 is fewer than batch_size 8 \(sequences per step\): set nsamples >= 8"),
])
def test_invalid_settings_are_refused_with_the_reason(field, value, message):
    with pytest.raises(CrossblockError, match=message):
        Recipe.preset("block", **{field: value})


@pytest.mark.parametrize("overrides,message", [
    (dict(lora_rank=8), "lora_rank has no effect with rounding signround"),
    (dict(round_reg=0.1), "round_reg has no effect with rounding signround"),
    (dict(kl_weight=0.5), "kl_weight has no effect with loss 'mse'"),
    (dict(damp=0.1), "damp has no effect without init gptq"),
    (dict(act_order=True), "act_order has no effect without init gptq"),
    (dict(init="imatrix", clip_search=True), r"clip_search has no effect with init imatrix \(it searches"),
    (dict(cfp_alpha=0.5), "cfp_alpha has no effect without cfp"),
    (dict(act_sym=True), "act_sym has no effect without abits < 16"),
])
def test_settings_that_would_do_nothing_are_refused(overrides, message):
    with pytest.raises(CrossblockError, match=message):
        Recipe.preset("block", **overrides)


def test_a_train_section_with_nothing_to_learn_is_refused():
    useless = dataclasses.replace(Recipe.preset("rtn"), stages=[Windows(train=Train(rounding=Nearest(), lwc=False))])
    with pytest.raises(CrossblockError, match="nothing to learn"):
        useless.validated()


@pytest.mark.parametrize("text,message", [
    ("skip: down_proj\n", "skip must be a list of strings"),
    ("preset: block\nlwc: 'no'\n", "lwc must be true or false"),
    ("preset: block\nlr: .inf\n", "lr must be a finite number"),
    ("preset: cbq\nkl_weight: .nan\n", "kl_weight must be a finite number"),
    ("preset: cbq\nround_reg: .nan\n", "round_reg must be a finite number"),
    ("preset: block\niters: '10'\n", "iters must be an integer"),
    ("preset: mb\nwindow: 2.5\n", "window must be an integer"),
    ("preset: [rtn]\n", "unknown preset"),
    ("grid: {bits: 3, colour: red}\nstages: [windows]\n", "unknown grid \\(uniform\\) setting.*colour"),
    ("stages: [windows, cfp]\n", "in the order rotate, cfp, bits, windows, finetune; got \\['windows', 'cfp'\\]"),
    ("stages: [cfp]\n", "exactly one stage that quantizes"),
    ("stages: [{windows: {train: {rounding: {type: lora, rank: 0}}}}]\n", "rank must be >= 1"),
    ("stages: [{windows: {train: {rounding: dice}}}]\n", "unknown rounding 'dice'"),
    ("stages: [rotate90]\n", "unknown stage 'rotate90'"),
    ("wbitz: 3\n", "unknown recipe setting.*wbitz"),
    ("data: {nsamples: 4}\nwbits: 3\n", "unknown recipe section.*wbits"),
])
def test_recipe_files_are_validated_strictly(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(CrossblockError, match=message):
        Recipe.from_yaml(tmp_path / "r.yaml")


def test_unknown_preset_and_unknown_override():
    with pytest.raises(CrossblockError, match="unknown recipe 'gptqq'"):
        Recipe.preset("gptqq")
    with pytest.raises(CrossblockError, match="unknown recipe setting.*bogus"):
        Recipe.preset("rtn", bogus=1)


def test_group_wider_than_a_layer_is_refused():
    with pytest.raises(CrossblockError, match="larger than the input width of down"):
        UniformGrid(group_size=256).check_widths({"up": 512, "down": 172})


def test_steps_without_learnable_parameters_do_not_train():
    train = lambda r: r.windows.trains(r.activations.static)  # noqa: E731
    assert Recipe.preset("rtn", iters=10).windows.train is None  # `compare --iters 10` applies to every recipe
    assert Recipe.preset("gptq", iters=10).windows.train is None
    assert train(Recipe.preset("rtn", iters=10, lwc=True))
    assert train(Recipe.preset("rtn", iters=10, abits=8, act_dynamic=False))
    assert train(Recipe.preset("block")) and Recipe.preset("block", iters=0).windows.train is None


def test_best_finetune_recipe_file_is_best_then_a_finetune_stage():
    r = Recipe.load(str(RECIPES / "best-finetune.yaml"), wbits=3, group_size=64)
    assert r == dataclasses.replace(Recipe.preset("best", wbits=3, group_size=64, finetune_steps=60), name="best-finetune")
    assert [s.kind_name for s in r.stages] == ["windows", "finetune"] and r.stages[1].steps == 60
