"""Find the decoder blocks of any HF causal LM and run them standalone on stored inputs.

Discovery is generic: the decoder is the largest nn.ModuleList of identical modules that
contain linear layers (nn.Linear, or GPT-2's Conv1D). Block inputs and the keyword arguments
transformers passes to each block (attention mask, rotary position embeddings, ...) are
captured by replacing every block's forward with a recorder for one pass, so capture costs
embeddings only, however large the model.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import CrossblockError
from ..quant.experts import QuantExperts, expert_params, is_fused_experts


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    best, best_size = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        if not any(is_linear(m) or getattr(m, "wraps_linear", False) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        lists = [f"{n} ({len(m)} x {type(m[0]).__name__})" for n, m in model.named_modules()
                 if isinstance(m, nn.ModuleList) and len(m)]
        raise CrossblockError(
            f"unsupported architecture {type(model).__name__}: found no list of decoder blocks "
            f"containing linear layers (module lists found: {', '.join(lists) or 'none'})")
    return best


# A MoE block's router: its last name part ends in "gate" or "router" (mlp.gate, shared_expert_gate);
# gate_proj / gate_up_proj do not match. It picks experts, so it stays in full precision.
ROUTER = re.compile(r"(gate|router)$")


def is_moe_block(block: nn.Module) -> bool:
    """Fused experts (wrapped or not), or a ModuleList named `experts` (the unfused form)."""
    return any(bool(expert_params(m)) or isinstance(m, QuantExperts) or
               (isinstance(m, nn.ModuleList) and n.rpartition(".")[2] == "experts")
               for n, m in block.named_modules())


def is_router(name: str, moe: bool) -> bool:
    return moe and bool(ROUTER.search(name.rpartition(".")[2]))


def block_linears(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's linear layers that are quantized: all but a MoE block's routers."""
    moe = is_moe_block(block)
    return [(n, m) for n, m in block.named_modules() if is_linear(m) and not is_router(n, moe)]


def block_experts(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's fused experts modules (3-D expert parameters, quant/experts.py)."""
    return [(n, m) for n, m in block.named_modules() if is_fused_experts(m)]


def skip_matches(pattern: str, full: str, relative: str) -> bool:
    """Whether a skip pattern names the layer `full` (block-relative: `relative`): a substring of
    the block-relative name (q_proj, mlp), whole dotted parts of the full name (model.layers.0,
    layers.0.mlp, model.layers.0.self_attn.q_proj: the names crossblock.json lists), or a glob
    (* ? [...]) matching the full name or a dotted tail of it (layers.0.*, *.mlp.*, model.layers.1?.*).
    A name as the report's "unquantized" list gives it, with ".weight", names its layer."""
    if any(c in pattern for c in "*?["):
        parts = full.split(".")
        return any(fnmatch.fnmatchcase(".".join(parts[k:]), pattern) for k in range(len(parts)))
    return pattern in relative or f".{pattern.removesuffix('.weight')}." in f".{full}."


def is_skipped(skip, prefix: str, i: int, name: str) -> bool:
    """Whether layer `name` of block i (under `prefix`) is left in full precision by `skip`."""
    full = ".".join(part for part in (prefix, str(i), name) if part)
    return any(skip_matches(pattern, full, name) for pattern in skip)


def refuse_unmatched_skip(model: nn.Module, skip):
    """A skip pattern that names no layer crossblock would quantize is a mistake: refused."""
    if not skip:
        return
    prefix, blocks = find_blocks(model)
    names = [(i, n) for i, b in enumerate(blocks) for n, _ in [*block_linears(b), *block_experts(b)]]
    for pattern in skip:
        if not any(is_skipped([pattern], prefix, i, n) for i, n in names):
            example = f"{prefix}.0.{names[0][1]}" if names else f"{prefix}.0"
            raise CrossblockError(f"skip pattern {pattern!r} matches no quantized layer: give full names as "
                                  f"crossblock.json lists them ({example}, or a block {prefix}.0), block-relative "
                                  f"names ({names[0][1] if names else 'q_proj'}), or globs ({prefix}.0.*)")


def quantized_params(module: nn.Module) -> set[str]:
    """Names of the module's own parameters that a finished quantization replaced by integers."""
    done = set(getattr(module, "crossblock_qexperts", None) or ())
    return done | ({"weight"} if getattr(module, "crossblock_qweight", None) is not None else set())


def unquantized_weights(model: nn.Module, skip=()) -> list[dict]:
    """Every parameter of the decoder blocks left in full precision, with why (nothing is
    skipped silently): skip pattern, router, bias, norm, unsupported shape."""
    prefix, blocks = find_blocks(model)
    return [w for i, block in enumerate(blocks) for w in block_unquantized(prefix, i, block, skip)]


def block_unquantized(prefix: str, i: int, block: nn.Module, skip=()) -> list[dict]:
    """unquantized_weights of block i alone (the low-memory path holds one block at a time)."""
    left = []
    moe = is_moe_block(block)
    for mname, module in block.named_modules():
        done = quantized_params(module)
        for pname, p in module.named_parameters(recurse=False):
            if pname in done:
                continue
            if is_skipped(skip, prefix, i, mname):
                why = "skip pattern"
            elif is_router(mname, moe):
                why = "router"
            elif pname.endswith("bias"):
                why = "bias"
            elif "norm" in type(module).__name__.lower() or "norm" in mname.rpartition(".")[2]:
                why = "norm"
            elif p.dim() == 3 and getattr(module, "is_transposed", False):
                why = "unsupported shape (transposed experts)"
            else:
                why = "unsupported shape"
            left.append({"name": f"{prefix}.{i}.{mname}.{pname}".replace("..", "."), "shape": list(p.shape),
                         "why": why})
    return left


def set_submodule(root: nn.Module, name: str, module: nn.Module):
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def to_device(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def block_output(out):
    """Some blocks return a tensor, others a tuple whose first item is the hidden state."""
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass
class BlockCall:
    """What transformers passes to one block besides the hidden states (captured at batch 1,
    so every tensor broadcasts over any batch size)."""
    args: tuple
    kwargs: dict

    def __call__(self, block: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        dev = hidden.device
        return block_output(block(hidden, *to_device(self.args, dev), **to_device(self.kwargs, dev)))


class _Stop(Exception):
    pass


@torch.no_grad()
def capture(model: nn.Module, input_ids: torch.Tensor, batch_size: int = 8, empty=torch.empty
            ) -> tuple[torch.Tensor, list[BlockCall]]:
    """Inputs of block 0 for every sequence (float32, CPU) and one BlockCall per block.
    `empty(shape)` allocates the result (a chain store's, so it never sits in RAM twice)."""
    _, blocks = find_blocks(model)
    calls: list[BlockCall | None] = [None] * len(blocks)
    hidden: list[torch.Tensor] = []  # the batch-1 probe's, then one slice of `out` per batch
    out = None

    def recorder(i):
        def forward(hidden_states, *args, **kwargs):
            if calls[i] is None:
                kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "layer_past")}
                calls[i] = BlockCall(to_device(args, "cpu"), to_device(kwargs, "cpu"))
            if i == 0:
                hidden.append(hidden_states.detach().float().cpu())
            if i == len(blocks) - 1:
                raise _Stop
            return hidden_states
        return forward

    device = next(model.parameters()).device
    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        # Batch 1 first, so that the recorded masks broadcast over any batch size.
        for start in [None, *range(0, len(input_ids), batch_size)]:
            ids = input_ids[:1] if start is None else input_ids[start:start + batch_size]
            try:
                model(input_ids=ids.to(device), use_cache=False)
            except _Stop:
                pass
            if start is not None:
                h = hidden.pop()
                out = empty((len(input_ids), *h.shape[1:])) if out is None else out
                out[start:start + len(h)] = h
    finally:
        for block in blocks:
            del block.forward
    return out, calls
