"""Careless inputs end in exit code 2 and one line, before any work, never a traceback or a
silent no-op (issue 13.5 and 13.7, the parts outside recipe validation)."""
import errno
import os
import pickle
import sys

import pytest
import torch

import crossblock as cb
from conftest import CALIB_FILE, EVAL_FILE, STORIES, load_stories
from crossblock.cli import main
from crossblock.errors import CrossblockError

FAST = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--group-size", "-1", "--quiet"]


def quantize_args(out, *extra):
    return ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), *FAST, *extra]


TASK = ["--tasks", "tinystories_next"]


def eval_args(*extra, model=STORIES):
    return ["eval", "--model", str(model), "--ppl", str(EVAL_FILE), "--quiet", *extra]


def no_tokenizer(t):
    folder = t / "bare"
    folder.mkdir()
    for f in ("config.json", "model.safetensors"):
        os.link(STORIES / f, folder / f)
    return eval_args(model=folder)


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pickle_bin(t):
    folder = t / "bin"
    folder.mkdir()
    os.link(STORIES / "config.json", folder / "config.json")
    with open(folder / "pytorch_model.bin", "wb") as f:
        pickle.dump(Payload(), f)
    return eval_args(model=folder)


CASES = {
    "--dtype float99": (lambda t: quantize_args(t / "out", "--dtype", "float99"), "unsupported dtype 'float99'"),
    "--device tpu": (lambda t: quantize_args(t / "out", "--device", "tpu"), "device 'tpu'"),
    "--device cuda without CUDA": (lambda t: quantize_args(t / "out", "--device", "cuda"), "CUDA is not available"),
    "--save-dtype int8": (lambda t: quantize_args(t / "out", "--save-dtype", "int8"), "unsupported save dtype"),
    "eval --seqlen 0": (lambda t: eval_args("--seqlen", "0"), "seqlen must be"),
    "eval --seqlen 1": (lambda t: eval_args("--seqlen", "1"), "seqlen must be"),
    "eval --seqlen -5": (lambda t: eval_args("--seqlen", "-5"), "seqlen must be"),
    "eval --max-windows 0": (lambda t: eval_args("--max-windows", "0"), "max windows must be"),
    "eval --max-windows -1": (lambda t: eval_args("--max-windows", "-1"), "max windows must be"),
    "eval --dtype float99": (lambda t: eval_args("--dtype", "float99"), "unsupported dtype"),
    "eval --device tpu": (lambda t: eval_args("--device", "tpu"), "device 'tpu'"),
    "eval of a folder without tokenizer": (no_tokenizer, "cannot load a tokenizer"),
    "eval of a pickled .bin": (pickle_bin, "model.safetensors"),
    # eval --tasks: numbers no task runs with, refused before the model loads (issue 26.5)
    "eval --limit 0": (lambda t: eval_args(*TASK, "--limit", "0"), "limit must be a positive integer"),
    "eval --limit -1": (lambda t: eval_args(*TASK, "--limit", "-1"), "limit must be a positive integer"),
    "eval --num-fewshot -1": (lambda t: eval_args(*TASK, "--num-fewshot", "-1"), "num fewshot must be an integer >= 0"),
    "eval --task-batch-size 0": (lambda t: eval_args(*TASK, "--task-batch-size", "0"), "task batch size must be a positive"),
    "eval --task-batch-size -3": (lambda t: eval_args(*TASK, "--task-batch-size", "-3"), "task batch size must be a positive"),
    "--nsamples 2 under a batch size of 8": (lambda t: quantize_args(t / "out", "--nsamples", "2", "--batch-size", "8"),
                                             "nsamples 2 is fewer than batch_size 8"),
    "--nsamples 2 under the recipe's batch size": (
        lambda t: ["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(t / "out"), "--recipe",
                   "rtn", "--nsamples", "2"], "nsamples 2 is fewer than batch_size 8 (sequences per step): set nsamples >= 8"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line(case, tmp_path, monkeypatch, capsys):
    if "CUDA" in CASES[case][1] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)
    args, pattern = CASES[case][0](tmp_path), CASES[case][1]
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:") and pattern in err, err
    assert "wrote" not in captured.out and "perplexity" not in captured.out
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial*"))
    assert not (tmp_path / "PWNED").exists()


def test_save_dtype_is_refused_before_quantizing(tmp_path, monkeypatch):
    import crossblock.api as api
    from crossblock.engine.reconstruct import WindowEngine
    monkeypatch.setattr(WindowEngine, "quantize", lambda *a, **k: pytest.fail("quantized first"))
    assert main(quantize_args(tmp_path / "out", "--save-dtype", "int8")) == 2


def test_report_on_a_read_only_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(quantize_args(out, "--recipe", "gptq")) == 0
    capsys.readouterr()
    os.chmod(out, 0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        assert main(["report", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "cannot write" in err and "--no-plot" in err
    finally:
        os.chmod(out, 0o755)


def test_task_numbers_are_refused_before_the_model_loads(monkeypatch, capsys):
    import crossblock.api as api
    monkeypatch.setattr(api, "load", lambda *a, **k: pytest.fail("loaded first"))
    assert main(eval_args(*TASK, "--limit", "0")) == 2
    assert "limit must be" in capsys.readouterr().err


def test_report_without_matplotlib_prints_the_table_and_says_no_plot(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    assert main(quantize_args(out, "--recipe", "rtn")) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["block", "rel.", "MSE", "RTN", "rel.", "MSE", "ratio", "per-token"]
    assert len(printed) == 1 + 5 + 1 and "not written" in printed[-1] and "crossblock[plot]" in printed[-1]
    assert not (out / "error_by_block.png").exists()


@pytest.mark.slow
def test_full_disk_in_safetensors_is_one_line(tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    import crossblock.export as export

    def no_space(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                              "message: \"No space left on device\" })")
    monkeypatch.setattr(export, "save", no_space)
    out = tmp_path / "out"
    assert main(quantize_args(out)) == 2
    assert capsys.readouterr().err.strip() == f"crossblock: error: cannot write output folder {out}: disk full"
    assert not out.exists()


API_CASES = {
    "calib=42": (dict(calib=42), "calib must be a text, a list of texts, a Mix"),
    "float ids": (dict(calib=torch.rand(8, 64)), "must be an integer tensor"),
    "ids past the vocabulary": (dict(calib=torch.full((8, 64), 10 ** 6)), "the vocabulary"),
    "negative ids": (dict(calib=torch.full((8, 64), -1)), "the vocabulary"),
}


@pytest.mark.parametrize("case", API_CASES)
def test_api_refuses_bad_calibration(case):
    model, tok = load_stories()
    kwargs, pattern = API_CASES[case]
    with pytest.raises(CrossblockError, match=pattern):
        cb.quantize(model, tok, cb.Recipe.preset("rtn", nsamples=8, seqlen=64, batch_size=4), progress=False, **kwargs)


def test_quantized_model_is_not_quantized_again():
    model, tok = load_stories()
    recipe = cb.Recipe.preset("rtn", nsamples=8, seqlen=64, batch_size=4, group_size=-1)
    cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text()[:200_000], progress=False)
    with pytest.raises(CrossblockError, match="already quantized"):
        cb.quantize(model, tok, recipe, calib=CALIB_FILE.read_text()[:200_000], progress=False)


@pytest.mark.parametrize("seqlen, max_windows", [(0, None), (1, None), (-5, None), (64, 0), (64, -1)])
def test_evaluate_refuses_empty_windows(seqlen, max_windows, tokenizer):
    model, _ = load_stories()
    with pytest.raises(CrossblockError, match="must be"):
        cb.evaluate(model, tokenizer, EVAL_FILE.read_text()[:5000], seqlen, max_windows, progress=False)
