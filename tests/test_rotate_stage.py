"""The rotate stage in the pipeline: flags and recipe files, W4A4 gains, and what each format
keeps of the run-time rotation (fake folds it into the weights, compressed-tensors writes it as
its transform config, gptq refuses it)."""
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import crossblock as cb
from crossblock.errors import CrossblockError
from conftest import CALIB_FILE, EVAL_FILE, load_stories

SMALL = dict(nsamples=16, seqlen=128, batch_size=4)


def quantized(**kw):
    model, tok = load_stories()
    fmt = kw.pop("format", "fake")
    model, report = cb.quantize(model, tok, cb.Recipe.preset("rtn", **SMALL, **kw), calib=CALIB_FILE.read_text(),
                                format=fmt, progress=False)
    return model, tok, report


def ppl(model, tok):
    return cb.evaluate(model, tok, EVAL_FILE.read_text(), seqlen=256, progress=False)


def logits(model, tok):
    ids = tok(EVAL_FILE.read_text()[:3000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.slow
def test_rotate_stage_runs_first_and_helps_w4a4():
    plain, tok, _ = quantized(wbits=4, abits=4, group_size=32)
    rotated, _, report = quantized(wbits=4, abits=4, group_size=32, rotate=True)
    assert report["rotate"]["family"] == "llama" and report["recipe"]["stages"][0] == {
        "rotate": {"kind": "hadamard", "seed": 0, "online": True}}
    assert ppl(rotated, tok) < ppl(plain, tok)


def test_fake_folder_folds_the_rotation_so_plain_transformers_loads_it(tmp_path):
    model, tok, report = quantized(wbits=4, group_size=32, rotate=True)
    cb.save(model, tok, tmp_path / "q", report=report)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(logits(theirs, tok), logits(model, tok), rtol=0, atol=2e-4)


def test_fake_folder_with_activations_reloads_with_its_rotation(tmp_path):
    model, tok, report = quantized(wbits=4, abits=8, group_size=32, rotate=True)
    cb.save(model, tok, tmp_path / "q", report=report)
    loaded = cb.load(tmp_path / "q")
    assert sum(hasattr(m, "crossblock_input_transform") for m in loaded.modules()) == 5
    torch.testing.assert_close(logits(loaded, tok), logits(model, tok), rtol=0, atol=2e-3)


@pytest.mark.slow
def test_gptq_format_refuses_the_online_rotation_before_quantizing(tmp_path):
    kw = dict(wbits=8, group_size=-1, sym=True)
    with pytest.raises(CrossblockError, match="cannot store rotate's run-time Hadamard"):
        quantized(rotate=True, format="gptq", **kw)
    rotated, tok, report = quantized(rotate=True, **kw)  # quantized for fake, then saved as gptq
    with pytest.raises(CrossblockError, match="cannot store rotate's run-time Hadamard"):
        cb.save(rotated, tok, tmp_path / "r", format="gptq", report=report)
    assert not (tmp_path / "r").exists()
    model, tok, report = quantized(rotate=True, rotate_online=False, format="gptq", **kw)
    assert not any(hasattr(m, "crossblock_input_transform") for m in model.modules())
    cb.save(model, tok, tmp_path / "q", format="gptq", report=report)
    torch.testing.assert_close(logits(cb.load(tmp_path / "q"), tok), logits(model, tok), rtol=0, atol=1e-5)


@pytest.mark.parametrize("abits", [16, 8])
def test_compressed_tensors_stores_the_online_rotation_as_its_transform_config(abits, tmp_path):
    import json
    from compressed_tensors.transform import TransformConfig, apply_transform_config
    from safetensors.torch import load_file
    from crossblock.export.loader import load as load_dense
    model, tok, report = quantized(wbits=4, abits=abits, group_size=-1, sym=True, rotate=True,
                                   format="compressed-tensors")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    ours = logits(model, tok)
    loaded = cb.load(tmp_path / "q")
    assert sum(hasattr(m, "crossblock_input_transform") for m in loaded.modules()) == 5
    torch.testing.assert_close(logits(loaded, tok), ours, rtol=0, atol=1e-4)
    if abits != 16:
        return
    # the library's own reading of the config: its transforms on the dense (rotated) weights,
    # with the stored matrices, compute the same model
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["transform_config"]
    theirs = load_dense(tmp_path / "q", dtype=torch.float32)
    assert not any(hasattr(m, "crossblock_input_transform") for m in theirs.modules())
    apply_transform_config(theirs, TransformConfig.model_validate(config))
    stored = {k: v for k, v in load_file(tmp_path / "q" / "model.safetensors").items() if "_input.weight" in k}
    n = 172  # stories' down_proj input: a random orthogonal base (no Hadamard of order 43), stored as sqrt(n) H
    assert len(stored) == 5 and all(torch.allclose(v @ v.T, n * torch.eye(n), atol=1e-3) for v in stored.values())
    missing, unexpected = theirs.load_state_dict(stored, strict=False)
    assert not unexpected
    torch.testing.assert_close(logits(theirs, tok), ours, rtol=0, atol=1e-4)


def test_compressed_tensors_transform_config_without_its_record_is_refused(tmp_path):
    import json
    model, tok, report = quantized(wbits=4, group_size=-1, sym=True, rotate=True, format="compressed-tensors")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    info = json.loads((tmp_path / "q" / "crossblock.json").read_text())
    del info["transforms"]
    (tmp_path / "q" / "crossblock.json").write_text(json.dumps(info))
    with pytest.raises(CrossblockError, match="transform_config.*does not record them"):
        cb.load(tmp_path / "q")


def test_rotate_comes_before_cfp_and_windows(tmp_path):
    (tmp_path / "r.yaml").write_text("stages: [cfp, rotate, windows]\n")
    with pytest.raises(CrossblockError, match="order rotate, cfp, bits, windows, finetune; got \\['cfp', 'rotate', 'windows'\\]"):
        cb.Recipe.from_yaml(tmp_path / "r.yaml")
    with pytest.raises(CrossblockError, match="rotate_kind has no effect without rotate"):
        cb.Recipe.preset("rtn", rotate_kind="random-orthogonal")


@pytest.mark.parametrize("seed", [2, 3])
def test_fake_folder_with_activations_reloads_bit_identical_whatever_the_rotation(tmp_path, seed):
    """W Hᵀ H is W only to an ulp and 8-bit activation rounding flips at ties on such ulps (these
    seeds gave 20-78% of logits off by > 2e-3): the folder carries W exactly for crossblock.load."""
    model, tok = load_stories()
    recipe = cb.Recipe.preset("rtn", **SMALL, wbits=4, abits=8, group_size=32, rotate=True, seed=seed)
    model, report = cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text(), progress=False)
    cb.save(model, tok, tmp_path / "q", report=report)
    assert (tmp_path / "q" / "crossblock_unfolded.safetensors").is_file()
    assert torch.equal(logits(cb.load(tmp_path / "q"), tok), logits(model, tok))
    # plain transformers reads model.safetensors only: W Hᵀ, the function without a hook
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    folded = load_file(tmp_path / "q" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(theirs.model.layers[0].mlp.down_proj.weight, folded)
    assert not torch.equal(folded, model.model.layers[0].mlp.down_proj.weight)


@pytest.mark.parametrize("online", [False, True])
def test_preprocess_rotate_writes_the_rotated_fp_model(tmp_path, capsys, online):
    """#26.12: the rotated FP model as a folder that plain transformers reads and that computes the
    same function; with the run-time rotation, crossblock.json records it."""
    from crossblock.cli import main
    from conftest import STORIES
    out = tmp_path / "rotated"
    assert main(["preprocess", "--model", str(STORIES), "--rotate", "--no-cfp", "--out", str(out), "--quiet",
                 *([] if online else ["--no-rotate-online"])]) == 0
    assert "rotated" in capsys.readouterr().out and not (out / "cfp.json").exists()
    fp, tok = load_stories()
    plain = AutoModelForCausalLM.from_pretrained(out)
    ref = logits(fp, tok)
    assert (logits(plain, tok) - ref).abs().max() <= 1e-4 * ref.abs().max()
    assert not torch.allclose(plain.model.layers[0].self_attn.q_proj.weight, fp.model.layers[0].self_attn.q_proj.weight)
    # the run-time rotation is recorded (its down_proj weights hold W Hᵀ, the same function)
    import json
    transforms = json.loads((out / "crossblock.json").read_text())["transforms"]
    assert bool(transforms) == online
    assert (logits(cb.load(out), tok) - ref).abs().max() <= 1e-4 * ref.abs().max()


@pytest.mark.parametrize("extra, message", [
    (["--no-cfp"], "nothing to do"),
    (["--calib", "builtin", "x.txt"], "--calib builtin beside files needs --calib-mix"),
])
def test_preprocess_refuses_nothing_to_do_and_a_bad_calibration(tmp_path, capsys, extra, message):
    from crossblock.cli import main
    from conftest import STORIES
    out = tmp_path / "pre"
    assert main(["preprocess", "--model", str(STORIES), "--out", str(out), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()
