"""What crossblock reads from disk is checked before it is used: a corrupt or hostile
crossblock.json, quantization config or tensor file is refused in one line (CrossblockError)
instead of crashing, allocating without bound, or quietly giving a wrong model."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from ..errors import CrossblockError
from ..quant.grid import QuantizedWeight, num_groups


def need(ok: bool, where, what: str):
    if not ok:
        raise CrossblockError(f"{where}: {what}")


def is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def read_json(path) -> dict:
    """A JSON object from `path`, or one line saying why not."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CrossblockError(f"{path}: not a readable JSON file ({first})") from None
    need(isinstance(data, dict), path, f"expected a JSON object, found {type(data).__name__}")
    return data


def check_activations(recorded, where, quantizable: set[str]) -> dict | None:
    """crossblock.json's `activations`: the scheme, and per layer [step, zero point] (static),
    [global scale] (nvfp4) or null (dynamic), only on layers crossblock quantizes (the decoder
    blocks' linears). A float type's scheme is the one quant/act.py writes for it."""
    if recorded is None:
        return None
    where = f"{where}: activations"
    need(isinstance(recorded, dict), where, "expected an object")
    if "type" in recorded:
        return check_float_activations(recorded, where, quantizable)
    bits, dynamic, sym, layers = (recorded.get(k) for k in ("bits", "dynamic", "symmetric", "layers"))
    need(is_int(bits) and 2 <= bits <= 8, where, f"bits must be an integer in 2..8, got {bits!r}")
    need(isinstance(dynamic, bool) and isinstance(sym, bool), where, "dynamic and symmetric must be true or false")
    need(isinstance(layers, dict) and layers, where, "layers must be a non-empty object")
    for name, static in layers.items():
        need(name in quantizable, where, f"{name!r} is not a quantized linear layer of the model")
        if dynamic:
            need(static is None, where, f"layer {name}: a dynamic quantizer has no [step, zero point]")
            continue
        ok = isinstance(static, list) and len(static) == 2 and all(is_number(v) for v in static)
        need(ok and static[0] > 0 and 0 <= static[1] <= 2 ** bits - 1, where,
             f"layer {name}: expected [step > 0, zero point in 0..{2 ** bits - 1}], got {static!r}")
    return recorded


def check_float_activations(recorded: dict, where: str, quantizable: set[str]) -> dict:
    from ..quant.act import FLOAT_TYPES, act_scheme
    kind, layers = recorded.get("type"), recorded.get("layers")
    need(kind in FLOAT_TYPES, where, f"type must be one of {', '.join(FLOAT_TYPES)}, got {kind!r}")
    expected = act_scheme(FLOAT_TYPES[kind], True, True, kind)
    need({k: v for k, v in recorded.items() if k != "layers"} == expected, where,
         f"a {kind} scheme must read {json.dumps(expected)}")
    need(isinstance(layers, dict) and layers, where, "layers must be a non-empty object")
    for name, static in layers.items():
        need(name in quantizable, where, f"{name!r} is not a quantized linear layer of the model")
        if kind != "nvfp4":
            need(static is None, where, f"layer {name}: a dynamic quantizer has nothing stored")
            continue
        need(isinstance(static, list) and len(static) == 1 and is_number(static[0]) and static[0] > 0, where,
             f"layer {name}: expected [global scale > 0], got {static!r}")
    return recorded


def check_report(report: dict, where):
    """The parts of crossblock.json that `crossblock report` reads."""
    blocks, recipe = report.get("blocks"), report.get("recipe")
    need(isinstance(blocks, list) and blocks, where, "blocks must be a non-empty list")
    for b in blocks:
        need(isinstance(b, dict) and is_int(b.get("block")) and is_number(b.get("rel_mse")), where,
             "each entry of blocks needs an integer block and a finite rel_mse")
        rtn = b.get("rtn")
        need(rtn is None or (isinstance(rtn, dict) and all(is_number(v) for v in rtn.values())), where,
             f"block {b['block']}: rtn must hold finite numbers")
        need("token_rel_mse" not in b or is_number(b["token_rel_mse"]), where, "token_rel_mse must be a number")
    grid = recipe.get("grid") if isinstance(recipe, dict) else None
    need(isinstance(recipe, dict) and isinstance(recipe.get("name"), str) and isinstance(grid, dict)
         and isinstance(grid.get("type"), str), where, "recipe must name the recipe and its grid's type")


def check_qweight(name: str, qw: QuantizedWeight, layer: nn.Module):
    """A packed layer's integers, scales and zero points against the layer they replace."""
    where = f"quantized layer {name}"
    need(is_int(qw.bits) and 1 <= qw.bits <= 8, where, f"bits must be in 1..8, got {qw.bits!r}")
    w = layer.weight.t() if type(layer).__name__ == "Conv1D" else layer.weight
    out_f, in_f = w.shape
    need(is_int(qw.group_size) and (qw.group_size == -1 or 0 < qw.group_size <= in_f), where,
         f"group_size must be -1 or in 1..{in_f}, got {qw.group_size!r}")
    need(tuple(qw.q.shape) == (out_f, in_f), where, f"integers of shape {tuple(qw.q.shape)}, the layer is "
         f"{(out_f, in_f)} (does the bit width {qw.bits} match the data?)")
    groups = num_groups(in_f, qw.group_size)
    for what, t in (("scales", qw.scale), ("zero points", qw.zero)):
        need(tuple(t.shape) == (out_f, groups), where, f"{what} of shape {tuple(t.shape)}, expected {(out_f, groups)}")
        need(bool(torch.isfinite(t).all()), where, f"{what} hold NaN or Inf")
    top = 2 ** qw.bits - 1
    need(int(qw.q.max()) <= top if qw.q.numel() else True, where, f"integers exceed {top}, the {qw.bits}-bit maximum")
    if qw.kind in ("nvfp4", "mxfp4"):  # E2M1 codes; zero holds the global scale (quant/fp4.py)
        need(bool((qw.scale > 0).all() and (qw.zero > 0).all()), where, "scales must be positive")
        return
    need(bool(((qw.zero >= 0) & (qw.zero <= top)).all()), where, f"zero points outside 0..{top}")


def check_stored(fmt: str, name: str, tensors: dict, expected: dict, why: str = ""):
    """A packed layer's tensors as its format's writer stores them, `expected`: suffix -> (shape
    or None for any, dtype: a torch dtype, "float" or "integer"); each must be present, of that
    kind and shape (`why`: what the shape follows from, for the message)."""
    for suffix, (shape, dtype) in expected.items():
        key = f"{name}.{suffix}"
        where = f"{fmt} tensor {key}"
        need(key in tensors, where, "missing")
        t = tensors[key]
        ok = t.is_floating_point() if dtype == "float" else \
            not t.is_floating_point() and t.dtype != torch.bool if dtype == "integer" else t.dtype == dtype
        kind = {"float": "floating point", "integer": "integers"}.get(dtype) or str(dtype).removeprefix("torch.")
        need(ok, where, f"stored as {str(t.dtype).removeprefix('torch.')}, not {kind}")
        if shape is not None:
            need(tuple(t.shape) == tuple(shape), where, f"shape {tuple(t.shape)}, expected {tuple(shape)}{why}")


def check_packed(name: str, packed: torch.Tensor, shape: tuple, bits: int):
    """compressed-tensors pack-quantized: `bits`-wide integers, 32 // bits per int32 word."""
    where = f"compressed-tensors layer {name}"
    need(is_int(bits) and 1 <= bits <= 8, where, f"num_bits must be in 1..8, got {bits!r}")
    need(len(shape) == 2 and all(is_int(s) and s > 0 for s in shape), where, f"weight_shape {shape} is not 2-D")
    per_word = 32 // bits
    expected = (shape[0], -(-shape[1] // per_word))
    need(tuple(packed.shape) == expected, where, f"packed weights of shape {tuple(packed.shape)}, but "
         f"{bits}-bit integers of a {shape} weight pack into {expected}: num_bits does not match the data")
