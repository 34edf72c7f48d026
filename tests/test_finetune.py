"""The finetune stage: integers stay, the grid trains end to end against the FP model, the
held-out slice picks the step, and it survives a kill, two ranks and every format."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import crossblock as cb
from crossblock.errors import CrossblockError
from crossblock.quant.grid import quantize_to_int
from crossblock.output import partial_dir
from conftest import CALIB_FILE, STORIES, kill_when, load_stories

SMALL = dict(wbits=2, group_size=32, nsamples=32, seqlen=128, batch_size=4, iters=10)


def quantized(**kw):
    model, tok = load_stories()
    fmt = kw.pop("format", "fake")
    recipe = cb.Recipe.preset("block", **{**SMALL, **kw})
    return (*cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text(), format=fmt, progress=False), tok)


def qweights(model):
    return {n: m.crossblock_qweight for n, m in model.named_modules() if hasattr(m, "crossblock_qweight")}


@pytest.mark.slow
def test_finetune_keeps_the_integers_and_lowers_held_out_kl():
    plain, _, _ = quantized()
    tuned, report, _ = quantized(finetune_steps=30, finetune_lr=0.003)
    ft = report["finetune"]
    assert ft["held_out_loss_after"] < 0.97 * ft["held_out_loss_before"] and ft["best_step"] > 0
    before, after = qweights(plain), qweights(tuned)
    assert before.keys() == after.keys()
    moved = 0
    for name, qw in after.items():
        assert torch.equal(qw.q, before[name].q)  # integers unchanged
        moved += not torch.equal(qw.scale, before[name].scale)
        w = tuned.get_submodule(name).weight
        assert torch.equal(w, qw.dequantize())  # every weight on its (trained) grid
    assert moved == len(after)


@pytest.mark.slow
def test_a_stage_that_cannot_improve_keeps_the_start(monkeypatch):
    """lr so large that every step is worse: the held-out slice keeps step 0, the windows' grid."""
    plain, _, _ = quantized()
    tuned, report, _ = quantized(finetune_steps=3, finetune_lr=5.0)
    assert report["finetune"]["best_step"] == 0
    for name, qw in qweights(tuned).items():
        assert torch.equal(qw.scale, qweights(plain)[name].scale)


@pytest.mark.slow
def test_zero_points_train_as_integers_and_symmetric_grids_refuse_it():
    tuned, _, _ = quantized(finetune_steps=10, finetune_zeros=True)
    for qw in qweights(tuned).values():
        assert torch.equal(qw.zero, qw.zero.round()) and qw.zero.min() >= 0 and qw.zero.max() <= 3
    with pytest.raises(CrossblockError, match="zeros has no effect on a symmetric grid"):
        quantized(finetune_steps=2, finetune_zeros=True, sym=True)


@pytest.mark.slow
@pytest.mark.parametrize("fmt,kw", [("fake", dict()),
                                    ("compressed-tensors", dict(wbits=4, group_size=-1)),
                                    ("gptq", dict(wbits=8, group_size=-1, sym=True))])
def test_every_format_reloads_a_finetuned_model_with_equal_logits(tmp_path, fmt, kw):
    model, report, tok = quantized(finetune_steps=6, format=fmt, **kw)
    cb.save(model, tok, tmp_path / "q", format=fmt, report=report)
    ids = tok(CALIB_FILE.read_text()[:3000], return_tensors="pt").input_ids[:, :96]
    with torch.no_grad():
        torch.testing.assert_close(cb.load(tmp_path / "q")(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


ARGS = ["--recipe", "block", "--wbits", "2", "--group-size", "32", "--iters", "5", "--nsamples", "16",
        "--seqlen", "64", "--batch-size", "4", "--finetune-steps", "60", "--quiet", "--device", "cpu"]


def cli(out, *extra, launcher=None):
    cmd = [*(launcher or [sys.executable, "-m", "crossblock"]), "quantize", "--model", str(STORIES),
           "--calib", str(CALIB_FILE), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))


def finetune_step(out) -> int:
    path = partial_dir(out) / "checkpoint.finetune.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads(f.metadata()["state"])["step"]
    except Exception:
        return 0


@pytest.mark.slow
def test_sigkill_during_finetune_then_resume_is_bit_identical(tmp_path):
    ref = tmp_path / "ref"
    assert cli(ref).wait() == 0
    out = tmp_path / "out"
    kill_when(cli(out), lambda: finetune_step(out) >= 20)
    resumed = cli(out, "--resume")
    assert resumed.wait() == 0, resumed.stderr.read()
    assert (out / "model.safetensors").read_bytes() == (ref / "model.safetensors").read_bytes()
    report = json.loads((out / "crossblock.json").read_text())
    assert report["finetune"]["resumed_at_step"] >= 20
    assert report["finetune"]["evals"] == json.loads((ref / "crossblock.json").read_text())["finetune"]["evals"]


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    # float32: the claim is equality up to summation order (bf16 matmuls of other batch shapes round differently)
    steps = ["--finetune-steps", "10", "--finetune-batch-size", "4", "--iters", "0", "--precision", "fp32"]
    assert cli(tmp_path / "one", *steps).wait() == 0
    two = cli(tmp_path / "two", *steps, launcher=[torchrun, "--standalone", "--nproc-per-node=2", "-m", "crossblock"])
    assert two.wait() == 0, two.stderr.read()[-2000:]
    one_r, two_r = (json.loads((tmp_path / d / "crossblock.json").read_text())["finetune"] for d in ("one", "two"))
    torch.testing.assert_close(torch.tensor(one_r["loss_trace"]), torch.tensor(two_r["loss_trace"]), rtol=1e-4, atol=1e-6)
    w1, w2 = (load_file(tmp_path / d / "model.safetensors") for d in ("one", "two"))
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_trained_weights_rounding_beats_rtn_and_crosses_grid_points():
    """Block-AP's parameterization: weights may move past their two nearest grid points."""
    trained, report, _ = quantized(rounding="weights", iters=20)
    assert report["blocks"][-1]["rel_mse"] < report["blocks"][-1]["rtn"]["rel_mse"]
    fp = dict(load_stories()[0].named_modules())
    far = sum(((qw.q.float() - quantize_to_int(fp[n].weight, qw.scale, qw.zero, 2, 32)).abs() >= 2).sum().item()
              for n, qw in qweights(trained).items())
    assert far > 0  # SignRound's offsets (|δ| <= 0.5) can never get there


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_kl_is_the_unchunked_one_and_its_gradient(dtype):
    """ChunkedKL (a few rows at a time, backward recomputed per chunk) against autograd through
    token_kl on the whole batch: the same value and the same gradient, here to the bit."""
    from crossblock.stages.finetune import ChunkedKL, token_kl
    g = torch.Generator().manual_seed(0)
    student, teacher = ((3 * torch.randn(2, 33, 500, generator=g)).to(dtype)[:, :-1] for _ in range(2))
    whole, chunked = (student.clone().requires_grad_(True) for _ in range(2))
    expected = token_kl(whole.flatten(0, 1), teacher.flatten(0, 1)).mean()
    got = ChunkedKL.apply(chunked.flatten(0, 1), teacher.flatten(0, 1), 7)  # 64 rows: 9 uneven chunks
    (0.7 * expected).backward()
    (0.7 * got).backward()
    assert got.item() > 0.1 and torch.equal(got, expected)
    assert chunked.grad.abs().max() > 0 and torch.equal(chunked.grad, whole.grad)


def test_keeping_activations_or_recomputing_them_trains_the_same_bits(monkeypatch):
    """The recompute only trades memory for time: with and without it, the same trained grid."""
    from crossblock.stages import finetune
    steps = dict(finetune_steps=4, iters=0, precision="fp32")
    monkeypatch.setattr(finetune, "free_memory", lambda device: 1 << 50)
    kept, kept_report, _ = quantized(**steps)
    monkeypatch.setattr(finetune, "free_memory", lambda device: 1 << 20)
    recomputed, recomputed_report, _ = quantized(**steps)
    assert kept_report["finetune"]["recompute"] is False and recomputed_report["finetune"]["recompute"] is True
    assert kept_report["finetune"]["loss_trace"] == recomputed_report["finetune"]["loss_trace"]
    for name, qw in qweights(kept).items():
        assert torch.equal(qw.scale, qweights(recomputed)[name].scale)


def test_activations_are_kept_only_where_a_quarter_of_free_memory_holds_them(monkeypatch):
    from crossblock.stages import finetune
    assert finetune.free_memory("cpu") > 0  # Linux: MemAvailable
    layers = [m for m in load_stories()[0].modules() if isinstance(m, torch.nn.Linear)][:4]
    need = sum(m.in_features + m.out_features for m in layers) * 8 * 1024 + \
        sum(m.in_features * m.out_features for m in layers) * 6
    monkeypatch.setattr(finetune, "free_memory", lambda device: 4 * need + 4)
    assert finetune.keeps_activations(layers, 1024, "cpu")
    monkeypatch.setattr(finetune, "free_memory", lambda device: 4 * need - 4)
    assert not finetune.keeps_activations(layers, 1024, "cpu")
    monkeypatch.setattr(finetune, "free_memory", lambda device: None)  # unknown: recompute, the safe side
    assert not finetune.keeps_activations(layers, 1024, "cpu")
