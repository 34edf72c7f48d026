"""Runs that go wrong: non-finite losses, Ctrl-C, a full disk."""
import errno
import signal

import pytest
import torch

import crossblock as cb
import crossblock.engine.reconstruct as rc
from conftest import CALIB_FILE, STORIES, load_stories
from crossblock.cli import main
from crossblock.output import partial_dir
from test_resume import cli, windows_done

RECIPE = dict(wbits=3, group_size=-1, nsamples=8, seqlen=64, batch_size=4, iters=10)


def flaky_loss(monkeypatch, bad_calls):
    """Make the training loss NaN on the given training-step calls (1-based)."""
    real, count = rc.window_loss, {"n": 0}

    def loss(out, target, recipe):
        value = real(out, target, recipe)
        if torch.is_grad_enabled():
            count["n"] += 1
            if count["n"] in bad_calls:
                return value * float("nan")
        return value
    monkeypatch.setattr(rc, "window_loss", loss)


def quantize_with(monkeypatch, bad_calls):
    flaky_loss(monkeypatch, bad_calls)
    model, tok = load_stories()
    return cb.quantize(model, tok, cb.Recipe.preset("block", **RECIPE), calib=CALIB_FILE.read_text(), progress=False)


@pytest.mark.slow
def test_nonfinite_loss_retries_the_window_at_half_lr(monkeypatch):
    model, report = quantize_with(monkeypatch, {3})
    first = report["windows"][0]
    assert first["nonfinite_retries"] == 1 and first["steps"] == 10
    assert all("nonfinite_retries" not in w for w in report["windows"][1:])
    assert len(report["blocks"]) == 5
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_window_that_stays_nonfinite_keeps_its_initialization(monkeypatch):
    # both attempts of window 0 fail (steps 1 and 2 of the retry are calls 2 and 3 overall)
    model, report = quantize_with(monkeypatch, {1, 2})
    first = report["windows"][0]
    assert first["nonfinite_retries"] == 2 and first["steps"] == 0
    assert first["loss_after"] == first["loss_before"]  # RTN initialization, untouched
    assert report["windows"][1]["steps"] == 10  # and the run went on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_only_a_resumable_checkpoint(tmp_path):
    out = tmp_path / "out"
    proc = cli(out)
    while windows_done(out) < 1:
        assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    assert proc.wait() == 130
    assert "interrupted" in proc.stderr.read()
    assert not out.exists() and windows_done(out) >= 1


def test_full_disk_gives_one_line_and_no_output(tmp_path, monkeypatch, capsys):
    import crossblock.export as export

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(export, "save", no_space)
    out = tmp_path / "out"
    args = ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE),
            "--out", str(out), "--recipe", "rtn", "--group-size", "-1", "--nsamples", "8", "--seqlen", "64",
            "--batch-size", "4", "--quiet"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"crossblock: error: cannot write output folder {out}: disk full"
    assert not out.exists()
    assert not (partial_dir(out) / "crossblock.json").exists()


@pytest.mark.slow
def test_disk_offload_gives_identical_weights(tmp_path):
    def weights(offload):
        model, tok = load_stories()
        (tmp_path / offload).mkdir()
        _, report = cb.quantize(model, tok, cb.Recipe.preset("cbq", **RECIPE), calib=CALIB_FILE.read_text(),
                                progress=False, checkpoint_dir=tmp_path / offload, offload=offload)
        assert report["resumed_at_window"] is None and report["offload"] == offload
        assert not list((tmp_path / offload).glob("chain-*"))  # mapped files are unlinked at once
        return torch.cat([p.flatten() for p in model.parameters()])
    assert torch.equal(weights("ram"), weights("disk"))
