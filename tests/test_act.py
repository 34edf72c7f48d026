"""Activation quantizers: grids, straight-through gradients, static calibration and training
inside the window engine, the restored model, and what the exports record."""
import json

import pytest
import torch

import crossblock as cb
from crossblock.errors import CrossblockError
from crossblock.quant.act import DynamicActQuant, StaticActQuant, observing
from conftest import CALIB_FILE, load_stories

FAST = dict(nsamples=8, seqlen=64, batch_size=4, group_size=-1)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [False, True])
def test_dynamic_per_token_grid(bits, sym):
    x = torch.randn(3, 5, 64) * torch.linspace(0.1, 10, 5).view(1, 5, 1)  # tokens of very different scale
    x.requires_grad_(True)
    y = DynamicActQuant(bits, sym)(x)
    for row, qrow in zip(x.detach().reshape(-1, 64), y.detach().reshape(-1, 64)):
        lo, hi = min(row.min(), 0), max(row.max(), 0)
        step = 2 * max(hi, -lo) / (2 ** bits - 1) if sym else (hi - lo) / (2 ** bits - 1)
        assert qrow.unique().numel() <= 2 ** bits
        assert (qrow - row).abs().max() <= step * 0.5001 + (step if sym else 0)  # sym clips the top level
        torch.testing.assert_close(torch.round(qrow / step), qrow / step, atol=1e-3, rtol=0)  # on the grid
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # straight-through


def test_static_step_is_calibrated_learned_and_frozen():
    q = StaticActQuant(8, sym=False)
    x = torch.randn(4, 10, 32) * 3
    with observing([q]):
        assert torch.equal(q(x), x)  # observing passes inputs through
    assert torch.allclose(q.step0, (x.max() - x.min()) / 255)
    y = q(x)
    assert y.unique().numel() <= 256 and (y - x).abs().max() <= q.step0 * 0.5001
    with torch.no_grad():
        q.log_mult.fill_(-1.0)  # a step too small: most of the range clips
    y = q(x)
    (y - x).pow(2).mean().backward()
    assert q.log_mult.grad < 0  # so the step wants to grow
    q.freeze()
    assert q.log_mult is None and not list(q.parameters())
    assert torch.equal(q(x), y)


def quantize(checkpoint_dir=None, **kw):
    model, tok = load_stories()
    recipe = cb.Recipe.preset(kw.pop("preset", "rtn"), **FAST, **kw)
    return cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text(), progress=False, checkpoint_dir=checkpoint_dir)


@pytest.mark.slow
def test_static_steps_train_with_the_weights_and_restored_layers_keep_quantizing():
    keys = set(load_stories()[0].state_dict())
    model, report = quantize(preset="block", wbits=4, abits=6, act_dynamic=False, iters=10)
    layers = [m for m in model.modules() if hasattr(m, "crossblock_qweight")]
    assert len(layers) == 35 and all(isinstance(m.crossblock_act_quant, StaticActQuant) for m in layers)
    assert any(m.crossblock_act_quant.step0 != m.crossblock_act_quant.step0.round() for m in layers)
    assert all(w["loss_after"] < w["loss_before"] for w in report["windows"])
    assert set(model.state_dict()) == keys  # nothing of the quantizers leaks into checkpoints
    # the restored model still quantizes inputs: its Linear layers' outputs are those of quantized inputs
    m = layers[0]
    x = torch.randn(2, 7, m.in_features)
    with torch.no_grad():
        torch.testing.assert_close(m(x), torch.nn.functional.linear(m.crossblock_act_quant(x), m.weight, m.bias))
        assert not torch.allclose(m(x), torch.nn.functional.linear(x, m.weight, m.bias))


@pytest.mark.slow
def test_w4a4_is_worse_than_w4a8_which_is_close_to_w4():
    ids = load_stories()[1](CALIB_FILE.read_text()[:4000], return_tensors="pt").input_ids[:, :256]

    def nll(**kw):
        model, _ = quantize(wbits=4, **kw)
        with torch.no_grad():
            return model(ids, labels=ids).loss.item()
    w4, w4a8, w4a4 = nll(), nll(abits=8), nll(abits=4)
    assert abs(w4a8 - w4) < 0.01 < w4a4 - w4


def test_recipe_refuses_activation_bits_outside_4_to_8():
    for abits in (3, 9, 12):
        with pytest.raises(CrossblockError, match="bits must be in 4..8, or 16"):
            cb.Recipe.preset("rtn", abits=abits)
    assert cb.Recipe.preset("rtn").activations.bits == 16


@pytest.mark.slow
def test_compressed_tensors_records_dynamic_activations(tmp_path):
    """transformers simulates the recorded per-token activations exactly as crossblock does."""
    from transformers import AutoModelForCausalLM
    model, report = quantize(wbits=8, sym=True, abits=8, act_sym=True)
    tok = load_stories()[1]
    cb.save(model, tok, tmp_path / "ct", format="compressed-tensors", report=report)
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["dynamic"], acts["strategy"], acts["symmetric"]) == (8, True, "token", True)
    ids = tok(CALIB_FILE.read_text()[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)(ids).logits
        torch.testing.assert_close(theirs, model(ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("fmt,kw,message", [
    ("compressed-tensors", dict(abits=8, act_dynamic=False), "only dynamic activation quantization"),
    ("gptq", dict(abits=8), "gptq export cannot record activation quantization"),
])
def test_exports_that_cannot_record_the_activations_refuse_before_quantizing(fmt, kw, message):
    model, _ = load_stories()
    with pytest.raises(CrossblockError, match=message):
        cb.api.for_format(cb.Recipe.preset("rtn", wbits=8, **FAST, **kw), model, fmt)


@pytest.mark.slow
def test_static_steps_survive_an_interrupted_run(tmp_path, monkeypatch):
    """Checkpoints carry calibrated and half-trained steps (cbq: block 2 is mid-window at the stop)."""
    import crossblock.api as api
    kw = dict(preset="cbq", wbits=4, abits=6, act_dynamic=False, iters=5)

    def steps(model):
        return torch.stack([m.crossblock_act_quant.step0 for m in model.modules() if hasattr(m, "crossblock_act_quant")])
    ref = steps(quantize(**kw)[0])

    write = api.write_checkpoint

    def write_then_stop(folder, state, key, *on_disk):
        write(folder, state, key, *on_disk)
        if state.next_window == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(api, "write_checkpoint", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        quantize(**kw, checkpoint_dir=tmp_path)
    monkeypatch.undo()
    model, report = quantize(**kw, checkpoint_dir=tmp_path)
    assert report["resumed_at_window"] == 2
    assert torch.equal(steps(model), ref)


@pytest.mark.parametrize("fmt,kw", [
    ("fake", dict(abits=4)),
    ("fake", dict(abits=6, act_dynamic=False, preset="block", iters=3)),
    ("compressed-tensors", dict(abits=8, act_sym=True)),
])
def test_a_saved_folder_loads_back_quantizing_its_activations(tmp_path, fmt, kw):
    """`crossblock eval` must measure the WxAy model, not its weights with FP activations."""
    model, report = quantize(wbits=4, **kw)
    tok = load_stories()[1]
    cb.save(model, tok, tmp_path / "out", format=fmt, report=report)
    loaded = cb.load(tmp_path / "out", dtype="float32")
    layers = [n for n, m in loaded.named_modules() if hasattr(m, "crossblock_act_quant")]
    assert len(layers) == 35
    ids = tok(CALIB_FILE.read_text()[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ours = model(ids).logits
        torch.testing.assert_close(loaded(ids).logits, ours, rtol=0, atol=1e-5)
        for _, m in loaded.named_modules():  # without the quantizers the output differs
            m._forward_pre_hooks.clear()
        assert not torch.allclose(loaded(ids).logits, ours, rtol=0, atol=1e-3)


def test_a_weight_only_folder_records_no_activation_quantizers(tmp_path):
    model, report = quantize(wbits=4)
    cb.save(model, load_stories()[1], tmp_path / "out", report=report)
    assert json.loads((tmp_path / "out" / "crossblock.json").read_text())["activations"] is None
    assert not any(hasattr(m, "crossblock_act_quant") for m in cb.load(tmp_path / "out").modules())
