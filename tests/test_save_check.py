"""The save check: a written folder is read back by its format's loader and must give the
in-memory model's logits within the format's tolerance, or the save fails and leaves nothing."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import crossblock as cb
from crossblock import export
from crossblock.cli import main
from conftest import CALIB_FILE, STORIES

FORMATS = ["fake", "compressed-tensors", "gptq"]


def quantize_cli(tmp_path, fmt):
    out = tmp_path / fmt
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", "8", "--group-size", "-1", "--sym", "--format", fmt,
                 "--nsamples", "8", "--seqlen", "64", "--batch-size", "4"]) == 0
    return out


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_passes_its_check_on_stories(tmp_path, fmt):
    check = json.loads((quantize_cli(tmp_path, fmt) / "crossblock.json").read_text())["save_check"]
    assert 0 <= check["max_rel_logit_diff"] <= check["tolerance"] == export.require_known_format(fmt).reload_tolerance


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_corrupted_packed_tensor_fails_the_save_in_one_line(tmp_path, monkeypatch, capsys, fmt):
    written = export.save

    def save_then_corrupt(model, tokenizer, folder, *args, **kwargs):
        result = written(model, tokenizer, folder, *args, **kwargs)
        path = folder / "model.safetensors"
        tensors = load_file(path)
        name = next(k for k in sorted(tensors) if "layers.2.mlp.down_proj" in k and
                    k.rsplit(".", 1)[-1] in ("weight", "weight_packed", "qweight"))
        tensors[name] = tensors[name].flip(0).contiguous()  # packed rows in the wrong order
        save_file(tensors, path, metadata={"format": "pt"})
        return result

    monkeypatch.setattr(export, "save", save_then_corrupt)
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", "8", "--group-size", "-1", "--sym", "--format", fmt,
                 "--nsamples", "8", "--seqlen", "64", "--batch-size", "4"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and f"the written {fmt} folder does not reproduce the model" in errors[0]
    assert not out.exists() and not list(tmp_path.rglob("crossblock.json"))


@pytest.mark.slow
def test_low_memory_says_the_check_was_skipped(tmp_path):
    out = tmp_path / "lm"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", "4", "--group-size", "32", "--low-memory",
                 "--nsamples", "8", "--seqlen", "64", "--batch-size", "4"]) == 0
    assert "low-memory" in json.loads((out / "crossblock.json").read_text())["save_check"]["skipped"]
