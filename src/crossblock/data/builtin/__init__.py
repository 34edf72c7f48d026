"""The built-in calibration set: five domains of text whose licenses allow redistribution
(SOURCES.md), drawn from in fixed shares. `crossblock quantize` uses it when no --calib is given;
the share of each domain follows what general-purpose calibration sets mix (prose, narrative,
instructions, code, other languages), so that reconstruction does not learn one domain."""
from __future__ import annotations

import functools
import lzma
from pathlib import Path

from ..text import Mix

HERE = Path(__file__).parent
# every domain holds at least its share of 512 x 2048 tokens (SOURCES.md lists the counts)
WEIGHTS = {"encyclopedic": 0.20, "narrative": 0.25, "instructions": 0.25, "code": 0.15, "multilingual": 0.15}
NAME = "builtin"


@functools.lru_cache(maxsize=None)
def text(domain: str) -> str:
    return lzma.decompress((HERE / f"{domain}.txt.xz").read_bytes()).decode("utf-8")


def mix(weight: float = 1.0) -> Mix:
    """The built-in set as a Mix, its shares scaled by `weight` (to sit beside other sources)."""
    return Mix([(f"{NAME}:{d}", text(d), w * weight) for d, w in WEIGHTS.items()])
