"""GGUF export and the gguf grid: what crossblock optimizes is, bit for bit, what the gguf package
(llama.cpp's own Python code) decodes from the written file."""
import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader, GGMLQuantizationType
from gguf.quants import dequantize

import crossblock as cb
from crossblock.errors import CrossblockError
from crossblock.export.gguf import FILE, rotary_permute
from crossblock.export.gguf_pack import pack
from crossblock.grids.gguf import GgufGrid, mixture_type
from crossblock.quant import gguf as gq

from conftest import STORIES, load_stories

TYPES = list(gq.TYPES)
DATA = {"nsamples": 8, "seqlen": 64, "batch_size": 4}


def recipe(quant, train=None, **windows):
    stage = {"init": "rtn", **windows, **({"train": train} if train else {})}
    return cb.Recipe.from_dict({"grid": {"type": "gguf", "quant": quant}, "data": DATA, "stages": [{"windows": stage}]})


def tiny(family="llama", tied=False, layers=2):
    """A random model whose widths (256, 512) every GGUF type holds, on the stories vocabulary."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    config = config_class(hidden_size=256, intermediate_size=512, num_hidden_layers=layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=512, max_position_embeddings=128,
                          tie_word_embeddings=tied, head_dim=128 if family == "qwen3" else 64)
    # (transformers' GGUF loader gives Qwen3 its default head_dim 128, whatever the file says)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def quantize(model, tokenizer, calib_text, r):
    return cb.quantize(model, tokenizer, r, calib=calib_text, format="gguf", progress=False, device="cpu")


def file_tensors(path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file, decoded by the gguf package's dequantizers, (rows, cols)."""
    out = {}
    for t in GGUFReader(str(path)).tensors:
        values = dequantize(t.data, t.tensor_type)
        out[t.name] = values.reshape(values.shape[0], -1) if values.ndim > 1 else values
    return out


@pytest.mark.parametrize("kind", TYPES)
def test_packed_blocks_decode_to_the_grid_bit_for_bit(kind):
    """Random weights, clipped and offset as training leaves them: the packed bytes decode
    (gguf.quants.dequantize) to exactly the grid's float32 weights."""
    t = gq.TYPES[kind]
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 512, generator=g) * torch.rand(6, 1, generator=g) * 0.2
    w[0, :64] = 0                       # an all-zero super-block's first part
    w[1, :256] *= 1e-4                  # tiny steps (fp16 subnormals)
    mult = 0.5 + 0.5 * torch.rand(6, 512 // t.sub, generator=g)
    offset = torch.rand(6, 512, generator=g) - 0.5
    grid = GgufGrid(kind)
    step, rest = grid.params(w, mult, mult.flip(0))
    q = grid.to_int(w, step, rest, offset)
    codes = {k: v.numpy() for k, v in gq.codes(t, step, rest).items()}
    packed = pack(t, q.round().to(torch.uint8).numpy(), codes)
    decoded = dequantize(packed, getattr(GGMLQuantizationType, kind))
    assert packed.shape[1] == 512 // t.block * gguf.GGML_QUANT_SIZES[getattr(GGMLQuantizationType, kind)][1]
    assert torch.equal(torch.from_numpy(decoded), grid.decode(q, step, rest))
    assert torch.equal(grid.decode(q, step, rest), grid.fake_quantize(w, step, rest, offset))


@pytest.mark.parametrize("kind", [k if k in {"Q4_0", "Q8_0", "Q2_K", "Q4_K"} else pytest.param(k, marks=pytest.mark.slow)
                                  for k in TYPES])  # ~1 s each: one legacy, one 8-bit and two k-quants quick
def test_every_file_tensor_equals_the_fake_quant_weight(kind, tokenizer, calib_text, tmp_path):
    model, report = quantize(tiny(), tokenizer, calib_text, recipe(kind))
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    tensors = file_tensors(tmp_path / "out" / FILE)
    config = model.config
    for i, block in enumerate(model.model.layers):
        for hf, name, heads in (("self_attn.q_proj", "attn_q", config.num_attention_heads),
                                ("self_attn.k_proj", "attn_k", config.num_key_value_heads),
                                ("self_attn.v_proj", "attn_v", 0), ("mlp.down_proj", "ffn_down", 0)):
            w = block.get_submodule(hf).weight.detach().numpy()
            expected = rotary_permute(w, heads) if heads else w
            assert np.array_equal(tensors[f"blk.{i}.{name}.weight"], expected), (kind, i, hf)
            assert block.get_submodule(hf).crossblock_qweight.kind == kind
    for hf, name in (("model.embed_tokens", "token_embd"), ("lm_head", "output")):
        assert np.array_equal(tensors[f"{name}.weight"], model.get_submodule(hf).weight.detach().numpy())
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "out" / FILE)).tensors}
    assert types["blk.0.attn_q.weight"] == kind and types["output_norm.weight"] == "F32"
    assert types["output.weight"] == ("Q8_0" if kind == "Q8_0" else "Q6_K")


@pytest.mark.parametrize("tied", [False, True])
def test_f16_output_is_written_as_f16(tied, tokenizer, calib_text, tmp_path):
    """--gguf-output F16 (and an untied model's embeddings F16): the tensors are F16 in the file,
    not the model's float32 holding F16 values (issue 26)."""
    r = cb.Recipe.from_dict({"grid": {"type": "gguf", "quant": "Q8_0", "output": "F16",
                                      **({} if tied else {"embeddings": "F16"})},
                             "data": DATA, "stages": [{"windows": {"init": "rtn"}}]})
    model, report = quantize(tiny(tied=tied), tokenizer, calib_text, r)
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    types = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "out" / FILE)).tensors}
    assert types["token_embd.weight"] == "F16" and types.get("output.weight", "F16") == "F16"
    assert ("output.weight" in types) is not tied and types["blk.0.attn_q.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"  # vectors stay F32, as llama.cpp keeps them
    tensors = file_tensors(tmp_path / "out" / FILE)
    assert np.array_equal(tensors["token_embd.weight"], model.get_input_embeddings().weight.detach().numpy())
    back = cb.load(tmp_path / "out")
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


@pytest.mark.slow
@pytest.mark.parametrize("family,quant,tied", [("llama", "Q4_K_M", False), ("qwen2", "Q3_K_M", True),
                                               ("qwen3", "Q2_K", False)])
def test_quantized_and_loaded_back_gives_the_same_logits(family, quant, tied, tokenizer, calib_text, tmp_path):
    train = {"iters": 4, "rounding": "signround", "lwc": True}
    model, report = quantize(tiny(family, tied), tokenizer, calib_text, recipe(quant, train))
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    back = cb.load(tmp_path / "out")
    ids = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)
    assert report["grid"]["tied_embeddings"] is tied


def test_mixtures_follow_llama_cpp(tokenizer, calib_text, tmp_path):
    # Q4_K_M: attn_v and ffn_down get Q6_K where llama.cpp's use_more_bits says so
    assert [mixture_type("Q4_K_M", "mlp.down_proj", i, 8) for i in range(8)] == \
        ["Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert mixture_type("Q4_K_M", "self_attn.q_proj", 0, 8) == "Q4_K"
    assert [mixture_type("Q3_K_M", "self_attn.v_proj", i, 4) for i in range(4)] == ["Q5_K", "Q5_K", "Q4_K", "Q4_K"]
    assert mixture_type("Q3_K_M", "self_attn.o_proj", 3, 4) == "Q4_K"
    assert mixture_type("Q3_K_M", "mlp.up_proj", 3, 4) == "Q3_K"
    model, report = quantize(tiny(layers=3), tokenizer, calib_text, recipe("Q4_K_M"))
    types = report["grid"]["types"]
    assert types["model.layers.2.mlp.down_proj"] == "Q6_K" and types["model.layers.1.mlp.down_proj"] == "Q4_K"  # n = 3
    assert model.model.layers[1].mlp.down_proj.crossblock_qweight.kind == "Q4_K"
    assert types["output"] == "Q6_K" and types["token_embd"] == "Q4_K"


@pytest.mark.slow
def test_narrow_layers_fall_back_and_are_recorded(tokenizer, calib_text, tmp_path):
    """stories260k: hidden 64 (no K-quant holds it), MLP 172 (no type at all)."""
    model, _ = load_stories()
    model, report = quantize(model, tokenizer, calib_text, recipe("Q4_K"))
    fallbacks = report["grid"]["fallbacks"]
    assert len(fallbacks["Q4_K -> Q5_0 (width 64)"]) == 30  # q k v o gate up x 5 blocks
    assert len(fallbacks["Q4_K -> F32 (width 172)"]) == 5
    # llama.cpp's output default is Q8_0 where 256 does not divide the width; tied: no token_embd of its own
    assert report["grid"]["types"]["output"] == "Q8_0" and "token_embd" not in report["grid"]["types"]
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    import json
    info = json.loads((tmp_path / "out" / "crossblock.json").read_text())
    assert info["grid"]["fallbacks"] == fallbacks
    assert info["gguf"]["tensor_types"] == {"F32": 16, "Q5_0": 30, "Q8_0": 1}  # F32: 11 norms, 5 down_proj
    back = cb.load(tmp_path / "out")
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, back(ids).logits)


def test_uniform_sym_g32_is_written_as_q4_0(tokenizer, calib_text, tmp_path):
    model = tiny()
    r = cb.Recipe.preset("rtn", wbits=4, group_size=32, sym=True, **DATA)
    model, report = cb.quantize(model, tokenizer, r, calib=calib_text, format="gguf", progress=False, device="cpu")
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    tensors = file_tensors(tmp_path / "out" / FILE)
    assert np.array_equal(tensors["blk.0.ffn_up.weight"], model.model.layers[0].mlp.up_proj.weight.numpy())
    assert report["recipe"]["grid"]["scale_dtype"] == "float16"


@pytest.mark.slow
def test_block_beats_rtn_on_a_k_quant_grid(tokenizer, calib_text):
    train = {"iters": 20, "rounding": "signround", "lwc": True}
    _, report = quantize(tiny(), tokenizer, calib_text, recipe("Q3_K", train))
    last = report["blocks"][-1]
    assert last["mse"] < last["rtn"]["mse"]
    assert [w["loss_after"] < w["loss_before"] for w in report["windows"]] == [True, True]


@pytest.mark.parametrize("quant", ["Q4_0", "Q3_K"])
def test_imatrix_init_beats_rtn_on_gguf_types(quant, tokenizer, calib_text):
    """Clipping by input-weighted error (llama.cpp's importance-matrix criterion), no training."""
    _, report = quantize(tiny(), tokenizer, calib_text, recipe(quant, init="imatrix"))
    for block in report["blocks"]:
        assert block["mse"] < block["rtn"]["mse"], block


def refused(model, r, fmt, match):
    # the refusal comes before any block is quantized
    import crossblock.engine.reconstruct as rc
    before = rc.WindowEngine.quantize
    rc.WindowEngine.quantize = lambda *a, **k: pytest.fail("quantized before refusing")
    try:
        with pytest.raises(CrossblockError, match=match):
            cb.quantize(model, None, r, calib=torch.ones(2, 16, dtype=torch.long), format=fmt, progress=False,
                        device="cpu")
    finally:
        rc.WindowEngine.quantize = before


def test_bad_combinations_are_refused_before_quantization():
    model = tiny()
    refused(model, recipe("Q4_K"), "gptq", "gptq export cannot store the gguf grid")
    refused(model, recipe("Q4_K"), "compressed-tensors", "compressed-tensors export cannot store the gguf grid")
    refused(model, cb.Recipe.preset("rtn", wbits=4, group_size=32), "gguf", "Q4_1")            # asymmetric
    refused(model, cb.Recipe.preset("rtn", wbits=4, group_size=64, sym=True), "gguf", "group_size must be 32")
    refused(model, cb.Recipe.preset("rtn", wbits=3, group_size=32, sym=True), "gguf", "cannot store 3-bit")
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=512))
    refused(gpt2, recipe("Q4_0"), "gguf", "gguf export supports llama, qwen2, qwen3 models, not 'gpt2'")
    with pytest.raises(CrossblockError, match="rounding adaround needs a grid step"):
        recipe("Q4_K_M", {"iters": 2, "rounding": "adaround"})
    with pytest.raises(CrossblockError, match="init gptq is not supported"):
        recipe("Q4_0", init="gptq")
    with pytest.raises(CrossblockError, match="quant must be one of"):
        recipe("Q4_K_S")
    recipe("Q6_K", {"iters": 2, "rounding": "adaround"})  # symmetric types take soft roundings


def test_flat_flag_and_yaml():
    r = cb.Recipe.flat(gguf_type="Q4_K_M", gguf_output="Q8_0")
    assert r.grid == GgufGrid("Q4_K_M", "Q8_0") and r.to_flat()["gguf_type"] == "Q4_K_M"
    assert r.to_dict()["grid"] == {"type": "gguf", "quant": "Q4_K_M", "output": "Q8_0", "embeddings": None}
    assert cb.Recipe.from_dict(r.to_dict()) == r  # the YAML sections round-trip
    with pytest.raises(CrossblockError, match="wbits has no effect with gguf_type"):
        cb.Recipe.flat(gguf_type="Q4_0", wbits=3)
    from crossblock.cli import build_parser
    args = build_parser().parse_args(["quantize", "--model", str(STORIES), "--calib", "x", "--out", "o",
                                      "--gguf-type", "Q3_K_M"])
    assert args.gguf_type == "Q3_K_M"


@pytest.mark.parametrize("value", ["", "q4_k"])
def test_gguf_type_not_a_type_is_refused_by_name(value, tmp_path, capsys):
    """--gguf-type "" is a gguf grid with no type, refused as such (not taken for the uniform grid)."""
    from crossblock.cli import main
    from conftest import CALIB_FILE
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--gguf-type", value]) == 2
    names = ", ".join(GgufGrid.names())
    assert capsys.readouterr().err.strip() == (f"crossblock: error: invalid recipe: gguf_type must be one "
                                               f"of {names}, got {value!r}")
    assert not out.exists()


def byte_level_bpe(pre_tokenizer, text):
    """A small byte-level BPE tokenizer (the gpt2 kind of tokenizer.ggml.model) with a chosen pre-tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE())
    t.pre_tokenizer, t.decoder = pre_tokenizer, decoders.ByteLevel()
    t.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token="<|endoftext|>")


@pytest.mark.parametrize("kind,expected", [("plain", "gpt-2"), ("split", "default")])
def test_byte_level_bpe_names_the_pre_tokenizer_llama_cpp_must_use(kind, expected, calib_text, tmp_path):
    """llama.cpp splits text with the regex tokenizer.ggml.pre names: GPT-2's for a plain ByteLevel
    pre-tokenizer (SmolLM2's); "default" (another regex) made llama.cpp tokenize WikiText
    differently from transformers (bench/results/gguf_llamacpp_smollm2.md)."""
    from tokenizers import Regex, pre_tokenizers
    from crossblock.export.gguf import save_gguf
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False) if kind == "plain" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"\p{N}{1,3}| ?\p{L}+|\s+"), "isolated"), pre_tokenizers.ByteLevel(use_regex=False)])
    save_gguf(tiny(), byte_level_bpe(pre, calib_text[:20000]), tmp_path)
    fields = GGUFReader(str(tmp_path / FILE)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == expected


def test_a_file_transformers_cannot_read_back_is_refused_in_one_line(tokenizer, calib_text, tmp_path, capsys):
    """#26.9: Qwen3 with head_dim 64 is written as llama.cpp reads it, but transformers' GGUF reader
    assumes Qwen3's default 128: load and eval say so instead of a shape error."""
    from transformers import Qwen3Config, AutoModelForCausalLM
    from crossblock.cli import main
    config = Qwen3Config(hidden_size=256, intermediate_size=512, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=128, head_dim=64)
    torch.manual_seed(0)
    model, report = quantize(AutoModelForCausalLM.from_config(config).eval(), tokenizer, calib_text, recipe("Q4_K_M"))
    cb.save(model, tokenizer, tmp_path / "out", format="gguf", report=report)
    with pytest.raises(cb.CrossblockError, match="head_dim is 64; transformers assumes 128"):
        cb.load(tmp_path / "out")
    text = tmp_path / "t.txt"
    text.write_text(calib_text[:5000])
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "out"), "--ppl", str(text), "--quiet"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and "transformers assumes 128" in errors[0]
