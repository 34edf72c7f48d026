"""Output folders that are either complete or absent."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path

from .errors import CrossblockError


@contextlib.contextmanager
def staged_dir(out: Path):
    """Yield a staging folder beside `out`; rename it to `out` only if the block succeeds."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise CrossblockError(f"cannot write output folder {out}: {e.strerror or e}") from None
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CrossblockError(f"cannot write output folder {out}: {why}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
