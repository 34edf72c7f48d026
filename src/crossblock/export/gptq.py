"""GPTQ checkpoints (AutoGPTQ / GPTQModel "gptq" v1 format, loaded by vLLM and by transformers
through optimum + gptqmodel), written and read with plain torch: no kernel package needed.

Per quantized layer, with `in`/`out` its features and G its number of groups:
- qweight int32 (in * bits / 32, out): the integers q, packed along in_features;
- qzeros  int32 (G, out * bits / 32): the zero points, packed along out_features;
- scales  fp16  (G, out);
- g_idx   int32 (in,): the group of each input column (desc_act false: column // group_size).
Packing is a little-endian bit stream in each int32 run: value k of a run sits at bit
k * bits, and for 3-bit a value may straddle two words (32 values in 3 words), which is
the AutoGPTQ 3-bit layout; for 2/4/8 bits it is the usual 32 / bits values per word.

Zero-point convention: v1 stores zero - 1 and every v1 reader adds 1 back, so
Ŵ = scale * (q - (stored + 1)). Symmetric layers (zero = 2**(bits-1)) store 2**(bits-1) - 1,
e.g. 7 (0x77777777) for 4-bit. A zero point of 0 has no v1 encoding (it would be -1), so
asymmetric layers with a zero-point of 0 are refused.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import CrossblockError
from ..quant.grid import QuantizedWeight, num_groups
from .common import layer_shape, warn_if_scales_round, write_quantization_config
from .formats import FORMATS, Format, check_groups, check_whole_words, refuse_act_scheme, values_per_word_run
from .schema import check_stored, is_int, need

FMT = "gptq"


@FORMATS.register(FMT)
class Gptq(Format):
    bits = (2, 3, 4, 8)
    packed = True
    quant_method = FMT
    mixed = "none"  # quantize_config.json holds one bits/group_size/sym
    loading = """GPTQ v1 layout (`qweight`, `qzeros`, `scales`, `g_idx`; `quantization_config` in config.json).

```bash
vllm serve {out} --quantization gptq
```

```python
import crossblock
model = crossblock.load("{out}")  # dense, exactly the evaluated weights (transformers needs gptqmodel)
```"""  # the model card's "Loading" section

    def stored_scale_dtype(self, save_dtype):
        return torch.float16  # what transformers' GPTQConfig and vLLM read

    def accepts(self, bits, group_size, sym, in_features, out_features, has_conv1d, act_scheme, fused_experts=()):
        check_groups(FMT, group_size, in_features)
        refuse_act_scheme(FMT, act_scheme)
        refuse_fused_experts(fused_experts)
        check_whole_words(bits, "in_features", in_features)
        check_whole_words(bits, "out_features", out_features)

    def check_layer(self, name, qweight):
        check_zero_points(name, qweight)

    def check_model(self, model, layers):
        refuse_fused_experts([n for n, m in model.named_modules() if getattr(m, "crossblock_qexperts", None)])
        super().check_model(model, layers)
        uniform_settings(layers)
        warn_if_scales_round(FMT, layers, torch.float16)

    def layer_tensors(self, name, qweight, dtype, act_scheme):
        return gptq_tensors(qweight)

    def write(self, model, tokenizer, out_dir, act_scheme, grid=None):
        refuse_act_scheme(FMT, act_scheme)
        super().write(model, tokenizer, out_dir, act_scheme, grid)

    def write_config(self, folder, contents, act_scheme):
        settings = sorted(set(contents.settings.values()))
        if len(settings) != 1:
            raise CrossblockError(f"gptq export needs one bits/group_size/sym setting for all layers, "
                                  f"found {len(settings)}: {settings}; use compressed-tensors")
        write_quantization_config(folder, gptq_config(*settings[0]))

    def read(self, quantization, tensors, layout):
        return read_gptq(quantization, tensors, layout)


def refuse_fused_experts(fused_experts):
    if fused_experts:
        raise CrossblockError(f"gptq export cannot store fused MoE experts ({fused_experts[0]} and "
                              f"{len(fused_experts) - 1} more): transformers' GPTQ loader replaces only nn.Linear "
                              "layers, so it cannot load them; use compressed-tensors or fake")


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned `bits`-bit integers along the last dim into int32 words (bit stream)."""
    run = values_per_word_run(bits)
    words = run * bits // 32
    v = values.to(torch.int64).reshape(*values.shape[:-1], -1, run)
    out = torch.zeros(*v.shape[:-1], words + 1, dtype=torch.int64, device=values.device)
    for k in range(run):
        word, shift = divmod(k * bits, 32)
        out[..., word] |= v[..., k] << shift
        if shift + bits > 32:  # the value straddles into the next word
            out[..., word + 1] |= v[..., k] >> (32 - shift)
    out = out[..., :words] & 0xFFFFFFFF
    out = torch.where(out >= 2 ** 31, out - 2 ** 32, out)  # same bits, as a signed int32
    return out.to(torch.int32).reshape(*values.shape[:-1], -1)


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of pack_int32: int64 values in [0, 2**bits - 1] along the last dim."""
    run = values_per_word_run(bits)
    words = run * bits // 32
    p = packed.to(torch.int64) & 0xFFFFFFFF
    p = p.reshape(*packed.shape[:-1], -1, words)
    p = torch.cat([p, torch.zeros_like(p[..., :1])], dim=-1)
    mask = 2 ** bits - 1
    values = []
    for k in range(run):
        word, shift = divmod(k * bits, 32)
        value = p[..., word] >> shift
        if shift + bits > 32:
            value = value | (p[..., word + 1] << (32 - shift))
        values.append(value & mask)
    return torch.stack(values, dim=-1).reshape(*packed.shape[:-1], -1)


def group_index(in_features: int, group_size: int) -> torch.Tensor:
    if group_size == -1:
        return torch.zeros(in_features, dtype=torch.int32)
    return (torch.arange(in_features) // group_size).to(torch.int32)


def gptq_tensors(qweight: QuantizedWeight) -> dict[str, torch.Tensor]:
    q = qweight.q.cpu()
    return {
        "qweight": pack_int32(q, qweight.bits).t().contiguous(),
        "qzeros": pack_int32(qweight.zero.cpu().t().to(torch.int64) - 1, qweight.bits),  # v1: zero - 1
        "scales": qweight.scale.cpu().t().to(torch.float16).contiguous(),
        "g_idx": group_index(q.shape[1], qweight.group_size),
    }


def uniform_settings(layers: dict):
    """GPTQ configs hold one (bits, group_size, sym) for the whole model."""
    settings = sorted({(qw.bits, qw.group_size, qw.sym) for _, qw in layers.values()})
    if len(settings) > 1:
        raise CrossblockError(f"gptq export needs one bits/group_size/sym setting for all layers, "
                              f"found {len(settings)}: {settings}; use compressed-tensors")


def check_zero_points(name: str, qweight: QuantizedWeight):
    if not qweight.sym and bool((qweight.zero < 1).any()):
        count = int((qweight.zero < 1).sum())
        raise CrossblockError(f"gptq export (v1 format stores zero - 1) cannot store a zero point of 0: "
                              f"layer {name} has {count}; quantize symmetrically or export compressed-tensors")


def gptq_config(bits: int, group_size: int, sym: bool) -> dict:
    """config.json's quantization_config, as transformers' GPTQConfig and vLLM read it."""
    return {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": False,
            "sym": sym, "checkpoint_format": "gptq"}


def save_gptq(model: nn.Module, tokenizer, out_dir: str | os.PathLike):
    """Write `model` as a GPTQ v1 checkpoint (qweight / qzeros / scales / g_idx)."""
    Gptq().write(model, tokenizer, out_dir, None)


# -- reading ---------------------------------------------------------------------------------

def read_layer(tensors: dict, name: str, config: dict, shape: tuple[int, int]) -> QuantizedWeight:
    """One layer's QuantizedWeight from its checkpoint tensors (removed from `tensors`), each
    checked against what `gptq_tensors` writes for a layer of `shape` (out, in)."""
    bits, group_size, sym = config.get("bits"), config.get("group_size", -1), config.get("sym", True)
    if config.get("checkpoint_format", "gptq") != "gptq":
        raise CrossblockError(f"gptq folder has checkpoint_format {config['checkpoint_format']!r}; "
                              f"crossblock reads the v1 'gptq' format")
    need(is_int(bits) and bits in Gptq.bits, "gptq quantization_config", f"bits must be one of 2, 3, 4, 8, got {bits!r}")
    need(is_int(group_size) and (group_size == -1 or group_size > 0), "gptq quantization_config",
         f"group_size must be -1 or a positive integer, got {group_size!r}")
    out_f, in_f = shape
    groups = num_groups(in_f, group_size)
    check_stored("gptq", name, tensors, {  # the module docstring's layout
        "qweight": ((-(-in_f * bits // 32), out_f), torch.int32), "qzeros": ((groups, -(-out_f * bits // 32)), torch.int32),
        "scales": ((groups, out_f), "float"), **({"g_idx": ((in_f,), torch.int32)} if f"{name}.g_idx" in tensors else {})},
        f" for {bits}-bit integers of the layer's {out_f}x{in_f} weight, group_size {group_size}")
    qweight = tensors.pop(f"{name}.qweight")
    q = unpack_int32(qweight.t(), bits)
    zero = unpack_int32(tensors.pop(f"{name}.qzeros"), bits).t().float() + 1  # v1: stored zero - 1
    scale = tensors.pop(f"{name}.scales").t().float()
    g_idx = tensors.pop(f"{name}.g_idx", None)
    if g_idx is not None and not torch.equal(g_idx.to(torch.int32), group_index(q.shape[1], group_size)):
        raise CrossblockError(f"gptq layer {name} uses act-order (a permuted g_idx); crossblock reads desc_act false")
    return QuantizedWeight(q.to(torch.uint8), scale, zero, bits, group_size, bool(sym))


def read_gptq(quantization_config: dict, tensors: dict, layout: nn.Module) -> dict[str, QuantizedWeight]:
    """Integer weights of every layer the checkpoint holds GPTQ tensors of; `layout`: the
    model's module tree (each layer's shape)."""
    from ..model.adapter import is_linear
    names = sorted({key.rpartition(".")[0] for key in tensors if key.endswith((".qweight", ".qzeros", ".scales"))})
    linears = dict((n, m) for n, m in layout.named_modules() if is_linear(m))
    for name in names:
        need(name in linears, f"gptq layer {name}", "not a linear layer of the model")
    return {name: read_layer(tensors, name, quantization_config, layer_shape(linears[name])) for name in names}
