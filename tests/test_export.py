"""Packed exports against the fake-quant model they come from.

The quantized models are made here with the grid functions (RTN), on the real stories260k
(hidden 64, intermediate 172) and, for GPTQ widths that need in/out features in whole int32
words (172 is not a multiple of 8), on a tiny random GPT-2, which also covers Conv1D layers.
Integers are read back from the files with decoders independent of the writers.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from crossblock.errors import CrossblockError
from crossblock.export import check_format, load, save
from crossblock.quant.grid import QuantizedWeight, dequantize, minmax_grid, quantize_to_int
from crossblock.quant.linear import is_conv1d, weight_of
from conftest import STORIES

STORIES_WIDTHS = [64, 172]

ACT = {"bits": 8, "dynamic": True, "strategy": "token", "symmetric": True}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second OpenMP thread only waits on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stories():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(STORIES, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(STORIES)


@pytest.fixture(scope="module")
def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512)
    return GPT2LMHeadModel(config).eval()


def decoder_blocks(model: nn.Module) -> nn.Module:
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


@torch.no_grad()
def quantize(model: nn.Module, bits: int, group_size: int, sym: bool, fp16_scales=False, min_zero=0,
             bits_of=lambda name, bits: bits) -> nn.Module:
    """A fake-quantized copy: RTN on every linear of the decoder blocks, integers attached.
    fp16_scales puts the scales on the fp16 grid GPTQ stores; min_zero=1 keeps asymmetric zero
    points encodable in GPTQ v1."""
    model = copy.deepcopy(model)
    for name, module in decoder_blocks(model).named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module)):
            continue
        b = bits_of(name, bits)
        w = weight_of(module).float()
        scale, zero = minmax_grid(w, b, group_size, sym)
        if fp16_scales:
            scale = scale.half().float()
        if not sym:
            zero = zero.clamp(min=min_zero)
        q = quantize_to_int(w, scale, zero, b, group_size)
        w_hat = dequantize(q, scale, zero, group_size)
        module.weight.copy_(w_hat.t() if is_conv1d(module) else w_hat)
        module.crossblock_qweight = QuantizedWeight(q.to(torch.uint8), scale, zero.float(), b, group_size, sym)
    return model


def qlayers(model: nn.Module) -> dict[str, QuantizedWeight]:
    return {n: m.crossblock_qweight for n, m in model.named_modules() if hasattr(m, "crossblock_qweight")}


# -- checks ----------------------------------------------------------------------------------

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def assert_same_logits(model: nn.Module, reference: nn.Module, rel=1e-4):
    out, ref = model(IDS).logits, reference(IDS).logits
    assert (out - ref).abs().max() <= rel * ref.abs().max()


def assert_same_qweights(loaded: nn.Module, reference: nn.Module):
    expected = qlayers(reference)
    got = qlayers(loaded)
    assert got.keys() == expected.keys()
    for name, qw in expected.items():
        assert torch.equal(got[name].q, qw.q), name
        assert torch.equal(got[name].zero, qw.zero), name
        assert torch.equal(got[name].scale, qw.scale), name
        assert (got[name].bits, got[name].group_size, got[name].sym) == (qw.bits, qw.group_size, qw.sym)
        assert torch.equal(loaded.get_submodule(name).weight, reference.get_submodule(name).weight), name


def folder_tensors(path: Path) -> dict[str, torch.Tensor]:
    files = list(path.glob("*.safetensors"))
    assert files and not [p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    return {k: v for f in files for k, v in load_file(f).items()}


def quantization_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())["quantization_config"]


def load_with_transformers(path: Path, sym: bool):
    """Plain transformers. Asymmetric pack-quantized needs dequantize=True with transformers
    5.23 + compressed-tensors 0.20: the default path builds an unpacked zero-point parameter
    that the packed checkpoint tensor does not fit (a size-mismatch error)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig
    kwargs = {} if sym else {"quantization_config": CompressedTensorsConfig(dequantize=True)}
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


# -- compressed-tensors ------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [-1, 4])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compressed_tensors(stories, tokenizer, tmp_path, bits, group_size, sym):
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    model = quantize(stories, bits, group_size, sym)
    save(model, tokenizer, tmp_path, "compressed-tensors")

    config = quantization_config(tmp_path)
    assert config["quant_method"] == "compressed-tensors"
    assert config["format"] == "pack-quantized" and config["quantization_status"] == "compressed"
    assert config["ignore"] == ["lm_head"]
    (group,) = config["config_groups"].values()
    assert group["targets"] == ["Linear"] and group["input_activations"] is None
    weights = group["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["type"]) == (bits, sym, "int")
    assert weights["strategy"] == ("channel" if group_size == -1 else "group")
    assert weights["group_size"] == (None if group_size == -1 else group_size)

    tensors = folder_tensors(tmp_path)
    offset = 2 ** (bits - 1)  # compressed-tensors integers and zero points are signed
    for name, qw in qlayers(model).items():
        assert f"{name}.weight" not in tensors
        shape = tuple(tensors[f"{name}.weight_shape"].tolist())
        assert shape == tuple(qw.q.shape)
        q_ct = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape)
        assert torch.equal(q_ct.to(torch.int16) + offset, qw.q.to(torch.int16)), name
        assert tensors[f"{name}.weight_scale"].dtype == torch.float32
        assert torch.equal(tensors[f"{name}.weight_scale"], qw.scale)
        if sym:
            assert f"{name}.weight_zero_point" not in tensors
        else:
            zp = unpack_from_int32(tensors[f"{name}.weight_zero_point"], bits, qw.zero.shape, packed_dim=0)
            assert torch.equal(zp.float() + offset, qw.zero), name

    assert_same_logits(load_with_transformers(tmp_path, sym), model)
    loaded = load(tmp_path)
    assert_same_logits(loaded, model)
    assert_same_qweights(loaded, model)


def test_compressed_tensors_act_scheme(stories, tokenizer, tmp_path):
    """With activations quantized the library picks int-quantized: one int8 per weight."""
    model = quantize(stories, 8, -1, True)
    save(model, tokenizer, tmp_path, "compressed-tensors", act_scheme=ACT)
    config = quantization_config(tmp_path)
    assert config["format"] == "int-quantized"
    acts = config["config_groups"]["group_0"]["input_activations"]
    assert (acts["num_bits"], acts["dynamic"], acts["strategy"], acts["symmetric"], acts["type"]) == \
        (8, True, "token", True, "int")
    tensors = folder_tensors(tmp_path)
    for name, qw in qlayers(model).items():
        assert torch.equal(tensors[f"{name}.weight"].to(torch.int16) + 128, qw.q.to(torch.int16)), name
    # transformers simulates the int8 activations, so only closeness is expected there
    with torch.no_grad():
        out, ref = load_with_transformers(tmp_path, True)(IDS).logits, model(IDS).logits
    assert (out - ref).abs().max() <= 0.1 * ref.abs().max()
    assert_same_qweights(load(tmp_path), model)


def test_compressed_tensors_mixed_precision(stories, tokenizer, tmp_path):
    """Layers with different widths get one config group each, targeted by name."""
    model = quantize(stories, 4, 4, True, bits_of=lambda name, bits: 8 if "down_proj" in name else bits)
    save(model, tokenizer, tmp_path, "compressed-tensors")
    groups = quantization_config(tmp_path)["config_groups"]
    assert sorted(g["weights"]["num_bits"] for g in groups.values()) == [4, 8]
    assert all(t.endswith("down_proj") for g in groups.values() if g["weights"]["num_bits"] == 8
               for t in g["targets"])
    assert_same_logits(load_with_transformers(tmp_path, True), model)
    assert_same_qweights(load(tmp_path), model)


# -- gptq ------------------------------------------------------------------------------------

def bitstream_values(words: torch.Tensor, bits: int, count: int) -> list[int]:
    """Reference decoder: the int32 words of one column as one little-endian bit stream."""
    stream = sum((int(w) & 0xFFFFFFFF) << (32 * i) for i, w in enumerate(words.tolist()))
    return [(stream >> (k * bits)) & (2 ** bits - 1) for k in range(count)]


def assert_gptq_files(path: Path, model: nn.Module, bits: int, group_size: int, sym: bool):
    config = quantization_config(path)
    assert config == {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
                      "sym": sym, "checkpoint_format": "gptq"}
    tensors = folder_tensors(path)
    for name, qw in qlayers(model).items():
        out_features, in_features = qw.q.shape
        assert f"{name}.weight" not in tensors
        qweight, qzeros = tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"]
        assert qweight.dtype == qzeros.dtype == torch.int32
        assert qweight.shape == (in_features * bits // 32, out_features)
        for col in (0, out_features - 1):  # packed along in_features
            assert bitstream_values(qweight[:, col], bits, in_features) == qw.q[col].tolist(), name
        for group in range(qzeros.shape[0]):  # packed along out_features, v1 stores zero - 1
            stored = bitstream_values(qzeros[group], bits, out_features)
            assert [z + 1 for z in stored] == qw.zero[:, group].int().tolist(), name
        assert tensors[f"{name}.scales"].dtype == torch.float16
        assert torch.equal(tensors[f"{name}.scales"].float().t(), qw.scale)
        expected_g_idx = torch.zeros(in_features) if group_size == -1 else torch.arange(in_features) // group_size
        assert torch.equal(tensors[f"{name}.g_idx"].long(), expected_g_idx.long())


@pytest.mark.parametrize("group_size", [-1, 4])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_stories(stories, tokenizer, tmp_path, group_size, sym):
    model = quantize(stories, 8, group_size, sym, fp16_scales=True, min_zero=1)
    save(model, tokenizer, tmp_path, "gptq")
    assert_gptq_files(tmp_path, model, 8, group_size, sym)
    loaded = load(tmp_path)
    assert_same_logits(loaded, model)
    assert_same_qweights(loaded, model)


@pytest.mark.parametrize("group_size", [-1, 16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_gpt2_conv1d(gpt2, tmp_path, bits, group_size, sym):
    model = quantize(gpt2, bits, group_size, sym, fp16_scales=True, min_zero=1)
    save(model, None, tmp_path, "gptq")
    assert_gptq_files(tmp_path, model, bits, group_size, sym)
    loaded = load(tmp_path)
    assert is_conv1d(loaded.transformer.h[0].attn.c_attn)
    assert_same_logits(loaded, model)
    assert_same_qweights(loaded, model)


def test_gptq_refuses_zero_point_zero(stories, tmp_path):
    model = quantize(stories, 8, 4, False)  # small asymmetric groups: some zero points are 0
    assert any(bool((qw.zero == 0).any()) for qw in qlayers(model).values())
    with pytest.raises(CrossblockError, match="gptq.*zero point of 0"):
        save(model, None, tmp_path, "gptq")


def test_gptq_refuses_act_scheme(stories, tmp_path):
    with pytest.raises(CrossblockError, match="gptq.*act_scheme"):
        save(quantize(stories, 8, -1, True), None, tmp_path, "gptq", act_scheme=ACT)


# -- fake ------------------------------------------------------------------------------------

def test_fake_roundtrip(stories, tokenizer, tmp_path):
    model = quantize(stories, 3, 32, False)  # ragged groups: fake-quant takes anything
    save(model, tokenizer, tmp_path, "fake")
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    folder_tensors(tmp_path)
    loaded = load(tmp_path)
    assert_same_logits(loaded, model)
    assert not qlayers(loaded)


# -- check_format ----------------------------------------------------------------------------

@pytest.mark.parametrize("fmt, bits, group_size, kwargs, words", [
    ("compressed-tensors", 4, 32, {}, ["compressed-tensors", "group_size 32", "172"]),
    ("gptq", 8, 32, {}, ["gptq", "group_size 32", "172"]),
    ("compressed-tensors", 3, 4, {}, ["compressed-tensors", "3-bit"]),
    ("gptq", 6, 4, {}, ["gptq", "6-bit"]),
    ("gptq", 4, 4, {}, ["gptq", "in_features", "172"]),
    ("gptq", 8, -1, {"out_features_list": [64, 30]}, ["gptq", "out_features", "30"]),
    ("gptq", 8, 0, {}, ["gptq", "group_size"]),
    ("compressed-tensors", 4, -1, {"has_conv1d": True}, ["compressed-tensors", "Conv1D"]),
    ("gptq", 8, -1, {"act_scheme": ACT}, ["gptq", "act_scheme"]),
    ("compressed-tensors", 8, -1, {"act_scheme": {**ACT, "dynamic": False}}, ["compressed-tensors", "dynamic"]),
    ("compressed-tensors", 8, -1, {"act_scheme": {**ACT, "bitz": 8}}, ["compressed-tensors", "bitz"]),
    ("compressed-tensors", 8, -1, {"act_scheme": {**ACT, "strategy": "channel"}},
     ["compressed-tensors", "act_scheme"]),
    ("zip", 4, -1, {}, ["unknown export format", "zip"]),
])
def test_check_format_refuses(fmt, bits, group_size, kwargs, words):
    with pytest.raises(CrossblockError) as refusal:
        check_format(fmt, bits, group_size, True, STORIES_WIDTHS, **kwargs)
    for word in words:
        assert word in str(refusal.value)


@pytest.mark.parametrize("fmt, bits, group_size, kwargs", [
    ("fake", 3, 32, {"has_conv1d": True, "act_scheme": ACT}),
    ("compressed-tensors", 2, 4, {"act_scheme": ACT}),
    ("compressed-tensors", 8, -1, {}),
    ("gptq", 8, 4, {"out_features_list": [32, 64, 172]}),
    ("gptq", 3, -1, {"out_features_list": [64]}),
])
def test_check_format_accepts(fmt, bits, group_size, kwargs):
    widths = [64] if bits == 3 and fmt == "gptq" else STORIES_WIDTHS
    check_format(fmt, bits, group_size, False, widths, **kwargs)

