"""Rotate an FP model's hidden spaces with orthogonal matrices (QuaRot-style), function unchanged.

nn.Linear computes y = x Wᵀ + b, so for orthogonal Q (Q Qᵀ = I):
- a layer that READS a rotated input x Q keeps its output if W ← W Q;
- a layer that WRITES a rotated output y Q does so if W ← Qᵀ W, b ← Qᵀ b.
Steps, in float64, each weight written back once in the model's dtype:
1. Norms: RMSNorm(x)·g feeds q, k, v (input_layernorm), gate, up (post_attention_layernorm) and
   lm_head (the final norm): W ← W diag(g), then g ← 1 (gemma multiplies by 1 + g: g ← 0).
2. Residual stream, one Q: embeddings E ← E Q; readers q, k, v, gate, up, lm_head W ← W Q;
   writers o_proj, down_proj W ← Qᵀ W. A weight-free RMSNorm commutes with Q, since
   RMSNorm(x Q) = x Q / rms(x Q) = RMSNorm(x) Q (‖x Q‖ = ‖x‖), so every block sees its input
   rotated and writes its output rotated. Qwen3's q_norm/k_norm act on q and k, which are
   unchanged. A tied lm_head stays tied when the final norm's g is 1 (E Q on both sides), else
   it is untied (the embedding has no g to absorb) and the info says so.
3. Per head, values: attention output = softmax(·)·V is linear in V, so V's head h may be
   rotated by Q_h (v_proj rows: W ← Q_hᵀ W) and undone by o_proj's columns of every query head
   that reads value head h (W ← W Q_h); with grouped-query attention that is the same Q_h.
4. Online, down_proj: its input a = act(gate)·up has no weight before it, so x ↦ x H runs at
   run time (online.py) and down_proj absorbs it, W ← W H. With a randomized Hadamard D H the
   ±1 diagonal D is folded offline into up_proj's rows (act(g)·(u D) = (act(g)·u) D), so the
   run-time transform is the plain, seed-free Hadamard.
Randomized Hadamard matrices (hadamard.py) spread outliers over all channels: the activations
that per-token quantizers see lose their peaks, which is what makes W4A4 usable.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import CrossblockError
from ..model.adapter import find_blocks
from ..model.architectures import architecture, families
from .hadamard import factors, random_orthogonal, random_signs, randomized_hadamard
from .online import OnlineRotation, attach_input_transform, rebuild_transforms, record_transforms  # noqa: F401

KINDS = ("hadamard", "random-orthogonal")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # qwen3: per head on q and k, after the readers


def family_of(model: nn.Module) -> str:
    """The model_type if rotate supports it; CrossblockError naming it otherwise."""
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    arch = architecture(kind)
    if not arch.rotate:
        why = f" ({arch.why_not_rotate})" if arch.why_not_rotate else ""
        raise CrossblockError(f"rotate does not support {kind!r} models{why}; supported: {', '.join(families('rotate'))}")
    return kind


def _check_block(block: nn.Module, family: str, hidden: int):
    """Refuse a block whose layout differs from the one the math above assumes."""
    for name in (*LINEARS, *NORMS):
        try:
            m = block.get_submodule(name)
        except AttributeError:
            raise CrossblockError(f"rotate expects {name} in every block of this {family!r} model") from None
        if name in NORMS and (getattr(m, "weight", None) is None or "RMSNorm" not in type(m).__name__):
            raise CrossblockError(f"rotate needs {name} to be an RMSNorm with a weight, got {type(m).__name__}")
        if name in LINEARS and not isinstance(m, nn.Linear):
            raise CrossblockError(f"rotate expects {name} to be an nn.Linear, got {type(m).__name__}")
    allowed = {*NORMS, *(HEAD_NORMS if family == "qwen3" else ())}
    extra = [n for n, m in block.named_modules() if "Norm" in type(m).__name__ and n not in allowed]
    if extra:
        raise CrossblockError(f"rotate cannot rotate through the norms {', '.join(extra)} of this {family!r} model")
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
        if block.get_submodule(name).in_features != hidden:
            raise CrossblockError(f"rotate expects {name} to read the {hidden}-wide residual stream")


def orthogonal(n: int, kind: str, seed: int) -> tuple[torch.Tensor, dict]:
    """(n x n float64 orthogonal matrix, its description): a randomized Hadamard D H (kind
    "hadamard", random orthogonal where no Hadamard of order n is known) or a random orthogonal."""
    if kind == "hadamard":
        q, _ = randomized_hadamard(n, seed)
        f = factors(n)
    else:
        q, f = random_orthogonal(n, seed), factors(n, random=True)
    return q, {"size": n, "kind": f.kind, "base": f.base, "random_signs": kind == "hadamard"}


def _write(param: torch.Tensor, value: torch.Tensor):
    param.copy_(value.to(param.device, param.dtype))


def _untie(model: nn.Module, head: nn.Module):
    head.weight = nn.Parameter(head.weight.detach().clone())
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False


@torch.no_grad()
def rotate_model(model: nn.Module, *, seed: int = 0, online_down_proj: bool = True, kind: str = "hadamard") -> dict:
    """Rotate `model` (FP, in place) as the module docstring says; returns the JSON-able record
    for crossblock.json. The online transforms are attached to the down_proj layers (online.py)."""
    if kind not in KINDS:
        raise CrossblockError(f"unknown rotation kind {kind!r} (known: {', '.join(KINDS)})")
    family = family_of(model)
    prefix, blocks = find_blocks(model)
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    final = getattr(getattr(model, "model", None), "norm", None)
    if final is None or "RMSNorm" not in type(final).__name__ or head is None:
        raise CrossblockError(f"rotate expects model.norm (an RMSNorm) and lm_head in this {family!r} model")
    hidden = embed.weight.shape[1]
    for block in blocks:
        _check_block(block, family, hidden)
    if any(hasattr(m, "crossblock_input_transform") for m in model.modules()):
        raise CrossblockError("this model is already rotated")
    offset = architecture(family).norm_offset  # the norm multiplies by offset + weight
    heads = model.config.num_attention_heads
    kv_heads = getattr(model.config, "num_key_value_heads", None) or heads
    gen = torch.Generator().manual_seed(seed)
    draw = lambda: int(torch.randint(2 ** 31 - 1, (1,), generator=gen))  # noqa: E731  one seed per matrix

    q, residual = orthogonal(hidden, kind, draw())
    gain = lambda norm: norm.weight.double().cpu() + offset  # noqa: E731
    g_final = gain(final)
    tied = head.weight is embed.weight
    untie = tied and not torch.equal(g_final, torch.ones_like(g_final))
    if untie:
        _untie(model, head)
    _write(embed.weight, embed.weight.double().cpu() @ q)
    if not tied or untie:
        _write(head.weight, head.weight.double().cpu() * g_final @ q)
    final.weight.fill_(1 - offset)

    online, heads_info = [], None
    for i, block in enumerate(blocks):
        attn, mlp = block.self_attn, block.mlp
        read = lambda lin, g: lin.weight.double().cpu() * g @ q  # noqa: E731  W diag(g) Q
        g1, g2 = gain(block.input_layernorm), gain(block.post_attention_layernorm)
        for lin in (attn.q_proj, attn.k_proj):
            _write(lin.weight, read(lin, g1))
        head_dim = attn.v_proj.out_features // kv_heads
        if kv_heads * head_dim != attn.v_proj.out_features or heads * head_dim != attn.o_proj.in_features:
            raise CrossblockError(f"rotate cannot split v_proj/o_proj of block {i} into {kv_heads}/{heads} heads")
        per_head = [orthogonal(head_dim, kind, draw()) for _ in range(kv_heads)]
        heads_info = {**per_head[0][1], "count": kv_heads, "distinct": "per value head and block"}
        v_rot = torch.block_diag(*[m for m, _ in per_head])
        # query head h reads value head h // (heads / kv_heads)
        o_rot = torch.block_diag(*[per_head[h // (heads // kv_heads)][0] for h in range(heads)])
        _write(attn.v_proj.weight, v_rot.T @ read(attn.v_proj, g1))
        if attn.v_proj.bias is not None:
            _write(attn.v_proj.bias, v_rot.T @ attn.v_proj.bias.double().cpu())
        _write(attn.o_proj.weight, q.T @ attn.o_proj.weight.double().cpu() @ o_rot)
        if attn.o_proj.bias is not None:
            _write(attn.o_proj.bias, q.T @ attn.o_proj.bias.double().cpu())

        _write(mlp.gate_proj.weight, read(mlp.gate_proj, g2))
        up, down = read(mlp.up_proj, g2), q.T @ mlp.down_proj.weight.double().cpu()
        if online_down_proj:
            f = factors(down.shape[1], random=kind == "random-orthogonal")
            rotation = OnlineRotation(f.size, f.kind, f.base, seed)
            if kind == "hadamard":  # D into up_proj's rows, H at run time
                signs = random_signs(f.size, draw())
                up = signs[:, None] * up
                if mlp.up_proj.bias is not None:
                    _write(mlp.up_proj.bias, signs * mlp.up_proj.bias.double().cpu())
                down = down * signs
            down = down @ rotation.matrix()
            attach_input_transform(mlp.down_proj, rotation)
            online.append((f"{prefix}.{i}.mlp.down_proj", rotation.spec()))
        _write(mlp.up_proj.weight, up)
        _write(mlp.down_proj.weight, down)
        if mlp.down_proj.bias is not None:
            _write(mlp.down_proj.bias, q.T @ mlp.down_proj.bias.double().cpu())
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            norm.weight.fill_(1 - offset)

    return {"family": family, "kind": kind, "seed": seed, "residual": residual, "heads": heads_info,
            "online": {"down_proj": online[0][1] if online else None, "layers": [n for n, _ in online]},
            "lm_head": ("untied" if untie else "tied") if tied else "separate",
            "norms": f"folded into their readers; weights set to {1 - offset:g}"}
