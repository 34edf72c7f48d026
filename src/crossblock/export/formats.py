"""What each export format can represent, checked before quantization starts.

- fake: dense fake-quantized weights; anything goes.
- compressed-tensors: 2, 4 or 8 bits. compressed-tensors 0.20 packs any width 1..8 densely
  into int32, but for widths that do not divide 32 (3, 5, 6, 7) that dense layout differs
  from the `32 // bits` values per word of earlier releases, vLLM and llama.cpp's converter,
  so only the widths every reader agrees on are written. Groups must divide in_features.
  The transformers loader only handles nn.Linear, so GPT-2 style Conv1D models are refused.
- gptq: 2, 3, 4 or 8 bits (what transformers' GPTQConfig and vLLM's gptq accept). qweight
  packs along in_features and qzeros along out_features with no padding, so both must hold
  whole int32 words. Asymmetric GPTQ v1 cannot store a zero point of 0 (it stores zero - 1);
  that depends on the data and is checked at save time.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import CrossblockError

FORMATS = ("fake", "compressed-tensors", "gptq")
BITS = {"compressed-tensors": (2, 4, 8), "gptq": (2, 3, 4, 8)}


def values_per_word_run(bits: int) -> int:
    """Smallest count of `bits`-bit values filling whole int32 words (8 for 4-bit, 32 for 3-bit)."""
    return 32 // math.gcd(32, bits)


def require_known_format(fmt: str):
    if fmt not in FORMATS:
        raise CrossblockError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def check_format(fmt: str, bits: int, group_size: int, sym: bool, in_features_list: Iterable[int], *,
                 out_features_list: Iterable[int] = (), has_conv1d: bool = False,
                 act_scheme: dict | None = None):
    """Raise CrossblockError, naming the format and the setting, if `fmt` cannot store
    weights quantized this way. `sym` is accepted by every format (kept for the record)."""
    require_known_format(fmt)
    if fmt == "fake":
        return
    if bits not in BITS[fmt]:
        raise CrossblockError(f"{fmt} export cannot store {bits}-bit weights "
                              f"(bits must be one of {', '.join(map(str, BITS[fmt]))})")
    check_groups(fmt, group_size, set(in_features_list))
    if fmt == "compressed-tensors":
        if has_conv1d:
            raise CrossblockError("compressed-tensors export cannot store Conv1D layers (GPT-2 style): "
                                  "its transformers loader only handles nn.Linear; use gptq or fake")
        check_act_scheme(act_scheme)
    else:
        refuse_act_scheme(fmt, act_scheme)
        check_whole_words(bits, "in_features", set(in_features_list))
        check_whole_words(bits, "out_features", set(out_features_list))


def check_groups(fmt: str, group_size: int, in_features: set[int]):
    if group_size != -1 and group_size <= 0:
        raise CrossblockError(f"{fmt} export needs group_size -1 (per channel) or a positive integer, "
                              f"got {group_size}")
    ragged = sorted(k for k in in_features if group_size != -1 and k % group_size)
    if ragged:
        raise CrossblockError(f"{fmt} export needs group_size to divide every layer's in_features: "
                              f"group_size {group_size} leaves a ragged last group for in_features {ragged[0]}")


def check_whole_words(bits: int, what: str, sizes: set[int]):
    """GPTQ packs without padding: each packed dimension must fill whole int32 words."""
    run = values_per_word_run(bits)
    odd = sorted(k for k in sizes if k % run)
    if odd:
        raise CrossblockError(f"gptq export packs {bits}-bit values into whole int32 words along {what}, "
                              f"which must be a multiple of {run}; {odd[0]} is not")


def refuse_act_scheme(fmt: str, act_scheme: dict | None):
    if act_scheme is not None:
        raise CrossblockError(f"{fmt} export cannot record activation quantization (act_scheme); "
                              "use compressed-tensors")


# act_scheme keys -> compressed-tensors QuantizationArgs fields
ACT_KEYS = {"bits": "num_bits", "dynamic": "dynamic", "strategy": "strategy",
            "symmetric": "symmetric", "group_size": "group_size"}


def act_args(act_scheme: dict):
    """The compressed-tensors QuantizationArgs of an act_scheme dict (imports compressed_tensors)."""
    from compressed_tensors.quantization import QuantizationArgs
    unknown = sorted(set(act_scheme) - set(ACT_KEYS))
    if unknown:
        raise CrossblockError(f"compressed-tensors export: unknown act_scheme key {unknown[0]!r} "
                              f"(known: {', '.join(ACT_KEYS)})")
    if act_scheme.get("dynamic") is not True:
        # Static activation quantization would need calibrated input scales in the checkpoint.
        raise CrossblockError("compressed-tensors export records only dynamic activation quantization: "
                              "act_scheme needs dynamic: true")
    try:
        return QuantizationArgs(type="int", **{ACT_KEYS[k]: v for k, v in act_scheme.items()})
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        reason = str(e).splitlines()[-1].strip()
        raise CrossblockError(f"compressed-tensors export: invalid act_scheme {act_scheme}: {reason}") from None


def check_act_scheme(act_scheme: dict | None):
    if act_scheme is not None:
        act_args(act_scheme)
