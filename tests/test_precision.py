"""--precision auto|bf16|fp32: fp32 is the float32 code of before to the bit, bf16 (autocast on
blocks and model; the quantizer's math float32) still beats RTN and finetunes, auto follows the
hardware, and the choice is recorded."""
import functools
import json

import pytest
import torch

import crossblock as cb
from crossblock import precision
from crossblock.cli import main
from crossblock.errors import CrossblockError
from crossblock.quant.linear import QuantLinear
from crossblock.recipe import Recipe
from crossblock.roundings import LoraRound
from crossblock.grids import UniformGrid
from conftest import CALIB_FILE, EVAL_FILE, STORIES, load_stories, weights_hash

SMALL = dict(nsamples=8, seqlen=64, batch_size=4)
W3 = dict(SMALL, wbits=3, group_size=-1)
TRAIN = dict(W3, iters=20)
G32 = dict(SMALL, wbits=3, group_size=32)


@functools.lru_cache(maxsize=None)
def run(preset: str, **overrides):
    """(eval perplexity, report, output hash) of a preset on stories260k, cached."""
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, cb.Recipe.preset(preset, **overrides), calib=CALIB_FILE.read_text(),
                                progress=False)
    return cb.evaluate(model, tok, EVAL_FILE.read_text(), seqlen=256, max_windows=16, progress=False), report, \
        weights_hash(model)


# fp32 reproduces the code before the setting to the bit: test_bit_identity runs every case with
# precision fp32 against the reference commit, in this environment.


@pytest.mark.slow
def test_fp32_and_bf16_differ_and_rtn_weights_do_not_depend_on_precision():
    assert run("block", **TRAIN, precision="fp32")[2] != run("block", **TRAIN, precision="bf16")[2]
    assert run("rtn", **W3, precision="fp32")[2] == run("rtn", **W3, precision="bf16")[2]


@pytest.mark.parametrize("preset", ["gptq", *(pytest.param(p, marks=pytest.mark.slow) for p in ["block", "la", "mb", "cbq"])])
def test_bf16_beats_rtn(preset):
    rtn_ppl = run("rtn", **W3, precision="bf16")[0]
    ppl, report, _ = run(preset, **(W3 if preset == "gptq" else TRAIN), precision="bf16")
    assert report["precision"] == {"asked": "bf16", "used": "bf16", "why": "asked for"}
    last = report["blocks"][-1]
    assert last["rel_mse"] < last["rtn"]["rel_mse"]  # the RTN chain of the same run, also bf16
    assert ppl < rtn_ppl, (preset, ppl, rtn_ppl)


@pytest.mark.slow
def test_finetune_lowers_held_out_kl_under_bf16():
    _, report, _ = run("block", **dict(TRAIN, wbits=2, group_size=32, nsamples=16, finetune_steps=20,
                                       finetune_lr=0.003), precision="bf16")
    ft = report["finetune"]
    assert ft["held_out_loss_after"] < 0.97 * ft["held_out_loss_before"] and ft["best_step"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_native_bf16_matmul(native, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: native)
    used = "bf16" if native else "fp32"
    assert precision.resolve("auto", "cpu")[0] == used
    assert precision.resolve("fp32", "cpu")[0] == "fp32" and precision.resolve("bf16", "cpu")[0] == "bf16"
    assert precision.resolve("auto", "cuda")[0] == "bf16"
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, cb.Recipe.preset("block", **dict(G32, iters=4)),
                                calib=CALIB_FILE.read_text(), progress=False)
    assert report["precision"]["asked"] == "auto" and report["precision"]["used"] == used
    assert weights_hash(model) == run("block", **dict(G32, iters=4), precision=used)[2]


@pytest.mark.slow
def test_the_cli_records_and_says_the_choice(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_bf16_matmul", lambda: False)
    args = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--recipe", "rtn", "--device", "cpu",
            "--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "-1"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert "crossblock: computing in fp32 (auto: no native bf16 matmul" in capsys.readouterr().err
    info = json.loads((tmp_path / "auto" / "crossblock.json").read_text())
    assert info["recipe"]["precision"] == "auto" and info["precision"]["used"] == "fp32"
    assert main([*args, "--out", str(tmp_path / "bf16"), "--precision", "bf16", "--quiet"]) == 0
    assert "computing in" not in capsys.readouterr().err  # --quiet
    info = json.loads((tmp_path / "bf16" / "crossblock.json").read_text())
    assert info["precision"] == {"asked": "bf16", "used": "bf16", "why": "asked for"}


def test_a_bad_precision_is_refused_with_one_line(tmp_path, capsys):
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(tmp_path / "out"),
                 "--recipe", "rtn", "--precision", "fp16", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "crossblock: error: invalid recipe: precision must be one of auto, bf16, fp32, got 'fp16'"
    assert not (tmp_path / "out").exists()
    with pytest.raises(CrossblockError, match="precision must be one of"):
        Recipe.preset("block", precision="half")


def test_precision_is_one_yaml_key_in_both_recipe_forms(tmp_path):
    sections = tmp_path / "s.yaml"
    sections.write_text("preset: block\nprecision: fp32\ndata: {nsamples: 8}\n")
    flat = tmp_path / "f.yaml"
    flat.write_text("preset: block\nprecision: bf16\n")
    assert Recipe.load(str(sections)).precision == "fp32" and Recipe.load(str(flat)).precision == "bf16"
    recipe = Recipe.preset("cbq", precision="bf16")
    assert Recipe.from_dict(recipe.to_dict()) == recipe and recipe.with_flat(iters=3).precision == "bf16"
    assert Recipe.preset("rtn").precision == "auto"


def test_the_weight_quantizer_stays_float32_under_autocast():
    """LoRA-Rounding's A·B and the grid decode run outside autocast: the layer under bf16 autocast
    is exactly the bf16 matmul of the float32-decoded weight."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32, bias=False)
    layer = QuantLinear(linear, UniformGrid(3, 32), LoraRound(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        layer.lora_b.normal_(0, 0.3)
    x = torch.randn(4, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    exact = torch.nn.functional.linear(x.bfloat16(), layer.quantized_weight().bfloat16())
    assert out.dtype == torch.bfloat16 and torch.equal(out, exact)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what a bf16 A·B would have given: not that
        rounded = layer.lora_a @ layer.lora_b
    assert not torch.equal(rounded.float(), layer.lora_a @ layer.lora_b)
