"""Zero-shot task accuracy through lm-evaluation-harness (`pip install crossblock[eval]`).

The model object is handed to lm-eval as it is (`HFLM(pretrained=model)`), not re-loaded by name,
so a folder loaded with `crossblock.load` keeps its activation quantizers. Tasks are lm-eval's
(hellaswag, arc_easy, piqa, winogrande, ...: their datasets must be reachable, or in the
Hugging Face cache with HF_DATASETS_OFFLINE=1), YAML files in `task_dirs` (lm-eval's
include_path), or the ones shipped here (SHIPPED: YAML + JSON lines in eval/task_data/), which need
no download.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

from ..errors import CrossblockError
from ..validate import check_task_options

SHIPPED_DIR = Path(__file__).with_name("task_data")
SHIPPED = {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}
INSTALL = "zero-shot tasks need lm-evaluation-harness: pip install crossblock[eval]"


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise CrossblockError(INSTALL) from None


def shipped_config(name: str) -> dict:
    """A shipped task's config, its data files made absolute (lm-eval reads them from the cwd)."""
    import yaml
    config = yaml.safe_load(SHIPPED[name].read_text())
    files = config["dataset_kwargs"]["data_files"]
    config["dataset_kwargs"]["data_files"] = {split: str(SHIPPED_DIR / f) for split, f in files.items()}
    return config


TRUST = "pass --trust-task-dir (API: trust_task_dir=True) if you trust the folder"
INCLUDES = re.compile(r"^include\s*:\s*['\"]?([^'\"#\s]+)", re.M)
DEFINES = re.compile(r"^(?:task|group|tag)\s*:\s*['\"]?([\w.-]+)['\"]?\s*(?:#.*)?$", re.M)


@functools.cache
def builtin_task_names() -> frozenset[str]:
    """The task, group and tag names lm-eval's own YAML files define (a text scan: lm-eval's
    index parses them all, a minute on a busy CPU)."""
    import lm_eval.tasks
    root = Path(lm_eval.tasks.__file__).parent
    return frozenset(m for f in root.rglob("*.yaml") for m in DEFINES.findall(f.read_text(errors="replace")))


def check_task_dirs(task_dirs, trust: bool = False) -> None:
    """A task folder is data unless the user says otherwise: lm-eval imports Python named by a
    `!function` tag, and a task or group named like one of lm-eval's silently replaces it."""
    for d in task_dirs:
        if not Path(d).is_dir():
            raise CrossblockError(f"task folder not found: {d}")
    if trust or not task_dirs:
        return
    import lm_eval
    installed = Path(lm_eval.__file__).resolve().parent  # lm-eval's own files are its code, trusted
    files = {f: f.read_text(errors="replace")
             for d in task_dirs for f in sorted(Path(d).rglob("*")) if f.suffix in (".yaml", ".yml")}
    todo, seen = list(files), set()
    while todo:  # the folder's files and every file they include, wherever it is
        f = todo.pop()
        if f.resolve() in seen or not f.is_file() or installed in f.resolve().parents:
            continue
        seen.add(f.resolve())
        text = files[f] if f in files else f.read_text(errors="replace")
        if "!function" in text:
            raise CrossblockError(f"{f} runs Python from the task folder (a !function tag): {TRUST}")
        todo += [f.parent / inc for inc in INCLUDES.findall(text)]
    defined = {name: f for f, text in files.items() for name in DEFINES.findall(text)}
    shadowed = sorted(set(defined) & (builtin_task_names() | set(SHIPPED)))
    if shadowed:
        raise CrossblockError(f"{defined[shadowed[0]]} defines {shadowed[0]!r}, which would replace the task of "
                              f"that name: rename it, or {TRUST}")


def task_specs(names: list[str], task_dirs=(), trust_task_dir: bool = False):
    """What lm-eval's simple_evaluate takes: shipped tasks as configs, others by name (checked here,
    so an unknown task is one line before any work)."""
    from lm_eval.tasks import TaskManager
    check_task_dirs(task_dirs, trust_task_dir)
    # lm-eval's own index reads thousands of YAML files (a minute on a busy CPU): only for names that
    # are neither shipped nor in task_dirs
    include = [str(d) for d in task_dirs] or None
    manager = TaskManager(include_path=include, include_defaults=False)
    if any(n not in SHIPPED and n not in manager.all_tasks for n in names):
        manager = TaskManager(include_path=include)
    unknown = [n for n in names if n not in SHIPPED and n not in manager.all_tasks]
    if unknown:
        raise CrossblockError(f"unknown task(s) {', '.join(unknown)}: shipped {', '.join(SHIPPED)}, lm-eval's own "
                              "(e.g. hellaswag, arc_easy, piqa, winogrande), or YAML files in --task-dir")
    return [shipped_config(n) if n in SHIPPED else n for n in names], manager


def run_tasks(model, tokenizer, names: list[str], task_dirs=(), batch_size: int = 16, limit: int | None = None,
              num_fewshot: int | None = None, progress: bool = True, trust_task_dir: bool = False) -> list[dict]:
    """Rows {task, metric, value, stderr} of each task's metrics (zero-shot unless num_fewshot).
    `trust_task_dir` lets task folders run their Python (`!function`) and replace tasks by name."""
    check_task_options(limit, num_fewshot, batch_size)
    require_lm_eval()
    import logging

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    if not names:
        raise CrossblockError("--tasks needs at least one task name (comma-separated)")
    specs, manager = task_specs(names, task_dirs, trust_task_dir)
    # lm-eval warns that the model is an object (what we mean) and logs every step
    logging.getLogger("lm_eval").setLevel(logging.ERROR if not progress else logging.WARNING)
    init = tqdm.__init__
    if not progress:  # lm-eval has no switch for its progress bars
        tqdm.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "disable": True})
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        out = simple_evaluate(model=lm, tasks=specs, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                              torch_random_seed=0, fewshot_random_seed=0)
    except ValueError as e:  # lm-eval's sampler: random.sample of more examples than the task holds
        if num_fewshot and "larger than population" in str(e):
            raise CrossblockError(f"num fewshot {num_fewshot} is more examples than the task(s) "
                                  f"{', '.join(names)} hold to draw from: use fewer") from None
        raise
    finally:
        tqdm.__init__ = init
    rows = []
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            metric, _, _filter = key.partition(",")
            if metric in ("alias", "samples", "sample_len") or metric.endswith("_stderr") or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{_filter}")
            rows.append({"task": task, "metric": metric, "value": float(value),
                         "stderr": float(stderr) if isinstance(stderr, (int, float)) else None})
    return rows


def task_table(rows: list[dict], ppl: dict[str, float] | None = None) -> str:
    """Task, metric, value; perplexities (file -> value) first, as rows of the same table."""
    lines = [f"{'task':<28} {'metric':<12} {'value':>10}"]
    for name, value in (ppl or {}).items():
        lines.append(f"{name.replace(' ', '_'):<28} {'perplexity':<12} {value:>10.4f}")
    for r in rows:
        lines.append(f"{r['task']:<28} {r['metric']:<12} {r['value']:>10.4f}")
    return "\n".join(lines)
