"""GGUF export: one `model.gguf` (llama.cpp's format, written with its own `gguf` package) with the
model's hyperparameters and tokenizer as llama.cpp's converter writes them, plus the HF tokenizer
files (for `crossblock eval`) in the same folder.

Tensors, per llama.cpp's names (token_embd, blk.N.attn_q, ..., output_norm, output):
- layers carrying a GGUF record (the gguf grid) are packed in their type (gguf_pack.py);
- a uniform grid maps only where ggml decodes the same floats: symmetric, groups of 32, fp16
  scales, 4 / 5 / 8 bits -> Q4_0 / Q5_0 / Q8_0 (scale * (q - 2**(bits-1)) is ggml's
  d * (q - zero)); asymmetric uniform grids are refused (Q4_1 decodes d * q + m, another float);
- the mxfp4 grid is ggml's MXFP4 (32 E2M1 codes and one E8M0 scale a block: the same values,
  gguf_pack.pack_mxfp4); nvfp4 is refused (ggml's NVFP4 has no per-tensor global scale);
- everything else (norms, layers left in full precision) in the model's float dtype (F32, F16,
  BF16), so the file decodes to exactly the model.
llama.cpp's converter permutes the rows of llama's q_proj and k_proj (its rotary layout); rows
are whole blocks, so the packed rows are permuted, and the loaders permute back.
"""
from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import CrossblockError
from ..model.architectures import architecture, families
from ..model.loading import from_pretrained_exactly
from ..quant import gguf as gq
from ..quant.fp4 import e8m0_codes
from ..quant.grid import QuantizedWeight
from .formats import FORMATS, Format, check_groups, refuse_act_scheme
from .gguf_pack import pack, pack_mxfp4

log = logging.getLogger(__name__)

FMT = "gguf"
FILE = "model.gguf"
UNIFORM_TYPES = {4: "Q4_0", 5: "Q5_0", 8: "Q8_0"}                 # symmetric, groups of 32
DENSE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}


def check_family(model):
    family = model.config.model_type
    if architecture(family).gguf is None:
        raise CrossblockError(f"gguf export supports {', '.join(families('gguf'))} models, not {family!r}")
    scaling = (getattr(model.config, "rope_parameters", None) or {}).get("rope_type", "default")
    if scaling != "default":
        raise CrossblockError(f"gguf export writes default rotary embeddings; this model uses {scaling!r} rope scaling")


@FORMATS.register(FMT)
class Gguf(Format):
    bits = tuple(UNIFORM_TYPES)
    streams = False  # one file of the whole model (and the gguf grid's finishing pass needs it whole)
    file = FILE
    loading = """One GGUF file for llama.cpp.

```bash
llama-cli -m {out}/model.gguf -p "Once upon a time"
llama-perplexity -m {out}/model.gguf -f wiki.test.raw
```

```python
import crossblock
model = crossblock.load("{out}")  # through transformers' GGUF reader
```"""  # the model card's "Loading" section

    def unreadable(self, folder: Path) -> str | None:
        return why_transformers_cannot_read(Path(folder) / FILE)

    def stored_scale_dtype(self, save_dtype):
        return torch.float16  # ggml's d

    def accepts_grid(self, grid, model):
        import importlib.util
        if importlib.util.find_spec("gguf") is None:
            raise CrossblockError("gguf export needs llama.cpp's gguf package: pip install 'crossblock[gguf]'")
        check_family(model)
        if grid.kind_name == "uniform":
            if not grid.sym or grid.scale_dtype not in (None, "float16"):
                raise CrossblockError(
                    "gguf export stores a uniform grid only as Q4_0 / Q5_0 / Q8_0 (symmetric, fp16 scales, group "
                    "size 32); for asymmetric grids use the gguf grid ({type: gguf, quant: Q4_1} or --gguf-type "
                    "Q4_1), whose values are ggml's d * q + m")
        elif grid.kind_name == "nvfp4":
            raise CrossblockError("gguf export cannot store the nvfp4 grid: ggml's NVFP4 has no per-tensor "
                                  "global scale; use mxfp4 (ggml's MXFP4), compressed-tensors or fake")
        elif grid.kind_name not in ("gguf", "mxfp4"):  # mxfp4: ggml's MXFP4, block for block
            super().accepts_grid(grid, model)

    def accepts(self, bits, group_size, sym, in_features, out_features, has_conv1d, act_scheme, fused_experts=()):
        # reached for uniform grids only (symmetric, see accepts_grid)
        if fused_experts:
            raise CrossblockError(f"gguf export does not write fused MoE experts ({fused_experts[0]}); use fake or "
                                  "compressed-tensors")
        if group_size != 32:
            raise CrossblockError(f"gguf export stores a uniform grid as Q{bits}_0, whose blocks are 32 wide: "
                                  f"group_size must be 32, got {group_size} (or use the gguf grid)")
        check_groups(FMT, group_size, in_features)
        refuse_act_scheme(FMT, act_scheme)

    def write(self, model, tokenizer, out_dir, act_scheme, grid=None):
        refuse_act_scheme(FMT, act_scheme)
        return save_gguf(model, tokenizer, out_dir, grid)

    def load(self, path, device="cpu", dtype=None, trust_remote_code=False):
        return load_gguf(path, device, dtype)


def record_of(module) -> QuantizedWeight | None:
    qw = getattr(module, "crossblock_qweight", None)
    if qw is None or qw.kind != "uniform":
        return qw
    if not qw.sym or qw.group_size != 32 or qw.bits not in UNIFORM_TYPES:
        raise CrossblockError(f"gguf export: a uniform {qw.bits}-bit group {qw.group_size} "
                              f"{'sym' if qw.sym else 'asym'} layer has no GGUF type (Q4_0 / Q5_0 / Q8_0: sym, g32)")
    if not torch.equal(qw.scale.half().float(), qw.scale):
        raise CrossblockError("gguf export: uniform scales must be fp16 values (quantize with format='gguf')")
    # scale * (q - 2**(bits-1)) with fp16 scales is ggml's legacy symmetric decode, d = scale
    rest = torch.stack([qw.zero, qw.scale, torch.zeros_like(qw.scale)], dim=-1)
    return QuantizedWeight(qw.q, qw.scale, rest, qw.bits, 32, True, kind=UNIFORM_TYPES[qw.bits])


def tensor_data(weight: torch.Tensor, qw: QuantizedWeight | None, dense: str | None = None):
    """(numpy array, ggml type name): packed bytes, or the dense weight in `dense` (F16 / F32),
    by default in its dtype."""
    if qw is None:
        w = weight.detach().cpu()
        kind = dense or DENSE.get(w.dtype, "F32")
        if kind == "BF16":
            return w.view(torch.int16).numpy().view(np.uint8).reshape(w.shape[0], -1), kind
        return w.to(torch.float32 if kind == "F32" else torch.float16).numpy(), kind
    if qw.kind == "mxfp4":
        return pack_mxfp4(qw.q.numpy(), e8m0_codes(qw.scale).numpy()), "MXFP4"
    t = gq.TYPES[qw.kind]
    codes = {k: v.numpy() for k, v in gq.codes(t, qw.scale, qw.zero).items()}
    return pack(t, qw.q.numpy(), codes), qw.kind


def rotary_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row order for llama's q/k: each head's two rotary halves
    interleaved."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, -1).swapaxes(1, 2).reshape(rows.shape)


def dense_types(model, grid: dict | None) -> dict[int, str]:
    """data_ptr of the head / embedding weight -> the dense type (F16, F32) the gguf grid's
    finishing pass rounded it to (its record: grid["types"]), so that it is written in that type
    whatever the model's dtype; a tied pair is written once, as token_embd, in the output's type."""
    types = (grid or {}).get("types") or {}
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    out = {}
    for what, module in (("token_embd", emb), ("output", head)):
        if module is not None and types.get(what) in ("F16", "F32"):
            out[module.weight.data_ptr()] = types[what]
    return out


def save_gguf(model, tokenizer, out_dir, grid: dict | None = None) -> dict:
    import gguf
    check_family(model)
    config = model.config
    family = config.model_type
    arch = getattr(gguf.MODEL_ARCH, architecture(family).gguf)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_dir / FILE), gguf.MODEL_ARCH_NAMES[arch])
    write_hparams(writer, config, model)
    if tokenizer is not None:
        write_tokenizer(writer, tokenizer, config, family)
        tokenizer.save_pretrained(out_dir)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    types, dense = {}, dense_types(model, grid)
    tied = model.get_output_embeddings() is not None and \
        model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    for key, tensor in model.state_dict().items():
        if tied and key.endswith("lm_head.weight"):
            continue
        if "rotary_emb" in key:
            continue
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CrossblockError(f"gguf export: no llama.cpp name for tensor {key} ({family})")
        module = model.get_submodule(key.rpartition(".")[0])
        qw = record_of(module) if key.endswith(".weight") and tensor.dim() == 2 else None
        if tensor.dim() == 1:
            data, kind = tensor.detach().cpu().float().numpy(), "F32"  # llama.cpp keeps vectors in F32
        else:
            data, kind = tensor_data(tensor, qw, dense.get(tensor.data_ptr()) if qw is None else None)
        if family == "llama" and name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config.num_attention_heads if "attn_q" in name else config.num_key_value_heads
            data = rotary_permute(data, heads)
        raw = None if kind in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, kind)
        writer.add_tensor(name, np.ascontiguousarray(data), raw_dtype=raw)  # quantized: (out, bytes per row)
        types[name] = kind
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    counts = {k: sum(v == k for v in types.values()) for k in sorted(set(types.values()))}
    return {"gguf": {"file": FILE, "tensor_types": counts, "tensors": types}}


def write_hparams(writer, config, model):
    import gguf
    rope = getattr(config, "rope_parameters", None) or {}
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_file_type(file_type(model))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def file_type(model) -> int:
    """general.file_type: the type most block linears use (llama.cpp's ftype), F32 if none."""
    import gguf
    kinds = [record_of(m).kind for m in model.modules() if getattr(m, "crossblock_qweight", None) is not None]
    if not kinds:
        return int(gguf.LlamaFileType.ALL_F32)
    kind = max(set(kinds), key=kinds.count)
    if kind == "mxfp4":
        return int(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)  # llama.cpp's only MXFP4 file type
    if kind in ("Q3_K", "Q4_K", "Q5_K"):  # llama.cpp names K-quant files by mixture: _M mixed, _S not
        kind += "_M" if len(set(kinds)) > 1 else "_S"
    return int(getattr(gguf.LlamaFileType, f"MOSTLY_{kind}"))


def write_tokenizer(writer, tokenizer, config, family: str):
    """tokenizer.ggml.*: SentencePiece-style BPE with byte fallback as "llama", byte-level BPE as
    "gpt2" (with merges), read by the gguf package's own vocab classes, as the converter does."""
    import gguf
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        try:
            vocab = gguf.LlamaHfVocab(Path(tmp))
        except (FileNotFoundError, TypeError):
            try:
                vocab = gguf.BpeVocab(Path(tmp))
            except FileNotFoundError:
                raise CrossblockError("gguf export: the tokenizer is neither a byte-fallback BPE (llama) nor a "
                                      "byte-level BPE (gpt2) tokenizer.json") from None
        tokens, scores, types = [], [], []
        for text, score, kind in vocab.all_tokens():
            tokens.append(text if isinstance(text, bytes) else text.encode())
            scores.append(score)
            types.append(kind)
        for i in range(len(tokens), config.vocab_size):  # the converter pads the vocabulary
            tokens.append(f"[PAD{i}]".encode())
            scores.append(-1000.0)
            types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            writer.add_tokenizer_pre(bpe_pre(tokenizer, family))
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(Path(tmp), load_merges=vocab.tokenizer_model == "gpt2", n_vocab=len(tokens))
        special.add_to_gguf(writer, quiet=True)


def bpe_pre(tokenizer, family: str) -> str:
    """tokenizer.ggml.pre of a byte-level BPE: which pre-tokenizer regex llama.cpp splits text
    with before the merges. Qwen -> "qwen2"; a plain ByteLevel pre-tokenizer (GPT-2's regex, e.g.
    SmolLM2) -> "gpt-2"; anything else "default", llama.cpp's own regex, which may split
    differently (then llama.cpp's token ids differ from transformers', hence the warning)."""
    if family.startswith("qwen"):
        return "qwen2"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = json.loads(backend.to_str()).get("pre_tokenizer") if backend is not None else None
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    log.warning("gguf: byte-level BPE with pre-tokenizer %s: written as llama.cpp's \"default\", whose "
                "splitting may differ from this tokenizer's", (pre or {}).get("type"))
    return "default"


def load_gguf(path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A crossblock GGUF folder as a dense transformers model: transformers' GGUF loader, which
    decodes every tensor with the gguf package's dequantizers (float32) and undoes the rotary
    row permutation."""
    from transformers import AutoModelForCausalLM
    check_transformers_reads(Path(path) / FILE)
    model = from_pretrained_exactly(AutoModelForCausalLM, path, str(path), gguf_file=FILE, dtype=dtype or torch.float32)
    return model.to(device).eval()


def check_transformers_reads(file: Path):
    why = why_transformers_cannot_read(file)
    if why:
        raise CrossblockError(f"{file}: {why}; llama.cpp reads it, or evaluate the model quantized with --format fake")


def why_transformers_cannot_read(file: Path) -> str | None:
    """transformers' GGUF reader does not read attention.key_length for the families written here:
    it takes the config class's head_dim (Qwen3: 128) or hidden / heads. A file whose heads are
    otherwise cannot be loaded by it (a shape error): say so instead."""
    import gguf
    from transformers import AutoConfig
    field = gguf.GGUFReader(str(file)).fields
    arch_field = field["general.architecture"]
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode()
    key = field.get(f"{arch}.attention.key_length")
    if key is None:
        return None
    written = int(key.parts[key.data[0]][0])
    config = AutoConfig.from_pretrained(str(file.parent), gguf_file=file.name)
    assumed = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if written != assumed:
        return (f"transformers' GGUF reader cannot load this {arch} file (its head_dim is {written}; "
                f"transformers assumes {assumed})")
    return None
