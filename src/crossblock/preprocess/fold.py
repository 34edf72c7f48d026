"""Which layer feeds which linear layers, per architecture, and the exact fold of a per-channel
scale through such a pair: the source's output channel c is divided by s_c and the consuming
layers' input column c multiplied by s_c, so the block computes the same function.

Sources are the pre-norms (`norm_folds` of model/architectures.py, the one table of families)
and, where the path between is linear in each channel, a linear layer (`linear_folds`): Llama-style MLPs compute down(act(gate) * up), so up's output
channel scales down's input channel; OPT's fc2 sees relu(fc1), and relu(x / s) = relu(x) / s
for s > 0; attention outputs are softmax(QKᵀ)·V per head, linear in V, so v_proj's output
channel scales o_proj's input channel. With grouped-query attention one value channel feeds
the same channel of every query head in its group (`consumer_channels`). The tables are
explicit; any other architecture is refused rather than silently left alone.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CrossblockError
from ..model.adapter import is_linear
from ..model.architectures import architecture, families
from ..quant.linear import weight_of

def fold_pairs(model: nn.Module, block: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The (source, consuming linears) pairs of `model`'s blocks, norms first; CrossblockError
    if unknown."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    arch = architecture(kind)
    if not arch.norm_folds:
        raise CrossblockError(f"CFP does not know which norms feed which layers in {kind!r} models "
                              f"(known: {', '.join(families('cfp'))}); run without --cfp")
    if kind == "opt" and not model.config.do_layer_norm_before:
        raise CrossblockError("CFP cannot fold into OPT models with do_layer_norm_before=False "
                              "(the norms follow attention and MLP); run without --cfp")
    if kind == "opt" and model.config.activation_function != "relu":
        raise CrossblockError("CFP folds fc1 -> fc2 only through relu; run without --cfp")
    pairs = arch.norm_folds + arch.linear_folds
    for norm, linears in pairs:
        for name in (norm, *linears):
            try:
                block.get_submodule(name)
            except AttributeError:
                raise CrossblockError(f"CFP expects {name} in every block of this {kind!r} model, "
                                      "but it is missing; run without --cfp") from None
        if getattr(block.get_submodule(norm), "weight", None) is None:
            raise CrossblockError(f"CFP cannot fold into {norm}: it has no weight to scale; run without --cfp")
    # a run-time rotation between source and consumers (rotate's down_proj Hadamard) mixes channels,
    # so a per-channel scale would no longer cancel across it
    return tuple((source, linears) for source, linears in pairs
                 if not any(hasattr(block.get_submodule(c), "crossblock_input_transform") for c in linears))


def consumer_channels(model: nn.Module, source_width: int, consumer_width: int) -> torch.Tensor | None:
    """For each input channel of the consumers, the source channel feeding it; None when they
    are the same. Only grouped-query attention differs: query head h reads value head
    h // (heads / kv_heads), channel by channel."""
    if source_width == consumer_width:
        return None
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    head_dim = consumer_width // heads
    if heads % kv_heads or kv_heads * head_dim != source_width or heads * head_dim != consumer_width:
        raise CrossblockError(f"CFP cannot map {consumer_width} attention output channels onto "
                              f"{source_width} value channels ({heads} heads, {kv_heads} kv heads); run without --cfp")
    col = torch.arange(consumer_width)
    return col // head_dim // (heads // kv_heads) * head_dim + col % head_dim


@torch.no_grad()
def fold_scale(block: nn.Module, source: str, linears: tuple[str, ...], s: torch.Tensor, offset: float = 0.0,
               channels: torch.Tensor | None = None):
    """X' = X / s out of `source` (a norm or a linear layer), W' = W · s in its consumers (in place);
    `channels` maps the consumers' input channels to the source's (consumer_channels)."""
    n = block.get_submodule(source)
    s = s.to(n.weight.device, torch.float32)
    if is_linear(n):
        w = weight_of(n)  # (out, in): output channel c is row c
        w.copy_((w.float() / s[:, None]).to(w.dtype))
    else:
        n.weight.copy_(((n.weight.float() + offset) / s - offset).to(n.weight.dtype))
    if getattr(n, "bias", None) is not None:
        n.bias.copy_((n.bias.float() / s).to(n.bias.dtype))
    s_in = s if channels is None else s[channels.to(s.device)]
    for name in linears:
        w = weight_of(block.get_submodule(name))  # (out, in) view sharing storage
        w.copy_((w.float() * s_in).to(w.dtype))
