"""What --calib and --calib-mix name, as api.quantize takes it: a text, or a Mix of sources."""
from __future__ import annotations

from pathlib import Path

from ..errors import CrossblockError
from . import builtin
from .text import Mix, read_texts


def text_files(entry) -> list[Path]:
    """A file, or a folder's *.txt files (sorted by name)."""
    p = Path(entry)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise CrossblockError(f"calibration folder {p} holds no .txt files")
        return files
    return [p]


def calibration_source(entries=None, weights=None):
    """What `--calib` and `--calib-mix` name -> (calib for api.quantize, the sources' names).
    No entries: the built-in set. Files and folders alone are joined into one text, as they always were;
    with `weights` (one per entry) every entry is a source of its own share; `builtin` is the built-in set."""
    entries = list(entries or [builtin.NAME])
    if weights is not None and len(weights) != len(entries):
        raise CrossblockError(f"--calib-mix needs one weight per --calib entry: {len(entries)} entries, "
                              f"{len(weights)} weights")
    if weights is None and builtin.NAME not in entries:
        return read_texts([f for e in entries for f in text_files(e)]), entries
    if weights is None:
        if entries != [builtin.NAME]:
            raise CrossblockError("--calib builtin beside files needs --calib-mix (one weight per --calib entry), "
                                  "e.g. --calib builtin my.txt --calib-mix 0.5 0.5")
        weights = [1.0]
    parts = [builtin.mix(w) if e == builtin.NAME else Mix([(str(e), read_texts(text_files(e)), w)])
             for e, w in zip(entries, weights)]
    return sum(parts[1:], parts[0]), entries
