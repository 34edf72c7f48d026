"""The default recipe per bit width, and --recipe auto (auto.py), on stories260k."""
import json

import pytest
import torch

import crossblock as cb
from crossblock import auto
from crossblock.auto import AutoRecipe
from crossblock.cli import main
from crossblock.engine.plan import schedule_cost
from crossblock.errors import CrossblockError
from crossblock.recipe import DEFAULTS, FT_STEPS
from conftest import CALIB_FILE, EVAL_FILE, STORIES, load_stories

CALIB = dict(nsamples=32, seqlen=128)
SMALL = dict(wbits=2, group_size=32, nsamples=16, seqlen=64, batch_size=2, iters=6)  # auto: seconds per candidate


def ppl_of(recipe):
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, recipe, CALIB_FILE.read_text(), device="cpu", progress=False)
    return cb.evaluate(model, tok, EVAL_FILE.read_text(), seqlen=128, progress=False), report


def test_default_recipe_follows_the_bits_and_says_why():
    w3 = cb.Recipe.default(wbits=3, group_size=64)
    steps = dict(finetune_steps=FT_STEPS, finetune_eval_every=FT_STEPS)
    assert w3.name == "best+finetune"
    assert w3.to_dict() == {**cb.Recipe.preset("best", wbits=3, group_size=64, **steps).to_dict(), "name": "best+finetune"}
    assert w3.chosen_by["default_for"] == "W*A16" and "smollm2_w3g64_split" in w3.chosen_by["why"]
    w4a8 = cb.Recipe.default(wbits=4, abits=8, group_size=64)
    assert [s.kind_name for s in w4a8.stages] == ["rotate", "windows"] and w4a8.name == "best-rotate"
    assert w4a8.activations.bits == 8 and w4a8.chosen_by["default_for"] == "W*A8"
    w4a4 = cb.Recipe.default(wbits=4, abits=4)
    assert w4a4.chosen_by["default_for"] == "W*A*" and w4a4.name == "best-rotate" and w4a4.stage("rotate").online
    assert all("why" in entry and entry["preset"] in cb.PRESETS for entry in DEFAULTS.values())
    # a more specific entry wins (the lead adjusts the table: the mechanism must pick it up)
    DEFAULTS[(2, 16)] = dict(preset="gptq", why="test")
    try:
        assert cb.Recipe.default(wbits=2).name == "gptq" and cb.Recipe.default(wbits=3).name == "best+finetune"
    finally:
        del DEFAULTS[(2, 16)]


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3, 2])
def test_default_recipe_beats_rtn_and_gptq(bits):
    bits_only = dict(wbits=bits, group_size=-1)
    ours, report = ppl_of({**bits_only, **CALIB})  # a dict naming only bits (and data): the default
    assert report["recipe"]["name"] == "best+finetune" and report["recipe_chosen_by"]["preset"] == "best"
    assert report["finetune"]["held_out_loss_after"] < report["finetune"]["held_out_loss_before"]
    rtn = ppl_of(cb.Recipe.preset("rtn", **bits_only, **CALIB))[0]
    gptq = ppl_of(cb.Recipe.preset("gptq", **bits_only, **CALIB))[0]
    assert ours < 0.95 * min(rtn, gptq), (ours, rtn, gptq)


def direct_run(name, flat):
    """The chosen candidate run on its own: the shape applied to the same settings."""
    shape = {k: v for k, v in auto.SHAPES[name].items() if k != "loss"}
    if name == "cbq":
        shape["loss"] = "token-mse+kl"
    model, tok = load_stories()
    recipe = cb.Recipe.preset("best", **flat, **shape)
    return cb.quantize(model, tok, recipe, CALIB_FILE.read_text(), device="cpu", progress=False)


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.slow
@pytest.mark.parametrize("budget", [2.0, 0.3])  # full settings (prefix reused) / fewer steps and sequences
def test_auto_chooses_within_budget_and_equals_the_chosen_recipe(budget):
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, AutoRecipe.build(budget, **SMALL), CALIB_FILE.read_text(), device="cpu",
                                progress=False)
    info = report["auto"]
    rows = {r["recipe"]: r for r in info["candidates"]}
    assert list(rows) == list(auto.SHAPES) and all(r["rel_mse"] > 0 and r["block_passes"] > 0 for r in rows.values())
    assert info["chosen"] == min(rows, key=lambda n: rows[n]["rel_mse"]) == report["recipe"]["name"]
    # the budget, in plan counts: the candidates as measured, against the full run of the default shape
    full = schedule_cost(cb.Recipe.preset("best", **SMALL), 5)
    assert info["full_block_passes"] == full
    assert info["compare_block_passes"] == sum(r["block_passes"] for r in rows.values()) <= budget * full
    assert 2 <= info["prefix_blocks"] < 5
    if budget == 2.0:
        assert info["fidelity"] == {"divisor": 1, "nsamples": 16, "iters": 6}
        assert info["reused_windows"] == rows[info["chosen"]]["reusable_windows"] >= 1  # this model picks la
        assert report["resumed_at_window"] == info["reused_windows"] and info["reused_block_passes"] > 0
    else:
        assert info["fidelity"]["divisor"] > 1 and info["reused_windows"] == 0
    direct, direct_report = direct_run(info["chosen"], SMALL)
    assert_same_weights(model, direct)
    assert [b["rel_mse"] for b in report["blocks"]] == [b["rel_mse"] for b in direct_report["blocks"]]


@pytest.mark.slow
def test_auto_reuses_the_prefix_of_every_reusable_shape(monkeypatch):
    """Force each shape to win in turn: a reused prefix always continues to the same model."""
    shapes = dict(auto.SHAPES)
    for name in ("block", "mb"):
        monkeypatch.setattr(auto, "SHAPES", {name: shapes[name]})
        model, tok = load_stories()
        model, report = cb.quantize(model, tok, AutoRecipe.build(2.0, **SMALL), CALIB_FILE.read_text(),
                                    device="cpu", progress=False)
        assert report["auto"]["chosen"] == name and report["auto"]["reused_windows"] >= 1
        assert_same_weights(model, direct_run(name, SMALL)[0])


@pytest.mark.slow
def test_cli_auto_records_candidates_and_choice(tmp_path, capsys):
    out = tmp_path / "q"
    flat = [f"--{k.replace('_', '-')}={v}" for k, v in SMALL.items()]
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "auto", "--auto-budget", "0.5", *flat]) == 0
    text = capsys.readouterr().out
    info = json.loads((out / "crossblock.json").read_text())
    assert info["auto"]["chosen"] == info["recipe"]["name"] and f"chose {info['recipe']['name']}" in text
    assert info["auto"]["budget"] == 0.5 and len(info["auto"]["candidates"]) == len(auto.SHAPES)
    assert info["recipe_chosen_by"]["auto"] is True


def test_cli_default_recipe_is_recorded(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--wbits", "3", "--group-size", "-1", "--nsamples", "8", "--seqlen", "64", "--iters", "2"]) == 0
    info = json.loads((out / "crossblock.json").read_text())
    assert info["recipe"]["name"] == "best+finetune" and info["recipe_chosen_by"]["default_for"] == "W*A16"
    assert info["recipe_chosen_by"]["finetune_steps"] == FT_STEPS == info["recipe"]["stages"][1]["finetune"]["steps"]
    assert "the default for W*A16" in capsys.readouterr().out


def test_the_default_leaves_out_its_finetune_only_where_it_cannot_run():
    for kw, why in [(dict(gguf_type="Q4_K"), "the gguf grid's scales are quantized themselves"),
                    (dict(grid="nvfp4"), "the nvfp4 grid's scales are quantized themselves"),
                    (dict(wbits=3, nsamples=1, batch_size=1), "it needs 2 calibration sequences")]:
        recipe = cb.Recipe.default(**kw)
        assert recipe.stage("finetune") is None and recipe.name == "best", kw
        assert recipe.chosen_by["finetune_dropped"].startswith(why)
    off = cb.Recipe.default(wbits=3, finetune_steps=0)  # asked off: no finetune, nothing said to be dropped
    assert off.stage("finetune") is None and "finetune_dropped" not in off.chosen_by
    own = cb.Recipe.default(wbits=3, finetune_steps=7)  # the user's finetune: the stage's own defaults
    assert own.stage("finetune").steps == 7 and own.stage("finetune").eval_every == 20 and own.name == "best"
    with pytest.raises(CrossblockError, match="finetune trains a uniform grid's scales"):
        cb.Recipe.default(gguf_type="Q4_K", finetune_steps=5)  # asked for: refused, not dropped
    named = cb.Recipe.preset("best", finetune_steps=5)  # a recipe the user named keeps it
    assert named.without_default_finetune("--low-memory").stage("finetune") is not None
    assert own.without_default_finetune("--low-memory").stage("finetune").steps == 7  # and so does one asked for
    dropped = cb.Recipe.default(wbits=3).without_default_finetune("--low-memory")
    assert dropped.stage("finetune") is None and dropped.chosen_by["finetune_dropped"] == "--low-memory"


def test_the_default_leaves_out_its_rotation_for_microscaling_activations():
    """W4A4's default rotates integer activations; NVFP4 / MXFP4 activations keep their own group
    scales, which a whole-width rotation spreads outliers across (bench/results/fp4_smollm2.md)."""
    for act in ("nvfp4", "mxfp4"):
        recipe = cb.Recipe.default(4, 4, grid=act, act_type=act)
        assert recipe.stage("rotate") is None and recipe.name == "best", act
        assert recipe.chosen_by["rotate_dropped"].startswith(f"{act} activations")
    assert cb.Recipe.default(4, 4).stage("rotate") is not None  # integer W4A4: rotated
    assert cb.Recipe.default(4, 8, grid="nvfp4", act_type="fp8").stage("rotate") is not None  # not measured: kept
    own = cb.Recipe.default(4, 4, grid="nvfp4", act_type="nvfp4", rotate=True)  # asked for: kept, nothing dropped
    assert own.stage("rotate") is not None and "rotate_dropped" not in own.chosen_by


@pytest.mark.parametrize("extra, message", [
    (["--recipe", "auto", "--auto-budget", "0"], "--auto-budget must be > 0"),
    (["--recipe", "auto", "--auto-budget", "0.001"], "--auto-budget 0.001 is too small"),
    (["--recipe", "block", "--auto-budget", "0.1"], "--auto-budget applies to --recipe auto only"),
    (["--recipe", "auto", "--window", "2"], "--recipe auto chooses window itself"),
    (["--recipe", "auto", "--iters", "0"], "--recipe auto compares trained schedules"),
])
def test_auto_refuses_bad_input(extra, message, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--nsamples", "8", "--seqlen", "64", "--group-size", "-1", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


def test_compare_refuses_auto_as_a_candidate(capsys):
    assert main(["compare", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--recipe", "rtn,auto",
                 "--blocks", "2", "--nsamples", "8", "--seqlen", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "auto is itself a comparison" in err and "has 2 blocks" not in err and len(err.splitlines()) == 1


def test_too_small_budget_names_one_that_runs(tmp_path, capsys):
    """stories260k at the default budget: the refusal names the --auto-budget that fits (issue 26.6),
    and `plan` with it measures the comparison within it."""
    import re
    settings = ["--recipe", "auto", "--wbits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64",
                "--batch-size", "2"]
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 *settings]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--auto-budget 0.15 is too small" in err and not out.exists()
    enough = re.search(r"--auto-budget ([0-9.]+) runs it", err).group(1)
    assert main(["plan", "--model", str(STORIES), *settings, "--auto-budget", enough]) == 0
    planned = re.search(r"= ([0-9.]+)% of the full run", capsys.readouterr().out)
    assert float(planned.group(1)) <= 100 * float(enough)
