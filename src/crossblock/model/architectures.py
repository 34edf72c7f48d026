"""What crossblock knows about each model family, in one table, by transformers' `model_type`.

Quantization needs none of it: blocks and their linear layers are discovered generically
(adapter.py), so any causal LM whose decoder is a list of identical blocks quantizes. The table
holds what the stages that rewrite the FP model and the GGUF writer must know:
- `norm_folds`, `linear_folds`: CFP's channel scaling, (source, the linears reading it) pairs:
  a pre-norm's weight, or a linear layer whose output reaches the next linear channel by channel
  (Llama-style MLPs compute down(act(gate) * up), so up's output rows fold into down's columns).
- `norm_offset`: the norm multiplies by offset + weight (Gemma: 1 + weight).
- `rotate`: QuaRot-style rotations hold (RMSNorm pre-norms, the Llama block's linears).
- `gguf`: llama.cpp's architecture name (gguf.MODEL_ARCH) for the GGUF export.
"""
from __future__ import annotations

from dataclasses import dataclass

Folds = tuple[tuple[str, tuple[str, ...]], ...]

_LLAMA_NORMS: Folds = (("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                       ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")))
_GATED_MLP: Folds = (("mlp.up_proj", ("mlp.down_proj",)), ("self_attn.v_proj", ("self_attn.o_proj",)))
_SANDWICH = "its norms after o_proj and down_proj scale the rotated residual channel by channel"


@dataclass(frozen=True)
class Architecture:
    norm_folds: Folds = ()
    linear_folds: Folds = ()
    norm_offset: float = 0.0
    rotate: bool = False
    why_not_rotate: str | None = None
    gguf: str | None = None


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture(_LLAMA_NORMS, _GATED_MLP, rotate=True, gguf="LLAMA"),
    "qwen2": Architecture(_LLAMA_NORMS, _GATED_MLP, rotate=True, gguf="QWEN2"),
    # qwen3's q_norm / k_norm act per head after q_proj / k_proj: input channel scales fold through
    "qwen3": Architecture(_LLAMA_NORMS, _GATED_MLP, rotate=True, gguf="QWEN3"),
    "mistral": Architecture(_LLAMA_NORMS, _GATED_MLP, rotate=True),
    "gemma": Architecture(_LLAMA_NORMS, _GATED_MLP, norm_offset=1.0, rotate=True),
    "gemma2": Architecture(why_not_rotate=_SANDWICH),
    "gemma3": Architecture(why_not_rotate=_SANDWICH),
    "gemma3_text": Architecture(why_not_rotate=_SANDWICH),
    "opt": Architecture((("self_attn_layer_norm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                         ("final_layer_norm", ("fc1",))),
                        (("fc1", ("fc2",)), ("self_attn.v_proj", ("self_attn.out_proj",)))),
    # Conv1D (weight (in, out)); gelu is not scale-equivariant and q, k, v share one Conv1D
    "gpt2": Architecture((("ln_1", ("attn.c_attn",)), ("ln_2", ("mlp.c_fc",)))),
}


def architecture(model_type: str) -> Architecture:
    """The family's entry; an empty one (nothing known beyond generic discovery) if absent."""
    return ARCHITECTURES.get(model_type, Architecture())


def families(what: str) -> list[str]:
    """The families that support `what`: "cfp", "rotate" or "gguf"."""
    has = {"cfp": lambda a: bool(a.norm_folds), "rotate": lambda a: a.rotate, "gguf": lambda a: a.gguf is not None}
    return [name for name, arch in ARCHITECTURES.items() if has[what](arch)]


def support_row() -> str:
    """The README's support-matrix row of what this table enables (a test keeps them equal)."""
    return ("| families | quantization: any (generic block discovery); `--rotate`: " + ", ".join(families("rotate"))
            + "; `--cfp`: " + ", ".join(families("cfp")) + "; `--format gguf`: " + ", ".join(families("gguf"))
            + " (by `model_type`, [model/architectures.py](src/crossblock/model/architectures.py)) |")
