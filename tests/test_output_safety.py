"""OUT never costs the user anything (issue 13.1), two runs never share it (13.6), and a kill
during the final save resumes to the uninterrupted output (13.4)."""
import shutil
import subprocess
import sys
import time

import pytest

import crossblock.output as output
from conftest import CALIB_FILE, STORIES
from crossblock.cli import main
from crossblock.output import partial_dir
from test_resume import cli, windows_done

FAST = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "-1", "--quiet"]


def quantize_args(out, *extra, model=STORIES, calib=CALIB_FILE):
    return ["quantize", "--model", str(model), "--calib", str(calib), "--out", str(out), *FAST, *extra]


def one_line_error(capsys, pattern: str) -> str:
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:") and pattern in err, err
    assert "Traceback" not in err and "wrote" not in captured.out
    return err


def user_folder(tmp_path):
    """A working directory holding the user's files, the model and the calibration text."""
    work = tmp_path / "work"
    shutil.copytree(STORIES, work / "model")
    shutil.copy(CALIB_FILE, work / "calib.txt")
    (work / "notes.txt").write_text("mine")
    (tmp_path / "sentinel.txt").write_text("also mine")
    return work


def sentinels_survive(tmp_path):
    work = tmp_path / "work"
    assert (work / "notes.txt").read_text() == "mine" and (tmp_path / "sentinel.txt").read_text() == "also mine"
    assert (work / "model" / "config.json").is_file() and (work / "calib.txt").is_file()


DANGEROUS = {  # OUT (relative to the working directory) -> the message
    "the working directory": (".", "would replace the working directory"),
    "its parent": ("..", "would replace the working directory"),
    "the model folder": ("model", "would replace model"),
    "the calibration file": ("calib.txt", "would replace calib.txt"),
    "a folder of the user's": ("notes", "not a crossblock output"),
}


@pytest.mark.parametrize("case", DANGEROUS)
def test_overwrite_never_removes_what_crossblock_did_not_write(case, tmp_path, monkeypatch, capsys):
    work = user_folder(tmp_path)
    (work / "notes").mkdir()
    (work / "notes" / "diary.txt").write_text("mine")
    monkeypatch.chdir(work)
    out, message = DANGEROUS[case]
    assert main(quantize_args(out, "--overwrite", model="model", calib="calib.txt")) == 2
    one_line_error(capsys, message)
    sentinels_survive(tmp_path)
    assert (work / "notes" / "diary.txt").read_text() == "mine"
    assert not list(tmp_path.rglob(".*.partial"))


@pytest.mark.slow
@pytest.mark.parametrize("first", [["--format", "fake"], ["--format", "compressed-tensors"], ["preprocess"]])
def test_overwrite_replaces_a_crossblock_output(first, tmp_path, capsys):
    out = tmp_path / "out"
    if first == ["preprocess"]:
        assert main(["preprocess", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out),
                     "--nsamples", "8", "--seqlen", "64", "--quiet"]) == 0
    else:
        assert main(quantize_args(out, *first)) == 0
        assert main(["report", str(out), "--no-plot"]) == 0
    (out / "checkpoint.safetensors").write_bytes(b"")  # as a kill just after the final rename leaves it
    assert main(quantize_args(out, "--overwrite")) == 0
    assert (out / "crossblock.json").is_file() and not (out / "cfp.json").exists()
    assert not partial_dir(out).exists() and not list(out.glob("checkpoint*")) and not (out / "crossblock.lock").exists()


def project(tmp_path, marker: str):
    """A user's folder that holds a file named like crossblock's marker (issue 26.2)."""
    out = tmp_path / "proj"
    (out / "src").mkdir(parents=True)
    (out / ".git").mkdir()
    (out / "src" / "important.py").write_text("x")
    (out / marker).write_text("{}")
    return out


FOREIGN = {  # what OUT holds -> the reason the one line gives
    "an empty crossblock.json": (lambda t: project(t, "crossblock.json"), "its crossblock.json is not one crossblock wrote"),
    "an empty cfp.json": (lambda t: project(t, "cfp.json"), "its cfp.json is not one crossblock wrote"),
    "a crossblock.json with crossblock's keys": (
        lambda t: (project(t, "crossblock.json") / "crossblock.json").write_text('{"format": "fake", "activations": null}')
        and t / "proj", "it holds .git, which crossblock does not write"),
}


@pytest.mark.parametrize("case", FOREIGN)
def test_overwrite_refuses_a_folder_with_a_marker_it_did_not_write(case, tmp_path, capsys):
    make, why = FOREIGN[case]
    out = make(tmp_path)
    assert main(quantize_args(out, "--overwrite")) == 2
    one_line_error(capsys, f"output folder {out} is not a crossblock output ({why})")
    assert (out / "src" / "important.py").read_text() == "x" and (out / ".git").is_dir()
    assert not partial_dir(out).exists()


@pytest.mark.slow
def test_overwrite_refuses_a_crossblock_output_holding_a_users_file(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(quantize_args(out)) == 0
    (out / "notes.txt").write_text("mine")
    before = sorted(p.name for p in out.iterdir())
    capsys.readouterr()
    assert main(quantize_args(out, "--overwrite")) == 2
    one_line_error(capsys, "it holds notes.txt, which crossblock does not write")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == before


@pytest.mark.slow
def test_second_run_on_the_same_out_refuses_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "out"
    first = cli(out)
    try:
        deadline = time.time() + 300
        while windows_done(out) < 1:
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.02)
        for flag in ([], ["--overwrite"], ["--resume"]):
            assert main(quantize_args(out, *flag)) == 2
            err = one_line_error(capsys, "another crossblock run")
            assert f"pid {first.pid}" in err
            assert first.poll() is None  # still running: nothing of its was deleted
    finally:
        rc = first.wait()
    assert rc == 0, first.stderr.read()  # the first run was not disturbed
    assert (out / "crossblock.json").is_file()


@pytest.mark.slow
def test_lock_is_released_for_the_next_run(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from crossblock.output import lock_staging; "
                               f"lock_staging(sys.argv[1]); print('locked', flush=True); time.sleep(60)",
                               str(partial_dir(tmp_path / "out"))], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(output.CrossblockError, match=f"pid {holder.pid}"):
        output.prepare_staging(tmp_path / "out")
    holder.kill()
    holder.wait()
    assert output.prepare_staging(tmp_path / "out") == partial_dir(tmp_path / "out")
    output.release(partial_dir(tmp_path / "out"))


class Killed(KeyboardInterrupt):
    """Stands for a SIGKILL: staged_dir keeps a staging folder that holds a checkpoint."""


def kill_after_weights(monkeypatch):
    import crossblock.export as export
    real = export.save

    def save(*args, **kwargs):
        real(*args, **kwargs)
        raise Killed
    monkeypatch.setattr(export, "save", save)


def kill_at_rename(monkeypatch):  # crossblock.json written, the folder not yet renamed
    def replace(*args):
        raise Killed
    monkeypatch.setattr(output.os, "replace", replace)


def kill_after_rename(monkeypatch):  # renamed, the checkpoints not yet deleted
    real = output.checkpoint_files

    def files(folder):
        if not folder.name.endswith(".partial"):
            raise Killed
        return real(folder)
    monkeypatch.setattr(output, "checkpoint_files", files)


@pytest.mark.slow
@pytest.mark.parametrize("kill", [kill_after_weights, kill_at_rename, kill_after_rename])
def test_kill_during_the_final_save_then_resume_gives_the_uninterrupted_output(kill, tmp_path, monkeypatch, capsys):
    args = ["--recipe", "block", "--iters", "5", "--wbits", "3"]
    assert main(quantize_args(tmp_path / "ref", *args)) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        kill(m)
        assert main(quantize_args(out, *args)) == 130
    capsys.readouterr()
    assert main(quantize_args(out, *args, "--resume")) == 0
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "ref" / "model.safetensors").read_bytes()
    assert (out / "crossblock.json").is_file() and not partial_dir(out).exists()
    assert not list(out.glob("checkpoint*")) and not (out / "crossblock.lock").exists()
