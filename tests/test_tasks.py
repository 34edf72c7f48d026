"""`crossblock eval --tasks`: zero-shot accuracy through lm-evaluation-harness, offline, on the shipped task."""
import sys

import pytest
import yaml

from crossblock.cli import main
from crossblock.eval.tasks import SHIPPED, SHIPPED_DIR
from conftest import CALIB_FILE, EVAL_FILE, STORIES

pytest.importorskip("lm_eval")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def accuracy(capsys, model, *extra) -> dict:
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--tasks", "tinystories_next", "--quiet", *extra]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]]
    return {(r[0], r[-2]): float(r[-1]) for r in rows}


@pytest.mark.slow
def test_same_accuracy_twice_and_rtn_w2_lower_than_fp(tmp_path, capsys):
    fp = accuracy(capsys, STORIES, "--ppl", str(EVAL_FILE), "--seqlen", "128", "--max-windows", "4")
    assert fp == accuracy(capsys, STORIES, "--ppl", str(EVAL_FILE), "--seqlen", "128", "--max-windows", "4")
    assert fp[(EVAL_FILE.name, "perplexity")] > 1 and 0.25 < fp[("tinystories_next", "acc")] <= 1
    out = tmp_path / "rtn2"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", "2", "--group-size", "-1"]) == 0
    rtn = accuracy(capsys, out)
    # 300 items: a difference of 0.1 is over 3 standard errors (FP 0.48, RTN W2 0.23 when written)
    for metric in ("acc", "acc_norm"):
        assert rtn[("tinystories_next", metric)] < fp[("tinystories_next", metric)] - 0.1


@pytest.mark.slow
def test_a_task_folder_of_ones_own(tmp_path, capsys):
    config = yaml.safe_load(SHIPPED["tinystories_next"].read_text())
    config["task"] = "my_stories"
    config["dataset_kwargs"]["data_files"] = {"test": str(SHIPPED_DIR / "tinystories_next.jsonl")}
    (tmp_path / "my_stories.yaml").write_text(yaml.safe_dump(config))
    capsys.readouterr()
    assert main(["eval", "--model", str(STORIES), "--tasks", "my_stories", "--task-dir", str(tmp_path),
                 "--limit", "20", "--quiet"]) == 0
    assert "my_stories" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    pytest.param(["--tasks", "no_such_task_anywhere"], "unknown task(s) no_such_task_anywhere",
                 marks=pytest.mark.slow),  # loads lm_eval's task index: ~5 s
    (["--tasks", ","], "--tasks needs at least one task name"),
    ([], "eval needs --ppl FILE(s) and/or --tasks"),
])
def test_bad_task_input_exits_2(extra, message, capsys):
    assert main(["eval", "--model", str(STORIES), "--quiet", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_more_fewshot_examples_than_the_task_holds_is_one_line(capsys):
    assert main(["eval", "--model", str(STORIES), "--tasks", "tinystories_next", "--num-fewshot", "400", "--limit", "2",
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "num fewshot 400 is more examples than the task(s) tinystories_next" in err


def test_without_lm_eval_one_line_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    assert main(["eval", "--model", str(STORIES), "--tasks", "tinystories_next"]) == 2
    err = capsys.readouterr().err.strip()
    assert "pip install crossblock[eval]" in err and len(err.splitlines()) == 1


def hostile_folder(tmp_path, marker):
    """The shipped task, but lm-eval imports utils.py from the folder to process its documents."""
    folder = tmp_path / "hostile"
    folder.mkdir()
    config = yaml.safe_load(SHIPPED["tinystories_next"].read_text())
    config["task"] = "evil"
    config["dataset_kwargs"]["data_files"] = {"test": str(SHIPPED_DIR / "tinystories_next.jsonl")}
    (folder / "evil.yaml").write_text(yaml.safe_dump(config) + "process_docs: !function utils.process_docs\n")
    (folder / "utils.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "def process_docs(docs):\n    return docs\n")
    return folder


def test_task_folder_code_runs_only_with_consent(tmp_path, capsys):
    marker = tmp_path / "code_ran"
    folder = hostile_folder(tmp_path, marker)
    assert main(["eval", "--model", str(STORIES), "--tasks", "evil", "--task-dir", str(folder), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "!function" in err and "--trust-task-dir" in err and len(err.splitlines()) == 1
    assert not marker.exists()
    # the same tag in a file the folder includes from elsewhere
    outside = tmp_path / "elsewhere.yaml"
    outside.write_text((folder / "evil.yaml").read_text())
    sneaky = tmp_path / "sneaky"
    sneaky.mkdir()
    (sneaky / "t.yaml").write_text(f"include: {outside}\ntask: sneaky\n")
    assert main(["eval", "--model", str(STORIES), "--tasks", "sneaky", "--task-dir", str(sneaky), "--quiet"]) == 2
    assert "!function" in capsys.readouterr().err and not marker.exists()
    # consent given: lm-eval imports the folder's code, as asked
    assert main(["eval", "--model", str(STORIES), "--tasks", "evil", "--task-dir", str(folder), "--limit", "5",
                 "--quiet", "--trust-task-dir"]) == 0
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("defines", ["group: hellaswag", "task: arc_easy", "task: tinystories_next"])
def test_task_folder_may_not_replace_a_task_by_name(tmp_path, capsys, defines):
    (tmp_path / "t.yaml").write_text(f"{defines}\ndataset_path: json\n")
    assert main(["eval", "--model", str(STORIES), "--tasks", "tinystories_next", "--task-dir", str(tmp_path),
                 "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert defines.split()[1] in err and "replace" in err and len(err.splitlines()) == 1
