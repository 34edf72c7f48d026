"""The gguf grid: llama.cpp's weight types (quant/gguf.py has the math), so that the window engine
optimizes exactly what llama.cpp dequantizes.

    grid: {type: gguf, quant: Q4_K_M}            # or a single type: Q4_0 ... Q6_K
    --gguf-type Q4_K_M                           # the same, as a flat flag

`quant` is one type for every block linear, or a llama.cpp mixture (`MIXTURES`: which layers
get which type, as llama.cpp's quantizer chooses for dense models). Layers whose width a type
cannot hold fall back as llama.cpp's quantizer does (`FALLBACK`: the table of its
`tensor_type_fallback`, checked against llama.cpp 0c1e570 in bench/llamacpp.py; older llama.cpp
gave Q2_K/Q3_K IQ4_NL, same size, not implemented here), and to full precision when no type
fits (width not a multiple of 32). The token embeddings and output head are rounded to their
types (`output`, `embeddings`; llama.cpp's defaults) after the stages, so the fake-quant model
is the file. What fell back is logged once and recorded in crossblock.json (`grid` section).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..config import Config, setting
from ..errors import CrossblockError
from ..model.adapter import block_linears, find_blocks, is_skipped
from ..quant import gguf as gq
from ..quant.grid import QuantizedWeight, least_error_ratio, squared_error
from ..quant.linear import weight_of
from .base import GRIDS

log = logging.getLogger(__name__)

MIXTURES = {"Q4_K_M": "Q4_K", "Q3_K_M": "Q3_K"}   # mixture -> its base type
DENSE = ("F32", "F16")                            # output / embeddings may stay dense
# llama.cpp's quantizer, for widths a type's block does not divide
FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
# HF linear names -> llama.cpp's tensor categories (the ones the mixtures treat apart)
CATEGORIES = {"v_proj": "attn_v", "o_proj": "attn_output", "down_proj": "ffn_down"}
SOFT_ROUNDINGS = ("adaround", "lora")
WIDTHS = {"2": "Q2_K", "3": "Q3_K", "4": "Q4_K", "5": "Q5_K", "6": "Q6_K", "8": "Q8_0"}  # a bit width as an option
QUANTS = (*gq.TYPES, *MIXTURES)   # what `quant` may be: a GGUF type or a mixture
STORED = (*gq.TYPES, *DENSE)      # what the output head and embeddings may be


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits in Q4_K_M."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def mixture_type(quant: str, local_name: str, i: int, n: int) -> str:
    """The type llama.cpp's quantizer gives block i of n's linear `local_name` under `quant`."""
    if quant not in MIXTURES:
        return quant
    category = CATEGORIES.get(local_name.rpartition(".")[2])
    if quant == "Q4_K_M" and category in ("attn_v", "ffn_down") and use_more_bits(i, n):
        return "Q6_K"
    if quant == "Q3_K_M":
        if category == "attn_v":
            return "Q5_K" if i < 2 else "Q4_K"
        if category == "ffn_down":
            return "Q5_K" if i < n // 16 else "Q4_K"
        if category == "attn_output":
            return "Q4_K"
    return MIXTURES[quant]


def fit_width(kind: str, width: int) -> str:
    """`kind`, or what llama.cpp's converter falls back to for this row width ("F32": none fits)."""
    if kind in DENSE or width % gq.TYPES[kind].block == 0:
        return kind
    kind = FALLBACK.get(kind, kind)
    return kind if width % gq.TYPES[kind].block == 0 else "F32"


@GRIDS.register("gguf")
@dataclass
class GgufGrid(Config):
    # flat spelling: --gguf-type picks this grid instead of the uniform one (--wbits ...)
    quant: str = setting("Q4_K_M", "a GGUF type or mixture: the gguf grid instead of --wbits etc.",
                         choices=QUANTS, flat="gguf_type", off=None)
    output: str | None = setting(None, "the output head's (and tied embeddings') type; default: llama.cpp's "
                                       "(Q6_K; Q8_0 for Q8_0 or widths 256 does not divide)", choices=STORED)
    embeddings: str | None = setting(None, "untied token embeddings' type; default: the base type", choices=STORED)

    @staticmethod
    def names() -> list[str]:
        """What `quant` may be: a GGUF type or a mixture."""
        return list(QUANTS)

    # -- what a recipe may combine with this grid ------------------------------------------
    @property
    def kinds(self) -> set[str]:
        """Every type a block linear may get (mixture members and their fallbacks)."""
        members = {self.quant} if self.quant in gq.TYPES else {MIXTURES[self.quant], "Q4_K", "Q5_K", "Q6_K"}
        return members | {FALLBACK[k] for k in members if k in FALLBACK}

    def check_windows(self, init: str, rounding: str | None):
        if init == "gptq":
            raise CrossblockError(f"invalid gguf grid: init gptq is not supported on GGUF types ({self.quant}): "
                                  "GPTQ's column-wise grid has no sub-block scales; use init rtn")
        with_min = sorted(k for k in self.kinds if gq.TYPES[k].has_min)
        if rounding in SOFT_ROUNDINGS and with_min:
            raise CrossblockError(f"invalid gguf grid: rounding {rounding} needs a grid step * (q - zero), but "
                                  f"{self.quant} uses {', '.join(with_min)} (step * q - min); use signround or rtn, "
                                  "or a symmetric type (Q4_0, Q5_0, Q8_0, Q3_K, Q6_K)")

    def check_widths(self, in_features: dict[str, int]):
        """Any width is accepted: what no type holds stays in full precision (see `finish`)."""

    # -- per layer -----------------------------------------------------------------------------
    def layer_kind(self, local_name: str, index: int, count: int, width: int) -> str:
        return fit_width(mixture_type(self.quant, local_name, index, count), width)

    def for_block(self, weights: dict) -> dict:
        return {}

    def for_layer(self, local_name: str, index: int, count: int, width: int) -> "GgufGrid | None":
        """The grid of one block linear (a single type), or None: it stays in full precision."""
        kind = self.layer_kind(local_name, index, count, width)
        return None if kind == "F32" else GgufGrid(kind, self.output, self.embeddings)

    def option(self, text: str) -> "GgufGrid":
        """This grid with another single type (mixed precision's options: Q2_K, Q3_K, ...); a bare
        bit width names the k-quant of that width (2..6 -> Q2_K..Q6_K, 8 -> Q8_0), so the default
        options 2,3,4 mean Q2_K,Q3_K,Q4_K here."""
        kind = WIDTHS.get(text.strip(), text.strip())
        if kind not in gq.TYPES:
            raise CrossblockError(f"invalid bits option {text!r} for the gguf grid: one of {', '.join(gq.TYPES)}, "
                                  f"or a bit width {', '.join(WIDTHS)}")
        return GgufGrid(kind, self.output, self.embeddings)

    def bits_per_weight(self, width: int) -> float:
        """llama.cpp's size of the type per weight (scales and mins included), at the type this
        width gets (fit_width); a mixture: its base type."""
        kind = fit_width(MIXTURES.get(self.quant, self.quant), width)
        return 32.0 if kind == "F32" else gq.TYPES[kind].bits_per_weight

    @property
    def type(self) -> gq.GgufType:
        if self.quant not in gq.TYPES:
            raise CrossblockError(f"gguf grid {self.quant} is a mixture: resolve it per layer (for_layer)")
        return gq.TYPES[self.quant]

    # -- the grid interface (grids/__init__.py), for a single type ------------------------------
    def num_groups(self, in_features: int) -> int:
        return in_features // self.type.sub

    def params(self, w, max_mult=None, min_mult=None):
        return gq.params(w, self.type, max_mult, min_mult)

    def to_int(self, w, scale, zero, offset=None):
        return gq.to_int(w, self.type, scale, zero, offset)

    def fake_quantize(self, w, scale, zero, offset=None):
        return gq.decode(self.to_int(w, scale, zero, offset), self.type, scale, zero)

    def decode(self, q, scale, zero):
        return gq.decode(q, self.type, scale, zero)

    def rtn(self, w):
        return self.fake_quantize(w.float(), *self.params(w.float()))

    @torch.no_grad()
    def search_clip(self, w, importance=None):
        """Per sub-block, the clipping ratio (1 .. 0.7) of least squared weight error (input-weighted
        with `importance`, as llama.cpp's quantizer weighs it with an importance matrix)."""
        w = w.float()

        def error_at(mult):
            dq = self.fake_quantize(w, *self.params(w, mult, mult))
            return gq.sub_view(squared_error(w, dq, importance), self.type).sum(-1)
        return least_error_ratio(error_at, (w.shape[0], self.num_groups(w.shape[1])), w.device)

    def scaled(self, w, scale):
        """W / step (symmetric types only: check_windows refuses soft roundings elsewhere)."""
        return (gq.sub_view(w, self.type) / gq.nonzero(scale)[..., None]).reshape(w.shape)

    def shift(self, v, zero):
        return (gq.sub_view(v, self.type) + zero[..., 0, None]).clamp(0, self.type.qmax).reshape(v.shape)

    def frozen(self, q, scale, zero) -> QuantizedWeight:
        t = self.type
        return QuantizedWeight(q.round().to(torch.uint8).cpu(), scale.detach().float().cpu(),
                               zero.detach().float().cpu(), t.bits, t.sub, not t.has_min, kind=t.name)

    # -- after the stages: embeddings, output head, the record ----------------------------------
    def default_output(self, width: int) -> str:
        base = MIXTURES.get(self.quant, self.quant)
        return "Q8_0" if base == "Q8_0" or width % 256 else "Q6_K"

    @torch.no_grad()
    def finish(self, model, skip=()) -> dict:
        """Round the embeddings and output head to their types (in place, `crossblock_qweight`
        attached), log what fell back, and return the per-layer types for crossblock.json."""
        prefix, blocks = find_blocks(model)
        types, fallbacks = {}, {}
        for i, block in enumerate(blocks):
            for name, module in block_linears(block):
                if is_skipped(skip, prefix, i, name):
                    continue
                width = weight_of(module).shape[1]
                asked = mixture_type(self.quant, name, i, len(blocks))
                types[f"{prefix}.{i}.{name}"] = got = fit_width(asked, width)
                if got != asked:
                    fallbacks.setdefault(f"{asked} -> {got} (width {width})", []).append(f"{prefix}.{i}.{name}")
        emb, head = model.get_input_embeddings(), model.get_output_embeddings()
        tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
        width = emb.weight.shape[1]
        ends = {"output": (head, self.output or self.default_output(width))} if head is not None else {}
        if not tied:
            ends["token_embd"] = (emb, self.embeddings or MIXTURES.get(self.quant, self.quant))
        for what, (module, asked) in ends.items():
            got = fit_width(asked, width)
            types[what] = got
            if got != asked:
                fallbacks.setdefault(f"{asked} -> {got} (width {width})", []).append(what)
            self.round_dense(module, got)
            if tied:
                emb.crossblock_qweight = getattr(module, "crossblock_qweight", None)
        for change, names in fallbacks.items():
            log.warning("gguf %s: %d tensor(s) fall back %s, e.g. %s", self.quant, len(names), change, names[0])
        return {"types": types, "fallbacks": fallbacks, "tied_embeddings": tied}

    @staticmethod
    def round_dense(module, kind: str):
        """Put a (vocab, hidden) weight on `kind`'s grid by round-to-nearest."""
        w = module.weight
        if kind == "F32":
            return
        if kind == "F16":
            w.copy_(w.half().to(w.dtype))
            return
        grid = GgufGrid(kind)
        step, rest = grid.params(w.float())
        q = grid.to_int(w.float(), step, rest)
        w.copy_(grid.decode(q, step, rest).to(w.dtype))
        module.crossblock_qweight = grid.frozen(q, step, rest)
