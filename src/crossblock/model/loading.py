"""Every model crossblock loads holds exactly its checkpoint's weights: a weight transformers
reports missing (it would be newly initialized: random values, or ones for a norm), unexpected
(in the files, but no part of the model) or of a mismatched shape is refused in one line that
names it, instead of being quantized, evaluated or saved as if it were the model's.

Tied weights (lm_head = embeddings) and buffers transformers computes (rotary inv_freq) are not
reported: transformers already leaves them out of its loading info, and the low-memory reader
(stream.py) applies transformers' own exception rules to what it finds."""
from __future__ import annotations

import contextlib
import logging

from ..errors import CrossblockError


class _DropLoadReport(logging.Filter):
    """transformers logs a multi-line LOAD REPORT table before it raises or returns; crossblock
    refuses the same findings in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


@contextlib.contextmanager
def no_load_report():
    logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


def refuse_unloaded(where, missing=(), unexpected=(), mismatched=()):
    """One line naming the first weight (by name) that the checkpoint at `where` does not fill
    exactly; `mismatched`: (name, checkpoint shape, model shape)."""
    def more(found) -> str:
        return f" (and {len(found) - 1} more)" if len(found) > 1 else ""
    missing, unexpected = sorted(missing), sorted(unexpected)
    mismatched = sorted(mismatched, key=lambda m: m[0])
    if missing:
        raise CrossblockError(f"{where}: weight {missing[0]}{more(missing)} is missing from the checkpoint "
                              "(transformers would make up its values); the files and config.json do not match")
    if mismatched:
        name, stored, expected = mismatched[0]
        raise CrossblockError(f"{where}: weight {name}{more(mismatched)} has shape {tuple(stored)} in the checkpoint, "
                              f"the model {tuple(expected)}; the files and config.json do not match")
    if unexpected:
        raise CrossblockError(f"{where}: weight {unexpected[0]}{more(unexpected)} in the checkpoint is no part of the "
                              "model its config.json describes; the files and config.json do not match")


def from_pretrained_exactly(cls, where, *args, **kwargs):
    """`cls.from_pretrained(*args, **kwargs)`, refused (refuse_unloaded) unless every weight of
    the model comes from the checkpoint and every checkpoint tensor goes into the model. A local
    safetensors checkpoint's files are checked first (named when unreadable), and a floating-point
    weight stored as integers is refused (from_pretrained would cast it), as on the low-memory path."""
    from pathlib import Path
    from ..stream import Source, weight_files
    folder = Path(args[0]) if args and args[0] is not None and "gguf_file" not in kwargs else None
    source = Source(folder) if folder is not None and folder.is_dir() and weight_files(folder) else None
    with no_load_report():
        model, info = cls.from_pretrained(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    refuse_unloaded(where, info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"])
    if source is not None:
        source.follow_conversions(model)
        source.refuse_integers(model)
    return model
