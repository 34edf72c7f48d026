"""A model folder that names custom code runs it only with --trust-remote-code (issue 13.8)."""
import io
import json
import shutil

import pytest

from conftest import CALIB_FILE, STORIES
from crossblock.cli import main

EVIL = """import pathlib
pathlib.Path({ran!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil-llama"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture
def evil_model(tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(STORIES, folder)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "evil-llama"  # no built-in class: only the folder's code could load it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "evil.py").write_text(EVIL.format(ran=str(folder / "RAN")))  # transformers runs a copy
    return folder


COMMANDS = {
    "plan": lambda m, t: ["plan", "--model", m],
    "quantize": lambda m, t: ["quantize", "--model", m, "--calib", str(CALIB_FILE), "--out", str(t / "out"),
                              "--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--quiet"],
    "eval": lambda m, t: ["eval", "--model", m, "--ppl", str(CALIB_FILE), "--max-windows", "1", "--quiet"],
    "preprocess": lambda m, t: ["preprocess", "--model", m, "--calib", str(CALIB_FILE), "--out", str(t / "out"),
                                "--nsamples", "4", "--seqlen", "32", "--quiet"],
    "compare": lambda m, t: ["compare", "--model", m, "--calib", str(CALIB_FILE), "--recipe", "rtn",
                             "--nsamples", "4", "--seqlen", "32", "--batch-size", "4", "--quiet"],
}


@pytest.mark.parametrize("command", COMMANDS)
def test_custom_code_is_refused_even_when_stdin_says_yes(command, evil_model, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 10))
    assert main(COMMANDS[command](str(evil_model), tmp_path)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("crossblock: error:") and "trust" in err, err
    assert not (evil_model / "RAN").exists() and not (tmp_path / "out").exists()


def test_trust_remote_code_flag_runs_it(evil_model, capsys):
    assert main(["plan", "--model", str(evil_model), "--trust-remote-code"]) == 0
    assert (evil_model / "RAN").exists()
