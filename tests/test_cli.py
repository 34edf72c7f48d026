"""The command line: end to end on stories260k, and one clear message per bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from crossblock.cli import main
from conftest import CALIB_FILE, EVAL_FILE, STORIES

FAST = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "-1"]


def quantize_args(out, *extra, model=STORIES, calib=CALIB_FILE):
    return ["quantize", "--model", str(model), "--calib", str(calib), "--out", str(out), "--quiet", *FAST, *extra]


@pytest.mark.slow  # a whole quantization in its fixture or body (>1.2 s)
def test_quantize_eval_plan_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "q"
    assert main(quantize_args(out, "--recipe", "la", "--wbits", "3", "--group-size", "-1", "--iters", "3")) == 0
    info = json.loads((out / "crossblock.json").read_text())
    windows = info["recipe"]["stages"][0]["windows"]
    assert info["recipe"]["name"] == "la" and windows["lookahead"] == 1 and windows["train"]["iters"] == 3
    assert len(info["blocks"]) == 5 and len(info["windows"]) == 5
    assert info["calibration"]["files"] == [str(CALIB_FILE)]
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    capsys.readouterr()

    assert main(["eval", "--model", str(out), "--ppl", str(EVAL_FILE), "--seqlen", "128", "--max-windows", "4", "--quiet"]) == 0
    ppl = float(capsys.readouterr().out.split()[-1])
    assert 1 < ppl < 100

    assert main(["report", str(out)]) == 0
    text = capsys.readouterr().out
    assert "RTN rel. MSE" in text and (out / "error_by_block.png").stat().st_size > 1000

    assert main(["plan", "--model", str(STORIES), "--recipe", "cbq", "--lookahead", "1"]) == 0
    plan = capsys.readouterr().out
    assert "4 windows" in plan and "lookahead 1" in plan


def corrupt_copy(tmp_path, fn):
    dst = tmp_path / "model"
    shutil.copytree(STORIES, dst)
    fn(dst)
    return dst


def nan_weights(folder):
    tensors = load_file(folder / "model.safetensors")
    key = next(k for k in tensors if "q_proj" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


BAD_INPUTS = {
    "missing model": (lambda t: quantize_args(t / "out", model=t / "nope"), "model not found"),
    "corrupt model": (lambda t: quantize_args(t / "out", model=corrupt_copy(
        t, lambda d: (d / "model.safetensors").write_bytes(b"garbage"))),
        "model/model.safetensors: not a readable safetensors file"),  # named: an input problem
    "bits too high": (lambda t: quantize_args(t / "out", "--wbits", "9"), "uniform grid: bits must be in 2..8"),
    "bits too low": (lambda t: quantize_args(t / "out", "--wbits", "1"), "uniform grid: bits must be in 2..8"),
    "group size zero": (lambda t: quantize_args(t / "out", "--group-size", "0"), "group_size must be -1"),
    "group wider than layer": (lambda t: quantize_args(t / "out", "--group-size", "128"), "larger than the input width"),
    "empty calibration": (lambda t: quantize_args(t / "out", calib=write(t, "e.txt", "  \n")), "text is empty"),
    "short calibration": (lambda t: quantize_args(t / "out", calib=write(t, "s.txt", "Once upon a time.")),
                          "calibration text too short: \\d+ tokens found, 8 x 64 = 512 needed"),
    "missing calibration": (lambda t: quantize_args(t / "out", calib=t / "none.txt"), "text file not found"),
    "nan weights": (lambda t: quantize_args(t / "out", model=corrupt_copy(t, nan_weights)), "contains NaN or Inf"),
    "format cannot store setting": (lambda t: quantize_args(t / "out", "--format", "gptq", "--wbits", "4",
                                                            "--group-size", "-1"), "gptq export"),
    "unknown recipe": (lambda t: quantize_args(t / "out", "--recipe", "magic"), "unknown recipe 'magic'"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line_and_no_output(case, tmp_path, capsys):
    make_args, message = BAD_INPUTS[case]
    args = make_args(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:")
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial*"))


def test_existing_output_folder_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(quantize_args(out)) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_unwritable_output_location(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(quantize_args(blocker / "out")) == 2
    assert "cannot write output folder" in capsys.readouterr().err


@pytest.mark.slow
def test_module_entry_point_exit_code():
    r = subprocess.run([sys.executable, "-m", "crossblock", "quantize", "--model", "/nonexistent", "--calib",
                        str(CALIB_FILE), "--out", "/tmp/never"], capture_output=True, text=True)
    assert r.returncode == 2 and "model not found" in r.stderr


@pytest.mark.slow
def test_compare_ranks_recipes_on_a_prefix_of_the_model(capsys):
    assert main(["compare", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--recipe", "rtn,block",
                 "--blocks", "2", "--wbits", "2", "--group-size", "-1", "--iters", "10", "--quiet", *FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("quantized blocks: 2;")
    ranked = [line.split() for line in lines[1:-1]]
    assert [r[0] for r in ranked] == ["block", "rtn"]  # sorted by error: reconstruction beats RTN
    assert float(ranked[0][2]) == 1.0 and float(ranked[1][2]) > 1.0
    assert float(ranked[0][3]) < float(ranked[1][3])  # per-token error agrees
    assert int(ranked[0][4].replace(",", "")) > int(ranked[1][4].replace(",", ""))  # and costs more passes


@pytest.mark.parametrize("extra,message", [
    (["--blocks", "9"], "--blocks must be in 1..5 for this model, got 9"),
    (["--recipe", "block,magic"], "unknown recipe 'magic'"),
])
def test_compare_refuses_bad_input(extra, message, capsys):
    assert main(["compare", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--quiet", *FAST, *extra]) == 2
    assert message in capsys.readouterr().err
