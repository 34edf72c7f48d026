"""Microscaling FP4 grids (nvfp4, mxfp4): every weight is an E2M1 value times a scale the format
can store, the grid math is compressed-tensors 0.20.1's bit for bit, roundings and GPTQ run on
it, and the compressed-tensors folder decompresses (with the library's own code) to the
fake-quant weights."""
import functools

import pytest
import torch
from safetensors.torch import load_file

import crossblock as cb
from crossblock.engine.gptq import gptq_quantize
from crossblock.errors import CrossblockError
from crossblock.grids import GRIDS
from crossblock.quant import fp4

from conftest import load_stories

KINDS = ["nvfp4", "mxfp4"]
DATA = {"nsamples": 16, "seqlen": 64, "batch_size": 4}
SKIP = ["mlp.down_proj"]  # stories260k's down_proj is 172 wide: no multiple of 16
E2M1_SET = {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}


def grid(kind):
    return GRIDS.build({"type": kind}, "grid")


def weight(rows=48, cols=256, seed=0):
    """Random rows of very different magnitudes, one all-zero group per kind, an outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g) * 0.1
    w[3, :32] = 0
    w[5, 40] = 0.9
    w[7, 64:96] = -1e-3  # a group whose values are all negative and small
    return w


def on_grid(what, step) -> bool:
    """Every weight is v * step for an E2M1 value v (float32 products: 1.5 * step may round, so
    v is recovered from the nearest value and the product compared to the bit)."""
    v = fp4.round_e2m1(what / step)
    return set(v.abs().unique().tolist()) <= E2M1_SET and torch.equal(v * step, what)


def recipe(kind, train=None, **windows):
    stage = {"init": "rtn", **windows, **({"train": train} if train else {})}
    return cb.Recipe.from_dict({"grid": {"type": kind}, "data": DATA, "skip": SKIP, "stages": [{"windows": stage}]})


@functools.lru_cache(maxsize=None)
def stories(kind, label):
    train = {"iters": 15, "rounding": "signround", "lwc": True} if label == "block" else None
    model, tok = load_stories()
    r = recipe(kind, train, init="gptq" if label == "gptq" else "rtn")
    model, report = cb.quantize(model, tok, r, calib=open_calib(), format="compressed-tensors", progress=False,
                                device="cpu")
    return model, tok, report


def open_calib():
    from conftest import CALIB_FILE
    return CALIB_FILE.read_text()


# -- the grid math ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_every_weight_is_e2m1_times_a_storable_scale(kind):
    gr, w = grid(kind), weight()
    scale, zero = gr.params(w)
    what = gr.fake_quantize(w, scale, zero)
    step = (scale / zero).repeat_interleave(gr.group, dim=1)
    assert on_grid(what, step)
    assert ((w - what).abs() <= 6 * step).all()  # nothing is clipped past the group's largest value
    if kind == "nvfp4":
        assert torch.equal(scale.to(torch.float8_e4m3fn).float(), scale)           # E4M3 values
        assert torch.equal(zero, torch.full_like(zero, 448 * 6 / w.abs().max().item()))  # one FP32 global
        assert scale[3, :2].tolist() == [0.125, 0.125]  # an all-zero group: compressed-tensors' eps
    else:
        assert torch.equal(2.0 ** torch.log2(scale).round(), scale) and (zero == 1).all()  # powers of two
        assert scale[3, 0].item() == 2.0 ** -127                                    # E8M0 code 0


@pytest.mark.parametrize("kind", KINDS)
def test_scales_and_fake_quant_equal_compressed_tensors_bit_for_bit(kind):
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
    from compressed_tensors.quantization.utils.helpers import calculate_qparams, generate_gparam
    gr, w = grid(kind), weight()
    args = (NVFP4A16 if kind == "nvfp4" else MXFP4A16)["weights"]
    wg = w.reshape(w.shape[0], -1, gr.group)
    glob = generate_gparam(w.min(), w.max()) if kind == "nvfp4" else None
    their_scale, _ = calculate_qparams(wg.amin(-1), wg.amax(-1), args, global_scale=glob)
    scale, zero = gr.params(w)
    assert torch.equal(their_scale.float(), scale)
    theirs = fake_quantize(w, their_scale, None, args, global_scale=glob)
    assert torch.equal(theirs.view(torch.int32), gr.fake_quantize(w, scale, zero).view(torch.int32))


def test_e2m1_rounding_is_compressed_tensors_cast_and_codes_round_trip():
    from compressed_tensors.quantization.quant_args import FP4_E2M1_DATA
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 2.0, 4.0, 1e-30, 1e-45, 1e30, float("inf")])
    ties = torch.cat([ties, torch.nextafter(ties, torch.zeros_like(ties)), torch.nextafter(ties, ties + 1)])
    x = torch.cat([torch.linspace(-7, 7, 56001), ties, -ties])
    x = torch.cat([x[x != 0], torch.tensor([0.0])])
    # bit patterns: the signed zeros too (a negative input that rounds to zero is -0.0, code 8;
    # an input of -0.0 itself is the one place theirs gives +0.0: the same value, code 8 not 0)
    assert torch.equal(fp4.round_e2m1(x).view(torch.int32), FP4_E2M1_DATA.cast_to_fp4(x.clone()).view(torch.int32))
    codes = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(fp4.to_codes(fp4.from_codes(codes)), codes)  # -0.0 is code 8
    packed = fp4.pack_codes(codes.reshape(2, 8))
    assert packed[0, 0].item() == 0x10 and torch.equal(fp4.unpack_codes(packed), codes.reshape(2, 8))


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_record_decodes_to_the_fake_quant_weight(kind):
    gr, w = grid(kind), weight()
    scale, zero = gr.params(w)
    record = gr.frozen(gr.to_int(w, scale, zero), scale, zero)
    assert record.q.dtype == torch.uint8 and int(record.q.max()) <= 15 and record.kind == kind
    assert torch.equal(record.dequantize().view(torch.int32), gr.fake_quantize(w, scale, zero).view(torch.int32))
    assert torch.equal(gr.frozen(record.q, record.scale, record.zero).q, record.q)  # codes stay codes


@pytest.mark.parametrize("kind", KINDS)
def test_offsets_and_clipping_get_straight_through_gradients(kind):
    gr, w = grid(kind), weight()
    mult = torch.full((w.shape[0], gr.num_groups(w.shape[1])), 0.9, requires_grad=True)
    offset = torch.zeros_like(w, requires_grad=True)
    scale, zero = gr.params(w, mult, mult)
    out = gr.fake_quantize(w, scale, zero, offset)
    ((out - w) ** 2).sum().backward()
    assert offset.grad.abs().sum() > 0 and mult.grad.abs().sum() > 0
    assert torch.isfinite(offset.grad).all() and torch.isfinite(mult.grad).all()
    with torch.no_grad():  # an offset of +0.5 in units of the step moves values up to the next E2M1 value
        moved = gr.to_int(w, scale.detach(), zero, torch.full_like(w, 0.5))
        assert (moved >= gr.to_int(w, scale.detach(), zero)).all()


@pytest.mark.parametrize("kind", KINDS)
def test_gptq_on_the_grid_beats_round_to_nearest_on_the_output(kind):
    gr, w = grid(kind), weight(cols=128)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(512, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.3 + torch.eye(128))
    h = 2 * x.t() @ x / len(x)
    base, scale, zero = gptq_quantize(w, h, 4, gr.group, True, rules=gr.gptq_rules(w, False))
    wq = gr.fake_quantize(base, scale, zero)
    assert on_grid(wq, (scale / zero).repeat_interleave(gr.group, dim=1))
    assert ((x @ (wq - w).t()) ** 2).mean() < ((x @ (gr.rtn(w) - w).t()) ** 2).mean()


# -- on a model ------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_block_and_gptq_beat_rtn_on_stories(kind):
    for label in ("gptq", "block"):
        report = stories(kind, label)[2]
        last = report["blocks"][-1]
        assert last["mse"] < last["rtn"]["mse"], (label, last)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_packed_folder_decompresses_to_the_fake_quant_weights(kind, tmp_path):
    """compressed-tensors' own compressor, from the written tensors: bfloat16 (its unpacking dtype)
    equal to the fake-quant weight rounded to bfloat16, and its float32 dequantize equal bit for bit."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.lifecycle.forward import dequantize
    from crossblock.export.common import read_config
    model, tok, report = stories(kind, "block")
    cb.save(model, tok, tmp_path / "q", format="compressed-tensors", report=report)
    config = QuantizationConfig.model_validate(read_config(tmp_path / "q")["quantization_config"])
    scheme = next(iter(config.config_groups.values()))
    assert scheme.format == f"{kind}-pack-quantized" and config.format == scheme.format
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    layers = [n for n, m in model.named_modules() if getattr(m, "crossblock_qweight", None) is not None]
    assert len(layers) == 5 * 6
    for name in layers:
        fake = model.get_submodule(name).weight.detach()
        state = {k.removeprefix(name + "."): v for k, v in tensors.items() if k.startswith(name + ".")}
        assert set(state) == {"weight_packed", "weight_scale"} | ({"weight_global_scale"} if kind == "nvfp4" else set())
        assert state["weight_scale"].dtype == (torch.float8_e4m3fn if kind == "nvfp4" else torch.uint8)
        out = compressor.decompress(dict(state), scheme)["weight"]
        assert out.dtype == torch.bfloat16 and torch.equal(out.view(torch.int16), fake.to(torch.bfloat16).view(torch.int16))
        rows, half = state["weight_packed"].shape
        scale = compressor._decompress_scale(state["weight_scale"], torch.float32)
        exact = dequantize(unpack_fp4_from_uint8(state["weight_packed"], rows, 2 * half, dtype=torch.float32), scale,
                           args=scheme.weights, global_scale=state.get("weight_global_scale"), dtype=torch.float32)
        assert torch.equal(exact.view(torch.int32), fake.view(torch.int32)), name
    back = cb.load(tmp_path / "q")  # crossblock reads its own folder: the same weights
    assert all(torch.equal(back.get_submodule(n).weight, model.get_submodule(n).weight) for n in layers)


@pytest.mark.slow
def test_layers_vllm_fuses_share_one_nvfp4_global_scale():
    """q/k/v and gate/up: one global scale from their joint amax (vLLM keeps one per fused matmul)."""
    model = stories("nvfp4", "block")[0]
    fp, _ = load_stories()
    for i, block in enumerate(model.model.layers):
        for family in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            globs = {block.get_submodule(n).crossblock_qweight.zero.unique().item() for n in family}
            amax = max(fp.model.layers[i].get_submodule(n).weight.abs().max() for n in family)
            assert globs == {(448 * 6 / amax).item()}, (i, family)  # a float32 division
        own = block.self_attn.o_proj.crossblock_qweight.zero.unique().item()
        assert own == (448 * 6 / fp.model.layers[i].self_attn.o_proj.weight.abs().max()).item()


@pytest.mark.slow
def test_fake_folder_loads_back_with_the_fp4_records(tmp_path):
    model, tok, report = stories("nvfp4", "rtn")
    cb.save(model, tok, tmp_path / "f", format="fake", report=report)
    back = cb.load(tmp_path / "f")
    for n, p in model.state_dict().items():
        assert torch.equal(back.state_dict()[n], p), n


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_moe_experts_on_the_grid_and_written(kind, tmp_path):
    from test_moe import IDS, build, expert_matrices
    model = build("qwen3_moe")
    r = cb.Recipe.from_dict({"grid": {"type": kind}, "data": {"nsamples": 8, "seqlen": 32, "batch_size": 4},
                             "stages": [{"windows": {"init": "gptq"}}]})
    model, report = cb.quantize(model, None, r, calib=IDS, format="compressed-tensors", progress=False, device="cpu")
    matrices = expert_matrices(model)
    assert matrices
    for name, w in matrices.items():
        module, _, param = name.rpartition(".")
        qw = model.get_submodule(module).crossblock_qexperts[param]
        assert qw.kind == kind and torch.equal(qw.dequantize(), w), name
    for block in report["blocks"]:
        assert block["rel_mse"] < block["rtn"]["rel_mse"]
    cb.save(model, None, tmp_path / "q", format="compressed-tensors", report=report)  # the save check reloads it


# -- what is refused -------------------------------------------------------------------------

def test_settings_the_formats_cannot_hold_are_refused_in_one_line():
    with pytest.raises(CrossblockError, match="nvfp4 has one scale per 16 weights: group_size must be 16, got 32"):
        GRIDS.build({"type": "nvfp4", "group_size": 32}, "grid").validated()
    with pytest.raises(CrossblockError, match="mxfp4 is symmetric .*sym must be true"):
        GRIDS.build({"type": "mxfp4", "sym": False}, "grid").validated()
    for rounding in ("adaround", "lora"):
        with pytest.raises(CrossblockError, match=f"invalid nvfp4 grid: rounding {rounding} picks floor"):
            recipe("nvfp4", {"iters": 2, "rounding": rounding})
    with pytest.raises(CrossblockError, match="finetune trains a uniform grid's scales; the mxfp4 grid"):
        cb.Recipe.from_dict({"grid": {"type": "mxfp4"}, "stages": [{"windows": {}}, {"finetune": {}}]})


@pytest.mark.parametrize("fmt, r, match", [
    ("gptq", {}, "gptq export cannot store the nvfp4 grid"),
    ("gguf", {}, "gguf export cannot store the nvfp4 grid"),
    ("compressed-tensors", {"activations": {"bits": 8}},
     "compressed-tensors export has no scheme of integer activations with nvfp4 weights"),
    ("fake", {"skip": []}, "nvfp4 needs every quantized layer's input width to be a multiple of 16: "
                           "model.layers.0.mlp.down_proj has 172"),
])
def test_formats_and_widths_refuse_before_work(fmt, r, match):
    import crossblock.engine.reconstruct as rc
    model, tok = load_stories()
    spec = {"grid": {"type": "nvfp4"}, "data": DATA, "skip": SKIP, "stages": [{"windows": {}}], **r}
    before = rc.WindowEngine.quantize
    rc.WindowEngine.quantize = lambda *a, **k: pytest.fail("quantized before refusing")
    try:
        with pytest.raises(CrossblockError, match=match):
            cb.quantize(model, tok, cb.Recipe.from_dict(spec), calib=open_calib(), format=fmt, progress=False,
                        device="cpu")
    finally:
        rc.WindowEngine.quantize = before


# -- GGUF: the mxfp4 grid is ggml's MXFP4 ------------------------------------------------------

def test_mxfp4_blocks_decode_with_gguf_bit_for_bit():
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    from crossblock.export.gguf_pack import pack_mxfp4
    gr, w = grid("mxfp4"), weight()
    scale, zero = gr.params(w)
    record = gr.frozen(gr.to_int(w, scale, zero), scale, zero)
    data = pack_mxfp4(record.q.numpy(), fp4.e8m0_codes(record.scale).numpy())
    decoded = torch.from_numpy(dequantize(data, GGMLQuantizationType.MXFP4).reshape(w.shape).copy())
    fake = gr.fake_quantize(w, scale, zero)
    assert torch.equal(decoded, fake)  # ggml writes +0.0 where compressed-tensors keeps -0.0: equal values


@pytest.mark.slow
def test_mxfp4_gguf_file_holds_the_fake_quant_weights(tokenizer, calib_text, tmp_path):
    from gguf import GGUFReader
    from test_gguf import file_tensors, tiny
    from crossblock.export.gguf import FILE, rotary_permute
    r = cb.Recipe.from_dict({"grid": {"type": "mxfp4"}, "data": DATA, "stages": [{"windows": {"init": "gptq"}}]})
    model, report = cb.quantize(tiny(), tokenizer, r, calib=calib_text, format="gguf", progress=False, device="cpu")
    cb.save(model, tokenizer, tmp_path / "g", format="gguf", report=report)  # the save check reloads it
    tensors = file_tensors(tmp_path / "g" / FILE)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "g" / FILE)).tensors}
    config = model.config
    for i, block in enumerate(model.model.layers):
        for hf, name, heads in (("self_attn.q_proj", "attn_q", config.num_attention_heads),
                                ("self_attn.v_proj", "attn_v", 0), ("mlp.down_proj", "ffn_down", 0)):
            w = block.get_submodule(hf).weight.detach()
            expected = torch.from_numpy(rotary_permute(w.numpy(), heads) if heads else w.numpy())
            assert types[f"blk.{i}.{name}.weight"] == "MXFP4"
            assert torch.equal(torch.from_numpy(tensors[f"blk.{i}.{name}.weight"].copy()), expected), (i, hf)


# -- recipes and checkpoints -----------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_yaml_spelling_round_trips(kind, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"preset: block\ngrid: {{type: {kind}}}\n")
    r = cb.Recipe.from_yaml(str(path))
    assert r.grid.kind_name == kind and r.grid.group_size == fp4.GROUP[kind]
    assert r.summary().startswith(kind.upper())
    assert cb.Recipe.from_dict(r.to_dict()) == r


@pytest.mark.parametrize("kind", KINDS)
def test_a_frozen_layer_resumes_from_its_checkpoint_state(kind):
    from crossblock.quant.linear import QuantLinear
    from crossblock.roundings import SignRound
    lin = torch.nn.Linear(64, 8, bias=False)
    with torch.no_grad():
        lin.weight.copy_(weight(8, 64))
    layer = QuantLinear(lin, grid(kind), SignRound(), lwc=True)
    with torch.no_grad():
        layer.offset.uniform_(-0.5, 0.5)
    layer.freeze()
    again = QuantLinear(lin, grid(kind), SignRound(), lwc=True)
    again.load_checkpoint_state(layer.checkpoint_state())
    assert again.q.dtype == torch.uint8
    assert torch.equal(again.quantized_weight().view(torch.int32), layer.quantized_weight().view(torch.int32))
