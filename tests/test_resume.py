"""A run killed with SIGKILL resumes from its last window and ends bit-identical."""
import json
import os
import signal
import subprocess
import sys

import pytest
from safetensors import safe_open

from conftest import CALIB_FILE, STORIES, kill_when
from crossblock.engine.checkpoint import CHECKPOINT_FILE
from crossblock.output import partial_dir

ARGS = ["--recipe", "cbq", "--wbits", "2", "--group-size", "-1", "--iters", "60", "--nsamples", "8",
        "--seqlen", "64", "--batch-size", "4", "--quiet"]


def cli(out, *extra, calib=CALIB_FILE):
    cmd = [sys.executable, "-m", "crossblock", "quantize", "--model", str(STORIES), "--calib", str(calib),
           "--out", str(out), *ARGS, *extra]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # a shell's background job starts with SIGINT ignored, and Python then never raises
    # KeyboardInterrupt: give the child the default disposition, as a terminal would
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def windows_done(out) -> int:
    path = partial_dir(out) / CHECKPOINT_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return int(f.metadata()["next_window"])
    except Exception:
        return 0


def kill_after(out, windows: int):
    kill_when(cli(out), lambda: windows_done(out) >= windows)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    assert cli(ref).wait() == 0

    out = tmp_path / "out"
    kill_after(out, 2)
    assert not out.exists()  # an interrupted run never looks finished
    assert not (partial_dir(out) / "crossblock.json").exists()
    with safe_open(str(partial_dir(out) / CHECKPOINT_FILE), framework="pt") as f:
        assert all(k.startswith("layer.") for k in f.keys())  # no activations: they are replayed
        assert not any(k.startswith(("layer.0.", "layer.1.")) for k in f.keys())  # finished: own files
    assert {p.name for p in partial_dir(out).glob("checkpoint.block*")} >= {
        "checkpoint.block0.safetensors", "checkpoint.block1.safetensors"}
    resumed = cli(out, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    assert not partial_dir(out).exists() and not list(out.glob("checkpoint*"))
    report, ref_report = (json.loads((d / "crossblock.json").read_text()) for d in (out, ref))
    assert report["resumed_at_window"] == 2
    assert report["blocks"] == ref_report["blocks"]  # replayed chains give the same per-block errors


@pytest.mark.slow
def test_resume_with_other_settings_is_refused(tmp_path):
    out = tmp_path / "out"
    kill_after(out, 1)
    other = cli(out, "--resume", "--iters", "61")
    assert other.wait() == 2 and "different model, recipe or calibration" in other.stderr.read()
    short = tmp_path / "calib.txt"
    short.write_text(CALIB_FILE.read_text()[:200_000])
    other = cli(out, "--resume", calib=short)
    assert other.wait() == 2 and "different model, recipe or calibration" in other.stderr.read()
    assert windows_done(out) >= 1  # the refused attempts left the checkpoint alone
    fresh = cli(out)
    assert fresh.wait() == 2 and "interrupted run" in fresh.stderr.read()


def test_finished_blocks_are_written_once_and_read_back(tmp_path):
    import pytest
    import torch
    from crossblock.engine.checkpoint import EngineState, block_path, read_checkpoint, write_checkpoint
    from crossblock.errors import CrossblockError
    frozen = lambda: {"q": torch.randint(0, 4, (4, 8), dtype=torch.uint8), "scale": torch.rand(4, 1)}  # noqa: E731
    live = lambda: {"lora_a": torch.randn(4, 2)}  # noqa: E731
    layers = {"0.q_proj": frozen(), "0.o_proj": frozen(), "1.q_proj": live()}
    write_checkpoint(tmp_path, EngineState(1, dict(layers), {"windows": [1]}), "run")
    first = block_path(tmp_path, 0).stat().st_ino
    layers.update({"1.q_proj": frozen(), "2.q_proj": live()})
    write_checkpoint(tmp_path, EngineState(2, dict(layers), {"windows": [1, 2]}), "run")
    assert block_path(tmp_path, 0).stat().st_ino == first  # not rewritten
    # with the set a run keeps, a finished block's file is not even opened again
    import crossblock.engine.checkpoint as ckpt
    opened = []
    real = ckpt.read_fingerprint
    ckpt.read_fingerprint = lambda path: opened.append(path) or real(path)
    try:
        on_disk: set[int] = set()
        for _ in range(2):  # the same window state twice: what is on disk stays as it was
            write_checkpoint(tmp_path, EngineState(2, dict(layers), {"windows": [1, 2]}), "run", on_disk)
    finally:
        ckpt.read_fingerprint = real
    assert opened == [block_path(tmp_path, 0), block_path(tmp_path, 1)] and on_disk == {0, 1}
    state = read_checkpoint(tmp_path, "run")
    assert state.next_window == 2 and state.report == {"windows": [1, 2]}
    assert state.layers.keys() == layers.keys()
    assert all(torch.equal(state.layers[k][n], v) for k, e in layers.items() for n, v in e.items())
    with pytest.raises(CrossblockError, match="different model, recipe or calibration"):
        read_checkpoint(tmp_path, "another run")
    block_path(tmp_path, 1).unlink()
    with pytest.raises(CrossblockError, match="checkpoint.block1.safetensors, which it needs, is missing"):
        read_checkpoint(tmp_path, "run")


@pytest.mark.slow
def test_every_preset_checkpoints_and_resumes_to_the_same_weights(tmp_path, monkeypatch):
    """In process, every preset and searched clip starts (GPTQ's frozen scales once aliased its init buffers, and
    safetensors refused to write the checkpoint; imatrix's clipping is set after the layer is built)."""
    import pytest
    import torch
    import crossblock as cb
    import crossblock.api as api
    from crossblock.recipe import PRESETS
    from conftest import load_stories

    def run(preset, folder=None):
        model, tok = load_stories()
        preset, _, start = preset.partition("+")
        recipe = cb.Recipe.preset(preset, wbits=3, group_size=-1, iters=3, nsamples=8, seqlen=64, batch_size=4,
                                  **STARTS[start])
        model, report = cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text(), progress=False,
                                    checkpoint_dir=folder)
        return {k: v.clone() for k, v in model.state_dict().items()}, report

    write = api.write_checkpoint

    def write_then_stop(folder, state, key, *on_disk):
        write(folder, state, key, *on_disk)
        if state.next_window == 2:
            raise KeyboardInterrupt
    # a searched clip start, learned (lwc) or fixed, held across windows by cbq's overlapping windows
    STARTS = {"": {}, "clip_search": dict(clip_search=True), "imatrix": dict(init="imatrix"),
              "imatrix-fixed": dict(init="imatrix", lwc=False)}
    for preset in [*PRESETS, "block+clip_search", "cbq+imatrix", "cbq+imatrix-fixed"]:
        ref, _ = run(preset)
        folder = tmp_path / preset
        monkeypatch.setattr(api, "write_checkpoint", write_then_stop)
        with pytest.raises(KeyboardInterrupt):
            run(preset, folder)
        monkeypatch.undo()
        weights, report = run(preset, folder)
        assert report["resumed_at_window"] == 2, preset
        assert all(torch.equal(weights[k], v) for k, v in ref.items()), preset
