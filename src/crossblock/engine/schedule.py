"""Windows of the reconstruction schedule: which blocks train together, and where the loss is read.

A window trains blocks [start, end) jointly and compares outputs after block `target`
(>= end - 1): blocks end..target run in full precision, frozen (look-ahead). Windows start every
`stride` blocks; the last one ends at the last block. After a window, blocks [start, next_start)
take part in no later window: they are hard-rounded, frozen, and the chains advance past them.
"""
from __future__ import annotations

from dataclasses import dataclass

# Window losses before/after training, and the RTN reference chain, use the first LOSS_SAMPLES
# calibration sequences: a fixed subset keeps them cheap.
LOSS_SAMPLES = 32
# A recipe that trains nothing (rtn, gptq) reports each block's output error on the first
# REPORT_SAMPLES sequences: the FP (and RTN) chains exist only for that report, and RTN needs no
# calibration at all (SmolLM2 RTN at 128 x 512 tokens: 264 s of chains for weights that take seconds).
REPORT_SAMPLES = 8


@dataclass(frozen=True)
class Window:
    start: int
    end: int          # exclusive
    target: int       # inclusive: loss is measured on this block's output
    next_start: int   # blocks [start, next_start) are finished after this window

    @property
    def trained(self) -> range:
        return range(self.start, self.end)

    @property
    def finished(self) -> range:
        return range(self.start, self.next_start)

    @property
    def finishes_through_target(self) -> bool:
        """Every block up to the target is finished (no look-ahead, no overlap: block, mb), so the
        quantized chain's advance passes exactly what the window's loss reads."""
        return self.finished == range(self.start, self.target + 1)


def make_schedule(num_blocks: int, size: int = 1, stride: int = 1, lookahead: int = 0) -> list[Window]:
    if num_blocks < 1:
        raise ValueError("the model has no blocks")
    if size < 1 or stride < 1 or stride > size or lookahead < 0:
        raise ValueError(f"invalid window: size={size}, stride={stride}, lookahead={lookahead} "
                         "(need size >= 1, 1 <= stride <= size, lookahead >= 0)")
    windows = []
    start = 0
    while True:
        end = min(start + size, num_blocks)
        target = min(end - 1 + lookahead, num_blocks - 1)
        last = end == num_blocks
        windows.append(Window(start, end, target, num_blocks if last else start + stride))
        if last:
            return windows
        start += stride
