"""CBQ's coarse-to-fine preprocessing: the outlier detector on synthetic data, exact folding on
every supported architecture, refusals, truncation, the report and the CLI command."""
import json

import pytest
import torch
import transformers as T

import crossblock as cb
from crossblock.api import calibration_ids
from crossblock.recipe import Data
from crossblock.cli import main
from crossblock.errors import CrossblockError
from crossblock.model.adapter import find_blocks
from crossblock.preprocess import cfp
from crossblock.model.architectures import architecture
from crossblock.preprocess.fold import consumer_channels
from crossblock.preprocess.outliers import find_outliers
from conftest import CALIB_FILE, STORIES, load_stories
from test_adapter import FAMILIES, tiny

DATA = Data(nsamples=16, seqlen=64, batch_size=4)
SCALE_ONLY = dict(batch_size=4)  # channel scaling only (weights=False)


def gaussian(seed, n=10_000):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def test_planted_outliers_are_found_exactly():
    x = gaussian(0).abs()
    x[[5, 500, 5000]] = torch.tensor([9.0, 11.0, 14.0])
    found = find_outliers(x)
    assert found.count == 3 and found.threshold == x[x < 9].max().item()
    maxima = 2 + 0.3 * gaussian(1, 4096).abs()   # per-channel maxima of a 4096-wide layer...
    maxima[[17, 99, 2048, 4000]] *= torch.tensor([10.0, 12.0, 15.0, 20.0])  # ...four outlier channels
    assert find_outliers(maxima).count == 4


def test_gaussian_samples_have_at_most_one_outlier_and_rarely_any():
    """The bound: over 50 samples of 10 000 standard normal values, no sample has more than one
    outlier, and at most 10 of 50 have one, on the values and on their magnitudes (measured:
    3/200 and 18/200 samples with one; Tukey's fence alone flags ~35 values per sample)."""
    for values in (lambda s: gaussian(s), lambda s: gaussian(s).abs()):
        counts = [find_outliers(values(seed)).count for seed in range(50)]
        assert max(counts) <= 1 and sum(counts) <= 10


def test_constant_and_tiny_inputs_have_no_outliers():
    assert find_outliers(torch.ones(1000)).count == 0
    assert find_outliers(torch.tensor([1.0, 50.0])).count == 0


def plant_outlier_channels(model):
    """Random norm weights (and biases) with two channels 40x larger, and two 40x output rows in
    up_proj / fc1: tiny random models have no outlier channels of their own, and unit norm
    weights would hide folding mistakes."""
    g = torch.Generator().manual_seed(2)
    for block in find_blocks(model)[1]:
        for norm, _ in architecture(model.config.model_type).norm_folds:
            n = block.get_submodule(norm)
            n.weight.data = 1 + 0.3 * torch.randn(n.weight.shape, generator=g)
            n.weight.data[[3, 7]] *= 40
            if getattr(n, "bias", None) is not None:
                n.bias.data = 0.1 * torch.randn(n.bias.shape, generator=g)
        for source, _ in architecture(model.config.model_type).linear_folds:
            lin = block.get_submodule(source)
            lin.weight.data[[3, 7]] *= 40
            if lin.bias is not None:
                lin.bias.data = 0.1 * torch.randn(lin.bias.shape, generator=g)
    return model


def assert_same_logits_after_scaling(model, ids):
    with torch.no_grad():
        ref = model(ids).logits
        found = cfp(model, ids, **SCALE_ONLY, progress=False)
        out = model(ids).logits
    assert sum(sum(b["outlier_channels"].values()) for b in found) > 0  # something was folded
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    return found


@pytest.mark.parametrize("family", FAMILIES)  # llama, qwen2, mistral, gemma (1 + weight), opt, gpt2 (Conv1D)
def test_scaling_is_exact_on_tiny_models(family):
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    found = assert_same_logits_after_scaling(plant_outlier_channels(tiny(family)), ids)
    # the two planted channels, unless the normalized input happens to be small there
    assert all(1 <= count <= 2 for b in found for count in b["outlier_channels"].values())


def test_scaling_is_exact_on_stories260k():
    model, tok = load_stories()
    ids = calibration_ids(tok, CALIB_FILE.read_text(), DATA)
    found = assert_same_logits_after_scaling(model, ids)
    assert all(sum(b["outlier_weights"].values()) == 0 for b in found)


def test_value_channels_map_onto_every_query_head_of_their_group():
    model = tiny("llama")  # 4 heads of 8 channels, 2 kv heads
    index = consumer_channels(model, 16, 32)
    assert index.tolist() == [*range(8), *range(8), *range(8, 16), *range(8, 16)]
    assert consumer_channels(model, 32, 32) is None
    with pytest.raises(CrossblockError, match="cannot map 32 attention output channels onto 12"):
        consumer_channels(model, 12, 32)


def test_unknown_architectures_are_refused():
    model = tiny("llama")
    model.config.model_type = "falcon"
    with pytest.raises(CrossblockError, match="CFP does not know.*'falcon'"):
        cfp(model, torch.ones(1, 8, dtype=torch.long), **SCALE_ONLY)
    post_ln = T.OPTForCausalLM(T.OPTConfig(**dict(FAMILIES["opt"][2], do_layer_norm_before=False)))
    with pytest.raises(CrossblockError, match="do_layer_norm_before=False"):
        cfp(post_ln, torch.ones(1, 8, dtype=torch.long), **SCALE_ONLY)
    gelu = T.OPTForCausalLM(T.OPTConfig(**dict(FAMILIES["opt"][2], activation_function="gelu")))
    with pytest.raises(CrossblockError, match="fc1 -> fc2 only through relu"):
        cfp(gelu, torch.ones(1, 8, dtype=torch.long), **SCALE_ONLY)


def test_outlier_weights_are_truncated_to_the_threshold():
    model = tiny("llama")
    w = find_blocks(model)[1][0].mlp.down_proj.weight
    with torch.no_grad():
        w[0, 0], w[1, 1] = 5.0, -6.0
        before = w.clone()
    ids = torch.randint(3, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    found = cfp(model, ids, weights=True, batch_size=4, progress=False)
    assert found[0]["outlier_weights"]["mlp.down_proj"] == 2
    rest = before.abs().flatten().sort().values[-3].item()  # the largest weight left
    assert (w[0, 0], w[1, 1]) == (rest, -rest) and (w != before).sum() == 2


@pytest.mark.slow
def test_w4a8_with_cfp_is_no_worse_on_stories260k_and_the_report_counts_outliers():
    from test_quantize import CALIB, ppl, run
    kw = dict(wbits=4, abits=8, group_size=-1, **CALIB)
    assert ppl("rtn", cfp=True, **kw) <= ppl("rtn", **kw)
    report = run("rtn", cfp=True, **kw)[1]
    assert [b["block"] for b in report["cfp"]] == list(range(5))
    assert sum(sum(b["outlier_channels"].values()) for b in report["cfp"]) > 0
    assert sum(sum(b["outlier_weights"].values()) for b in report["cfp"]) == 0  # weights kept by default
    report = run("rtn", cfp=True, cfp_weights=True, **kw)[1]
    assert sum(sum(b["outlier_weights"].values()) for b in report["cfp"]) > 0


def test_preprocess_command_writes_the_scaled_model(tmp_path, capsys):
    out = tmp_path / "pre"
    assert main(["preprocess", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out),
                 "--nsamples", "16", "--seqlen", "64", "--quiet"]) == 0  # default: channels only
    assert "outlier channels scaled" in capsys.readouterr().out
    info = json.loads((out / "cfp.json").read_text())
    assert len(info["cfp"]) == 5 and info["cfp_weights"] is False
    model, tok = load_stories()
    again, _ = cb.load_model(str(out))
    ids = tok(CALIB_FILE.read_text()[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref, out_logits = model(ids).logits, again(ids).logits
    assert (out_logits - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not torch.equal(again.model.layers[1].input_layernorm.weight, model.model.layers[1].input_layernorm.weight)
