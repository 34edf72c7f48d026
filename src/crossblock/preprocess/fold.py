"""Which norm feeds which linear layers, per architecture, and the exact fold of a per-channel
scale through such a pair: the norm's output channel c is divided by s_c and the consuming
layers' input column c multiplied by s_c, so the block computes the same function.

Only pre-norm blocks whose norm output goes nowhere but the listed layers can be folded, so
the table is explicit; any other architecture is refused rather than silently left alone.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CrossblockError
from ..quant.linear import weight_of

_LLAMA = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
          ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
FOLDS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
    "gemma": _LLAMA,
    "opt": (("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
            ("final_layer_norm", ("fc1",))),
    "gpt2": (("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",))),  # Conv1D: weight is (in, out)
}
# Gemma's RMSNorm multiplies by (1 + weight), so the fold acts on 1 + weight.
NORM_OFFSET = {"gemma": 1.0}


def fold_pairs(model: nn.Module, block: nn.Module) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """The (norm, consuming linears) pairs of `model`'s blocks; CrossblockError if unknown."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    if kind not in FOLDS:
        raise CrossblockError(f"CFP does not know which norms feed which layers in {kind!r} models "
                              f"(known: {', '.join(FOLDS)}); run without --cfp")
    if kind == "opt" and not model.config.do_layer_norm_before:
        raise CrossblockError("CFP cannot fold into OPT models with do_layer_norm_before=False "
                              "(the norms follow attention and MLP); run without --cfp")
    pairs = FOLDS[kind]
    for norm, linears in pairs:
        for name in (norm, *linears):
            try:
                block.get_submodule(name)
            except AttributeError:
                raise CrossblockError(f"CFP expects {name} in every block of this {kind!r} model, "
                                      "but it is missing; run without --cfp") from None
        if getattr(block.get_submodule(norm), "weight", None) is None:
            raise CrossblockError(f"CFP cannot fold into {norm}: it has no weight to scale; run without --cfp")
    return pairs


@torch.no_grad()
def fold_scale(block: nn.Module, norm: str, linears: tuple[str, ...], s: torch.Tensor, offset: float = 0.0):
    """X' = X / s after `norm`, W' = W · s in its consumers (in place)."""
    n = block.get_submodule(norm)
    s = s.to(n.weight.device, torch.float32)
    n.weight.copy_(((n.weight.float() + offset) / s - offset).to(n.weight.dtype))
    if getattr(n, "bias", None) is not None:
        n.bias.copy_((n.bias.float() / s).to(n.bias.dtype))
    for name in linears:
        w = weight_of(block.get_submodule(name))  # (out, in) view sharing storage
        w.copy_((w.float() * s).to(w.dtype))
