"""Output folders that are either complete or absent.

Everything is written into a hidden staging folder beside OUT (`.OUT.partial`) that is renamed
to OUT once complete (crossblock.json last). A run that dies keeps its staging folder only if it
holds a window checkpoint, for `--resume`; it never looks like a finished OUT.
"""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .engine.checkpoint import checkpoint_files
from .errors import CrossblockError


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _os_error(out: Path, e: OSError) -> CrossblockError:
    why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return CrossblockError(f"cannot write output folder {out}: {why}")


@contextlib.contextmanager
def staged_dir(out: Path, keep_checkpoint: bool = False):
    """Yield the staging folder; rename it to `out` if the block succeeds. On failure it is
    removed, unless `keep_checkpoint` and it holds a checkpoint to resume from."""
    out = Path(out)
    tmp = partial_dir(out)
    try:
        tmp.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(out, e) from None
    try:
        yield tmp
        for f in checkpoint_files(tmp):
            f.unlink()
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException as e:
        if not (keep_checkpoint and checkpoint_files(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _os_error(out, e) from None
        raise
