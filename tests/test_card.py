"""OUT/README.md, the model card: valid YAML front matter + Markdown, the figures of crossblock.json,
and the command that loads the folder's format."""
import json

import pytest
import yaml

from crossblock.cli import main
from conftest import CALIB_FILE, STORIES

LOADS = {"fake": 'AutoModelForCausalLM.from_pretrained("q")', "compressed-tensors": "vllm serve q",
         "gptq": "vllm serve q --quantization gptq"}


@pytest.mark.parametrize("fmt", sorted(LOADS))
def test_card_is_yaml_and_markdown_and_names_the_loading_command(tmp_path, fmt):
    out = tmp_path / "q"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", "8", "--group-size", "-1", "--sym", "--format", fmt,
                 "--nsamples", "8", "--seqlen", "64", "--batch-size", "4"]) == 0
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    header = yaml.safe_load(front)
    assert header["library_name"] == "transformers" and {"crossblock", fmt} <= set(header["tags"])
    assert "base_model" not in header  # a local folder is no hub id
    info = json.loads((out / "crossblock.json").read_text())
    assert LOADS[fmt] in body and "8-bit uniform, per channel, symmetric" in body
    assert f"relative MSE {info['blocks'][-1]['rel_mse']:.4g}" in body
    assert "save check" in body and "# stories260k, quantized with crossblock" in body


@pytest.mark.slow
def test_held_out_quality_is_reported_and_orders_the_bit_widths(tmp_path):
    """crossblock.json's `quality`: KL(FP || Q) and top-1 on held-out calibration windows; RTN W2 is
    further from FP than W8, and the card shows the figures."""
    quality = {}
    for bits in (2, 8):
        out = tmp_path / f"w{bits}"
        assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                     "--recipe", "rtn", "--wbits", str(bits), "--group-size", "-1", "--nsamples", "8",
                     "--seqlen", "64", "--batch-size", "4"]) == 0
        quality[bits] = json.loads((out / "crossblock.json").read_text())["quality"]
        assert f"KL(FP‖Q) {quality[bits]['kl']:.4g}" in (out / "README.md").read_text()
    assert quality[2]["tokens"] == quality[8]["tokens"] == 4 * 63
    assert 0 <= quality[8]["kl"] < quality[2]["kl"]
    assert quality[2]["top1"] < quality[8]["top1"] <= 1.0
    assert quality[8]["ppl_reference"] == quality[2]["ppl_reference"]  # the same FP windows
