"""Output folders that are either complete or absent, and never at the cost of anything else.

Everything is written into a hidden staging folder beside OUT (`.OUT.partial`) that is renamed
to OUT once complete (crossblock.json last). A run that dies keeps its staging folder only if it
holds a window checkpoint, for `--resume`; it never looks like a finished OUT. Checkpoints are
deleted only after the rename, so a kill at any instant of the final save leaves either a
resumable staging folder or a complete OUT.

What OUT may be: never a folder that holds the working directory or a file the run reads (the
model, the calibration texts); `--overwrite` replaces only an empty folder or one crossblock
wrote: one of MARKERS holds what crossblock writes there, and the folder holds nothing else than
the files crossblock writes (`foreign_entry`). A quantize run holds an exclusive lock (flock) on its staging
folder, so a second run with the same OUT refuses instead of sharing or deleting it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import json
import os
import shutil
from pathlib import Path

from .engine.checkpoint import checkpoint_files
from .errors import CrossblockError

# what quantize / preprocess write last, and the keys every one of them holds
MARKERS = {"crossblock.json": ("format", "activations"), "cfp.json": ("cfp_alpha", "cfp")}
# the other files of an output folder: the model's (every format; `crossblock report` adds its
# plot, a kill just after the final rename leaves checkpoints), then the tokenizer's
WRITTEN = ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
           "model.safetensors.index.json", "crossblock_unfolded.safetensors", "model.gguf", "error_by_block.png", "README.md",
           "checkpoint*.safetensors*",
           "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
           "chat_template.jinja", "chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
           "spiece.model", "*.tiktoken")
CHAT_TEMPLATES = "additional_chat_templates"  # a folder of *.jinja the tokenizer may write
LOCK_FILE = "crossblock.lock"  # in the staging folder: the pid of the run holding the lock
_held: dict[Path, int] = {}  # staging folder -> the open descriptor carrying its lock


def partial_dir(out: Path) -> Path:
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def _os_error(out: Path, e: OSError) -> CrossblockError:
    why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
    return CrossblockError(f"cannot write output folder {out}: {why}")


def is_marker(path: Path) -> bool:
    """`path` is one of MARKERS holding what crossblock writes there (not any file of that name)."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(info, dict) and all(k in info for k in MARKERS[path.name])


def custom_code_files(folder: Path) -> set[str]:
    """The Python files save_pretrained copies for a model or tokenizer with custom code: the
    modules their auto_map names ("module.Class" or "repo--module.Class")."""
    names = set()
    for config in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((folder / config).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, AttributeError):
            continue
        for refs in auto_map.values() if isinstance(auto_map, dict) else ():
            for ref in refs if isinstance(refs, list) else [refs]:
                if isinstance(ref, str) and "." in ref:
                    names.add(ref.split("--")[-1].rsplit(".", 1)[0] + ".py")
    return names


def foreign_entry(folder: Path) -> str | None:
    """Why `folder` is not a complete crossblock output (None if it is): no genuine marker, or
    an entry crossblock never writes there (named)."""
    folder = Path(folder)
    markers = [folder / m for m in MARKERS if (folder / m).is_file() and not (folder / m).is_symlink()]
    if not markers:
        return f"no {' or '.join(MARKERS)}"
    if not any(is_marker(m) for m in markers):
        return f"its {markers[0].name} is not one crossblock wrote"
    code = custom_code_files(folder)
    for entry in sorted(folder.iterdir()):
        if entry.name == CHAT_TEMPLATES and entry.is_dir() and not entry.is_symlink() \
                and all(f.suffix == ".jinja" and f.is_file() for f in entry.iterdir()):
            continue
        known = entry.name in MARKERS or entry.name in code or any(fnmatch.fnmatchcase(entry.name, w) for w in WRITTEN)
        if not known or entry.is_symlink() or not entry.is_file():
            return f"it holds {entry.name}, which crossblock does not write"
    return None


def written_by_crossblock(folder: Path) -> bool:
    return foreign_entry(folder) is None


def check_output(out: Path, overwrite: bool = False, needed=(), resume: bool = False):
    """Refuse an OUT whose writing could destroy anything but an earlier crossblock output:
    one that is or contains the working directory or a path in `needed`, or a non-empty
    folder crossblock did not write. `resume` accepts an OUT a killed run had completed."""
    out = Path(out)
    overwrite = overwrite or (resume and not partial_dir(out).exists() and written_by_crossblock(out))
    target = out.resolve()
    needed = [q for p in needed for q in ([p] if isinstance(p, (str, os.PathLike)) else p)]  # lists too
    for label, path in [("the working directory", Path.cwd()), *((str(p), Path(p)) for p in needed)]:
        path = path.expanduser().resolve()
        if path == target or target in path.parents:
            raise CrossblockError(f"output folder {out} would replace {label}, which it "
                                  f"{'is' if path == target else 'contains'}: choose a new folder")
    refuse_if_locked(partial_dir(out))
    interrupted = [p for p in partial_dir(out).glob("*") if p.name != LOCK_FILE]
    if interrupted and not (resume or overwrite):
        raise CrossblockError(f"{partial_dir(out)} holds an interrupted run: pass --resume to continue it, "
                              "or --overwrite to start over")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink() or not out.is_dir():
        raise CrossblockError(f"output path {out} exists and is not a folder")
    if not any(out.iterdir()):
        return
    if not overwrite:
        raise CrossblockError(f"output folder {out} exists and is not empty (pass overwrite / --overwrite)")
    why = foreign_entry(out)
    if why:
        raise CrossblockError(f"output folder {out} is not a crossblock output ({why}): "
                              "--overwrite replaces only those; remove it yourself or choose another folder")


def try_lock(work: Path) -> int | None:
    """An open descriptor of `work` carrying its exclusive lock, or None if another run holds it."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def refuse_if_locked(work: Path):
    """Refuse, naming it, if a live run holds the staging folder (its lock dies with it)."""
    work = Path(work)
    if work.resolve() in _held or not work.is_dir():
        return
    fd = try_lock(work)
    if fd is not None:
        os.close(fd)
        return
    try:
        pid = (work / LOCK_FILE).read_text().strip() or "?"
    except OSError:
        pid = "?"
    raise CrossblockError(f"another crossblock run (pid {pid}) is writing {work}: wait for it to finish, "
                          "or stop it first")


def lock_staging(work: Path):
    """Take the exclusive lock of a staging folder (created if absent), or refuse naming the
    process that holds it. A process holds one lock per folder: a new one replaces its own."""
    work = Path(work)
    release(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
        fd = try_lock(work)
    except OSError as e:
        raise _os_error(work, e) from None
    if fd is None:
        refuse_if_locked(work)
        raise CrossblockError(f"another crossblock run is writing {work} (it has just finished): try again")
    _held[work.resolve()] = fd
    try:
        (work / LOCK_FILE).write_text(f"{os.getpid()}\n")
    except OSError as e:
        release(work)
        raise _os_error(work, e) from None


def release(work: Path):
    fd = _held.pop(Path(work).resolve(), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def prepare_staging(out: Path, resume: bool = False, overwrite: bool = False, needed=()) -> Path | None:
    """Check OUT, lock its staging folder and clear an interrupted run there unless `resume`.
    Returns the staging folder, or None when `resume` finds OUT already complete (a kill after
    the final rename: only the leftover checkpoints are removed)."""
    out = Path(out)
    work = partial_dir(out)
    check_output(out, overwrite, needed, resume)
    if resume and not work.exists() and written_by_crossblock(out):
        for f in checkpoint_files(out):
            f.unlink()
        return None
    lock_staging(work)
    leftovers = [p for p in work.iterdir() if p.name != LOCK_FILE]
    if leftovers and not resume:
        if not overwrite:
            release(work)
            raise CrossblockError(f"{work} holds an interrupted run: pass --resume to continue it, "
                                  "or --overwrite to start over")
        for p in leftovers:  # the folder itself stays: it carries the lock
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    return work


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
        (tmp / LOCK_FILE).unlink(missing_ok=True)
        if out.exists():
            if not written_by_crossblock(out) and any(out.iterdir()):  # it changed since the check
                raise CrossblockError(f"output folder {out} is not a crossblock output any more: not replaced")
            shutil.rmtree(out)
        os.replace(tmp, out)
        # only now: until the rename, a kill leaves the checkpoints a --resume finishes from
        for f in checkpoint_files(out):
            f.unlink()
    except BaseException as e:
        if tmp.exists() and not (keep_checkpoint and checkpoint_files(tmp)):
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _os_error(out, e) from None
        if type(e).__name__ == "SafetensorError":  # safetensors' own I/O error (e.g. a full disk)
            why = "disk full" if "No space" in str(e) else str(e).strip().splitlines()[0]
            raise CrossblockError(f"cannot write output folder {out}: {why}") from None
        raise
    finally:
        release(tmp)
