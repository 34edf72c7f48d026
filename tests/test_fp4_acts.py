"""FP4 and FP8 activations (activations.type nvfp4 / mxfp4 / fp8): the quantizers are
compressed-tensors' dynamic QDQ bit for bit (NVFP4 with its calibrated global scale), the window
engine runs them (block beats RTN on stories260k W4A4), compressed-tensors folders carry
llm-compressor's NVFP4 / MXFP4 / FP8_DYNAMIC input_activations, and crossblock.load gives back
the model that was evaluated. The flat spelling: --grid and --act-type."""
import functools
import json

import pytest
import torch
from safetensors.torch import load_file

import crossblock as cb
from crossblock.errors import CrossblockError
from crossblock.quant import fp4
from crossblock.quant.act import Fp4ActQuant, act_quantizer, observing

from conftest import CALIB_FILE, EVAL_FILE, load_stories

DATA = {"nsamples": 16, "seqlen": 64, "batch_size": 4}
SKIP = ["mlp.down_proj"]  # stories260k's down_proj is 172 wide: no multiple of 16
E2M1_SET = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
PRESETS = {"nvfp4": "NVFP4", "mxfp4": "MXFP4", "fp8": "FP8_DYNAMIC"}
W4A4 = [("nvfp4", "nvfp4"), ("mxfp4", "mxfp4"), ("nvfp4", "fp8")]  # (weight grid, activation type)


def inputs(seed=0):
    """(batch, tokens, 128) of very different magnitudes per token, an all-zero group, an outlier."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 8, 128, generator=g) * torch.rand(2, 8, 1, generator=g) * 3
    x[0, 1, :32] = 0
    x[1, 2, 5] = 40.0
    return x


def calibrated(kind, *batches):
    q = act_quantizer(4 if kind != "fp8" else 8, True, False, kind)
    with observing([q] if isinstance(q, Fp4ActQuant) else []):
        for b in batches:
            q(b)
    return q


# -- the quantizers --------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4", "fp8"])
def test_quantizers_equal_compressed_tensors_dynamic_qdq_bit_for_bit(kind):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp, generate_gparam
    x = inputs()
    args = preset_name_to_scheme(PRESETS[kind], ["Linear"]).input_activations
    glob = generate_gparam(x.min(), x.max()) if kind == "nvfp4" else None  # what llm-compressor calibrates
    scale, zp = compute_dynamic_scales_and_zp(x, args, None, global_scale=glob)
    theirs = fake_quantize(x, scale, zp, args, global_scale=glob)
    assert torch.equal(calibrated(kind, x)(x).view(torch.int32), theirs.view(torch.int32))


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4"])
def test_fp4_inputs_are_e2m1_values_times_a_storable_scale(kind):
    x, q = inputs(), calibrated(kind, inputs())
    out = q(x).reshape(-1, 128)
    group = fp4.GROUP[kind]
    amax = out.reshape(out.shape[0], -1, group).abs().amax(-1)  # recover each group's step from its max
    scale, zero = fp4.params(x.reshape(-1, 128), kind, glob=q.glob if kind == "nvfp4" else None)
    step = (scale / zero).repeat_interleave(group, dim=1)
    v = out / step
    assert set(v.abs().unique().tolist()) <= E2M1_SET and torch.equal(fp4.round_e2m1(v) * step, out)
    assert (amax <= 6 * (scale / zero)).all()
    if kind == "nvfp4":
        assert torch.equal(scale.to(torch.float8_e4m3fn).float(), scale)  # E4M3 group scales
    else:
        assert torch.equal(2.0 ** torch.log2(scale).round(), scale)  # E8M0: powers of two


def test_fp8_inputs_are_e4m3_values_times_the_token_amax_over_448():
    x = inputs()
    out = calibrated("fp8")(x).reshape(-1, 128)
    step = x.reshape(-1, 128).abs().amax(-1, keepdim=True) / 448
    step = torch.where(step == 0, torch.finfo(torch.float32).eps, step)
    v = (out / step).to(torch.float8_e4m3fn).float()  # the E4M3 value each input became (products may round)
    assert torch.equal(v * step, out) and (v.abs().amax(-1) == 448).all()  # each token's max maps to E4M3's


def test_nvfp4_global_scale_is_calibrated_on_every_batch_and_then_fixed():
    a, b = inputs(0), inputs(1) * 0.5
    q = calibrated("nvfp4", a, b)
    amax = torch.maximum(a.abs().max(), b.abs().max())
    assert q.glob.item() == (448 * 6 / amax).item()  # compressed-tensors' global: the spec's amax / (6 * 448), inverted
    before = q.glob.clone()
    q(a * 100)  # run time: group scales move, the global scale does not
    assert torch.equal(q.glob, before)


@pytest.mark.parametrize("kind", ["nvfp4", "mxfp4", "fp8"])
def test_gradients_pass_straight_through(kind):
    x = inputs().requires_grad_(True)
    out = calibrated(kind, x.detach())(x)
    out.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x)) and out.requires_grad


# -- the recipe ------------------------------------------------------------------------------

@pytest.mark.parametrize("flat, message", [
    (dict(abits=4, act_type="fp8"), "invalid activations: type fp8 is 8-bit: bits must be 8, got 4"),
    (dict(abits=8, act_type="nvfp4"), "invalid activations: type nvfp4 is 4-bit: bits must be 4, got 8"),
    (dict(abits=4, act_type="nvfp4", act_dynamic=False),
     "invalid activations: type nvfp4 computes its scales at run time: dynamic must be true (static steps: type int)"),
    (dict(abits=4, act_type="mxfp4", act_sym=True),
     "invalid activations: type mxfp4 is symmetric by format: leave sym false (it has no effect)"),
    (dict(act_type="nvfp4"), "invalid recipe: act_type has no effect without abits < 16"),
    (dict(abits=4, act_type="fp4"), "invalid activations: type must be one of int, nvfp4, mxfp4, fp8, got 'fp4'"),
    (dict(grid="gguf"), "invalid recipe: grid must be one of mxfp4, nvfp4, uniform, got 'gguf'"),
    (dict(grid="nvfp4", gguf_type="Q4_0"), "invalid recipe: grid nvfp4 and gguf_type pick different grids"),
    (dict(grid="mxfp4", group_size=64), "invalid recipe: group_size has no effect with grid mxfp4"),
])
def test_impossible_combinations_are_refused_in_one_line(flat, message):
    with pytest.raises(CrossblockError) as e:
        cb.Recipe.preset("rtn", **flat)
    assert str(e.value) == message


def test_sections_spelling_refuses_too():
    with pytest.raises(CrossblockError, match="^invalid activations: type has no effect without bits < 16$"):
        cb.Recipe.from_dict({"activations": {"type": "nvfp4"}, "stages": ["windows"]})
    with pytest.raises(CrossblockError, match="^invalid activations: type nvfp4 is 4-bit: bits must be 4, got 8$"):
        cb.Recipe.from_dict({"activations": {"type": "nvfp4", "bits": 8}, "stages": ["windows"]})


def test_cli_grid_and_act_type_flags():
    from crossblock.cli import build_parser, recipe_from_args
    args = build_parser().parse_args(["quantize", "--model", "m", "--calib", "c", "--out", "o", "--recipe", "block",
                                      "--grid", "nvfp4", "--abits", "4", "--act-type", "nvfp4"])
    r = recipe_from_args(args)
    assert r.grid.kind_name == "nvfp4" and r.grid.group_size == 16
    assert (r.activations.bits, r.activations.type) == (4, "nvfp4") and r.activations.calibrated
    assert r.activations.scheme()["dynamic"] == "local"
    flat = r.to_flat()
    assert (flat["grid"], flat["act_type"]) == ("nvfp4", "nvfp4") and cb.Recipe.flat(**flat) == r
    assert cb.Recipe.from_dict(r.to_dict()) == r
    assert r.summary().startswith("NVFP4 A4 nvfp4,")
    # the recipes of before: neither key in their flat form nor in their sections
    old = cb.Recipe.preset("block", gguf_type="Q4_K_M")
    assert "grid" not in old.to_flat() and "act_type" not in old.to_flat() and "type" not in old.to_dict()["activations"]


# -- on stories260k ----------------------------------------------------------------------------

def recipe(kind, act, train=None, **extra):
    stage = {"init": "rtn", **({"train": train} if train else {})}
    return cb.Recipe.from_dict({"grid": {"type": kind}, "activations": {"bits": 8 if act == "fp8" else 4, "type": act},
                                "data": DATA, "skip": SKIP, "stages": [{"windows": stage}], **extra})


@functools.lru_cache(maxsize=None)
def stories(kind, act, label):
    # token-mse: with the plain mse on 16 x 64 tokens block lowers each block's error but overfits (ppl
    # 6.39 at 15 steps, 6.44 at 40, against RTN's 6.35); token-mse 40 steps gives 6.27
    train = {"iters": 40, "rounding": "signround", "lwc": True, "loss": "token-mse"} if label == "block" else None
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, recipe(kind, act, train), calib=CALIB_FILE.read_text(),
                                format="compressed-tensors", progress=False, device="cpu")
    return model, tok, report


def ppl(model, tok):
    return cb.evaluate(model, tok, EVAL_FILE.read_text(), seqlen=128, max_windows=8, progress=False)


@pytest.mark.slow
def test_block_beats_rtn_on_nvfp4_w4a4():
    block, tok, report = stories("nvfp4", "nvfp4", "block")
    last = report["blocks"][-1]
    assert last["mse"] < last["rtn"]["mse"]  # the RTN reference runs the same activation quantizers
    rtn = stories("nvfp4", "nvfp4", "rtn")[0]
    assert ppl(block, tok) < ppl(rtn, tok)


@pytest.mark.slow
@pytest.mark.parametrize("kind, act", W4A4)
def test_compressed_tensors_folder_holds_the_preset_scheme_and_loads_back(kind, act, tmp_path):
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from crossblock.export.common import read_config
    model, tok, report = stories(kind, act, "rtn")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    config = QuantizationConfig.model_validate(read_config(tmp_path / "q")["quantization_config"])
    (scheme,) = config.config_groups.values()
    assert scheme.format == f"{kind}-pack-quantized"
    preset = preset_name_to_scheme(PRESETS[act], ["Linear"]).input_activations
    assert scheme.input_activations.model_dump() == preset.model_dump()  # as serialized: the dtypes by name
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "crossblock_act_quant")}
    assert len(layers) == 5 * 6
    recorded = json.loads((tmp_path / "q" / "crossblock.json").read_text())["activations"]["layers"]
    for name, m in layers.items():
        stored = tensors.get(f"{name}.input_global_scale")
        if act == "nvfp4":
            assert stored.dtype == torch.float32 and stored.tolist() == [m.crossblock_act_quant.glob.item()]
            assert recorded[name] == stored.tolist()
        else:
            assert stored is None and recorded[name] is None
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(3))
    back = cb.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    (tmp_path / "q" / "crossblock.json").unlink()  # as llm-compressor writes it: the config says it all
    with torch.no_grad():
        assert torch.equal(cb.load(tmp_path / "q")(input_ids=ids).logits, model(input_ids=ids).logits)
    cb.save(model, tok, tmp_path / "f", format="fake", report=report)
    with torch.no_grad():
        assert torch.equal(cb.load(tmp_path / "f")(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.slow
def test_transformers_runs_the_mxfp4_w4a4_folder_as_crossblock_does(tmp_path):
    """compressed-tensors' own forward (weights decompressed, inputs quantized dynamically) in
    bfloat16: MXFP4's power-of-two scales are exact in bfloat16, so the logits are equal."""
    from transformers import AutoModelForCausalLM
    model, tok, report = stories("mxfp4", "mxfp4", "rtn")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    ours = cb.load(tmp_path / "q", dtype=torch.bfloat16)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, ours(input_ids=ids).logits)


@pytest.mark.slow
def test_rotate_and_finetune_run_with_float_activations(tmp_path):
    """Rotations are just in front of the input quantizers; finetune trains a uniform grid under them."""
    model, tok = load_stories()
    r = cb.Recipe.preset("rtn", grid="nvfp4", abits=4, act_type="nvfp4", rotate=True, skip=SKIP, nsamples=8,
                         seqlen=64, batch_size=4)
    model, report = cb.quantize(model, tok, r, calib=CALIB_FILE.read_text(), format="compressed-tensors",
                                progress=False, device="cpu")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)  # the save check reloads it
    assert json.loads((tmp_path / "q" / "crossblock.json").read_text())["save_check"]["max_rel_logit_diff"] == 0.0
    model, tok = load_stories()
    r = cb.Recipe.preset("rtn", wbits=4, group_size=32, abits=8, act_type="fp8", finetune_steps=3, nsamples=8,
                         seqlen=64, batch_size=4, finetune_batch_size=4)
    model, report = cb.quantize(model, tok, r, calib=CALIB_FILE.read_text(), progress=False, device="cpu")
    ft = report["finetune"]
    assert len(ft["loss_trace"]) == 3 and ft["held_out_loss_after"] <= ft["held_out_loss_before"]
    assert all(hasattr(m, "crossblock_act_quant") for n, m in model.named_modules() if n.endswith("q_proj"))


@pytest.mark.parametrize("spec, match", [
    ({"activations": {"bits": 8}},
     "compressed-tensors export has no scheme of integer activations with nvfp4 weights: use --act-type nvfp4 "
     r"\(W4A4\) or fp8 \(W4A8\), or format fake"),
    ({"activations": {"bits": 4, "type": "mxfp4"}},
     "compressed-tensors export stores mxfp4 activations with mxfp4 weights only .llm-compressor's MXFP4., "
     "not with nvfp4 weights: use --grid mxfp4, or format fake"),
    ({"grid": {"type": "uniform"}, "activations": {"bits": 4, "type": "nvfp4"}},
     "compressed-tensors export stores nvfp4 activations with nvfp4 weights only"),
])
def test_pairs_without_a_scheme_are_refused_before_work(spec, match):
    import crossblock.engine.reconstruct as rc
    model, tok = load_stories()
    full = {"grid": {"type": "nvfp4"}, "data": DATA, "skip": SKIP, "stages": [{"windows": {}}], **spec}
    before = rc.WindowEngine.quantize
    rc.WindowEngine.quantize = lambda *a, **k: pytest.fail("quantized before refusing")
    try:
        with pytest.raises(CrossblockError, match=match):
            cb.quantize(model, tok, cb.Recipe.from_dict(full), calib=CALIB_FILE.read_text(),
                        format="compressed-tensors", progress=False, device="cpu")
    finally:
        rc.WindowEngine.quantize = before


@pytest.mark.slow
def test_transformers_runs_an_int_w4_fp8_folder_as_crossblock_does(tmp_path):
    """Integer weights with FP8 per-token inputs (compressed-tensors' W4AFP8 shape), in float32:
    transformers' compressed-tensors forward and crossblock.load give the same logits."""
    from transformers import AutoModelForCausalLM
    model, tok = load_stories()
    r = cb.Recipe.preset("rtn", wbits=4, group_size=-1, sym=True, abits=8, act_type="fp8", nsamples=8, seqlen=64,
                         batch_size=4)
    model, report = cb.quantize(model, tok, r, calib=CALIB_FILE.read_text(), format="compressed-tensors",
                                progress=False, device="cpu")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(theirs(input_ids=ids).logits, cb.load(tmp_path / "q")(input_ids=ids).logits)
        assert torch.equal(theirs(input_ids=ids).logits, model(input_ids=ids).logits)
