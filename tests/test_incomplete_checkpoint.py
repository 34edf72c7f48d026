"""A checkpoint whose files do not fill its model exactly is refused in one line naming the
weight, wherever a model is loaded (quantize, eval, compare, crossblock.load, the low-memory
reader), instead of running on values transformers made up (issue 26.1)."""
import json
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

import crossblock as cb
from conftest import CALIB_FILE, EVAL_FILE, STORIES
from crossblock.cli import main
from crossblock.errors import CrossblockError

Q_PROJ = "model.layers.1.self_attn.q_proj.weight"
DOWN_PROJ = "model.layers.2.mlp.down_proj.weight"
FAST = ["--nsamples", "8", "--seqlen", "64", "--batch-size", "4", "--quiet"]


def stories_copy(folder, edit=None, config=None):
    """stories260k with its weights passed through `edit` (a dict of tensors, changed in place)
    and its config through `config`."""
    shutil.copytree(STORIES, folder)
    tensors = load_file(folder / "model.safetensors")
    if edit:
        edit(tensors)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    if config:
        settings = json.loads((folder / "config.json").read_text())
        config(settings)
        (folder / "config.json").write_text(json.dumps(settings))
    return folder


DEFECTS = {  # name -> (edit of the weights, edit of the config, what the one line says)
    "missing": (lambda t: t.pop(DOWN_PROJ), None, f"weight {DOWN_PROJ} is missing from the checkpoint"),
    "missing norm": (lambda t: t.pop("model.norm.weight"), None, "weight model.norm.weight is missing"),
    "one block more in config.json": (None, lambda c: c.update(num_hidden_layers=c["num_hidden_layers"] + 1),
                                      "weight model.layers.5.input_layernorm.weight (and 8 more) is missing"),
    "extra": (lambda t: t.update({"model.layers.1.self_attn.extra.weight": t[Q_PROJ].clone()}), None,
              "weight model.layers.1.self_attn.extra.weight in the checkpoint is no part of the model"),
    "mismatched": (lambda t: t.update({Q_PROJ: t[Q_PROJ][:, :-1].contiguous()}), None,
                   f"weight {Q_PROJ} has shape (64, 63) in the checkpoint, the model (64, 64)"),
}
MAIN_DEFECTS = ("missing", "extra", "mismatched")


@pytest.fixture(scope="module")
def defective(tmp_path_factory):
    root = tmp_path_factory.mktemp("defective")
    return {name: stories_copy(root / name.replace(" ", "_"), edit, config)
            for name, (edit, config, _) in DEFECTS.items()}


def command(name, folder, out):
    return {
        "quantize": ["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--out", str(out), "--recipe",
                     "rtn", "--wbits", "4", "--group-size", "32", *FAST],
        "quantize --low-memory": ["quantize", "--model", str(folder), "--calib", str(CALIB_FILE), "--out", str(out),
                                  "--recipe", "rtn", "--wbits", "4", "--group-size", "32", "--low-memory", *FAST],
        "eval": ["eval", "--model", str(folder), "--ppl", str(EVAL_FILE), "--seqlen", "64", "--max-windows", "2",
                 "--quiet"],
        "compare": ["compare", "--model", str(folder), "--calib", str(CALIB_FILE), "--recipe", "rtn", "--wbits", "4",
                    "--group-size", "32", *FAST],
    }[name]


@pytest.mark.parametrize("cmd", ["quantize", "quantize --low-memory", "eval", "compare"])
@pytest.mark.parametrize("defect", MAIN_DEFECTS)
def test_cli_refuses_a_checkpoint_that_does_not_fill_its_model(defect, cmd, defective, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(command(cmd, defective[defect], out)) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:") and DEFECTS[defect][2] in err, err
    assert "without --low-memory" not in err
    assert "perplexity" not in captured.out and "wrote" not in captured.out and "recipe" not in captured.out
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


@pytest.mark.parametrize("defect", ["missing norm", "one block more in config.json"])
def test_quantize_refuses_other_missing_weights(defect, defective, tmp_path, capsys):
    assert main(command("quantize", defective[defect], tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and DEFECTS[defect][2] in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("defect", MAIN_DEFECTS)
def test_load_refuses_a_checkpoint_that_does_not_fill_its_model(defect, defective):
    with pytest.raises(CrossblockError) as refused:
        cb.load(defective[defect])
    assert DEFECTS[defect][2] in str(refused.value) and len(str(refused.value).splitlines()) == 1


@pytest.mark.slow
def test_refusal_is_one_line_without_transformers_report(defective, tmp_path):
    """Without --quiet transformers would print its LOAD REPORT table first: stderr holds the
    progress bars and the one line, no table, no traceback."""
    args = [a for a in command("quantize", defective["missing"], tmp_path / "out") if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "crossblock", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 1 and lines[0].startswith("crossblock: error:") and DEFECTS["missing"][2] in lines[0], r.stderr
    assert "LOAD REPORT" not in r.stderr and "Traceback" not in r.stderr


def test_tied_head_and_buffers_are_not_reported(tmp_path):
    """stories260k stores its head once (tied to the embeddings) and no rotary inv_freq: it loads,
    on both paths, and its quantized output loads back."""
    model, _ = cb.load_model(str(STORIES))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    cb.load_model(str(STORIES), on_meta=True)
    assert main(command("quantize", STORIES, tmp_path / "out")) == 0
    cb.load(tmp_path / "out")
