"""--skip takes the names crossblock.json lists (full names, blocks), block-relative names and
globs, and refuses a pattern that names no layer, before any work (issue 26.3)."""
import json

import pytest
from safetensors.torch import load_file

from conftest import CALIB_FILE, STORIES
from crossblock.cli import main
from crossblock.model.adapter import is_skipped

FAST = ["--recipe", "rtn", "--wbits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64",
        "--batch-size", "4", "--quiet"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj"]
BLOCK0 = {f"model.layers.0.{n}.weight" for n in LINEARS}

CASES = {  # --skip value -> the linear weights left in full precision
    "a full name": ("model.layers.0.self_attn.q_proj", {"model.layers.0.self_attn.q_proj.weight"}),
    "a name as the report lists it": ("model.layers.3.mlp.down_proj.weight", {"model.layers.3.mlp.down_proj.weight"}),
    "a block": ("model.layers.0", BLOCK0),
    "a block-relative name": ("q_proj", {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(5)}),
    "a glob on the full name": ("layers.0.*", BLOCK0),
    "a glob on the relative name": ("*.down_proj", {f"model.layers.{i}.mlp.down_proj.weight" for i in range(5)}),
    "two patterns": ("model.layers.1.mlp,k_proj", {f"model.layers.1.mlp.{n}.weight" for n in ("gate_proj", "up_proj",
                     "down_proj")} | {f"model.layers.{i}.self_attn.k_proj.weight" for i in range(5)}),
}


@pytest.mark.parametrize("case", CASES)
def test_skip_leaves_exactly_the_named_layers_in_full_precision(case, tmp_path):
    pattern, expected = CASES[case]
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), *FAST,
                 "--skip", pattern]) == 0
    report = json.loads((out / "crossblock.json").read_text())
    skipped = {w["name"] for w in report["unquantized"] if w["why"] == "skip pattern" and "norm" not in w["name"]}
    assert skipped == expected
    original, written = load_file(STORIES / "model.safetensors"), load_file(out / "model.safetensors")
    linears = [k for k in original if any(n in k for n in LINEARS)]
    assert {k for k in linears if written[k].equal(original[k])} == expected  # the others were quantized


@pytest.mark.parametrize("pattern", ["model.layers.5", "layers.0.self_attn.q", "layers.9.*", "model.layers.0.attn"])
def test_skip_pattern_matching_nothing_is_refused_before_work(pattern, tmp_path, monkeypatch, capsys):
    from crossblock.engine.reconstruct import WindowEngine
    monkeypatch.setattr(WindowEngine, "quantize", lambda *a, **k: pytest.fail("quantized first"))
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), *FAST,
                 "--skip", f"q_proj,{pattern}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"skip pattern {pattern!r} matches no quantized layer" in err, err
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


def test_block_names_match_whole_parts_only():
    assert is_skipped(["model.layers.1"], "model.layers", 1, "mlp.up_proj")
    assert not is_skipped(["model.layers.1"], "model.layers", 10, "mlp.up_proj")
    assert not is_skipped(["layers.1.*"], "model.layers", 10, "mlp.up_proj")
    assert is_skipped(["model.layers.1?.*"], "model.layers", 10, "mlp.up_proj")
    assert is_skipped(["up"], "model.layers", 3, "mlp.up_proj")  # substrings of the relative name, as before


@pytest.mark.parametrize("fmt", ["gptq", "compressed-tensors"])
@pytest.mark.parametrize("path", ["--no-low-memory", "--low-memory"])
def test_skip_leaving_no_layer_for_a_packed_format_is_refused_before_work(fmt, path, tmp_path, monkeypatch, capsys):
    """A packed format stores quantized layers: a --skip that leaves none is refused before any
    work, not after it (when a --resume would then find the checkpoint disagreeing)."""
    from crossblock.engine.reconstruct import WindowEngine
    monkeypatch.setattr(WindowEngine, "quantize", lambda *a, **k: pytest.fail("quantized first"))
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), *FAST,
                 "--format", fmt, "--sym", "--skip", "mlp,self_attn", path]) == 2
    assert capsys.readouterr().err.strip() == (f"crossblock: error: {fmt} export stores quantized layers, but --skip "
                                               "mlp,self_attn leaves no layer to quantize: skip fewer layers, or use "
                                               "--format fake")
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))
