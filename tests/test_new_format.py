"""A new export format is one file with one registered `Format` class: the CLI offers it, the
in-memory and the low-memory writers write it (the same bytes), and `crossblock.load` reads it
back through the registry. The toy format here lives in a temporary module and is unregistered
after the test."""
import importlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

import crossblock as cb
from conftest import CALIB_FILE, STORIES
from crossblock.cli import main
from crossblock.export import FORMATS

TOY_MODULE = '''
"""toy: each quantized layer as its uint8 integers, float32 scales and zero points."""
from crossblock.export.common import write_quantization_config
from crossblock.export.formats import FORMATS, Format
from crossblock.quant.grid import QuantizedWeight


@FORMATS.register("toy")
class Toy(Format):
    packed = True
    quant_method = "toy"

    def layer_tensors(self, name, qweight, dtype, act_scheme):
        return {"toy_q": qweight.q, "toy_scale": qweight.scale.float(), "toy_zero": qweight.zero.float()}

    def write_config(self, folder, contents, act_scheme):
        (bits, group_size, sym), = set(contents.settings.values())
        write_quantization_config(folder, {"quant_method": "toy", "bits": bits, "group_size": group_size, "sym": sym})

    def read(self, quantization, tensors, layout):
        names = sorted(k.removesuffix(".toy_q") for k in tensors if k.endswith(".toy_q"))
        return {n: QuantizedWeight(tensors.pop(f"{n}.toy_q"), tensors.pop(f"{n}.toy_scale"), tensors.pop(f"{n}.toy_zero"),
                                   quantization["bits"], quantization["group_size"], quantization["sym"])
                for n in names}
'''
ARGS = ["--recipe", "rtn", "--wbits", "4", "--group-size", "32", "--nsamples", "8", "--seqlen", "64",
        "--batch-size", "4", "--quiet"]


@pytest.fixture
def toy_format(tmp_path):
    """The toy format's module, imported (which registers it), and removed again afterwards."""
    (tmp_path / "crossblock_toy_format.py").write_text(TOY_MODULE)
    sys.path.insert(0, str(tmp_path))
    try:
        yield importlib.import_module("crossblock_toy_format")
    finally:
        FORMATS.classes.pop("toy", None)
        sys.modules.pop("crossblock_toy_format", None)
        sys.path.remove(str(tmp_path))


def quantize(out, fmt, *extra):
    return main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out),
                 "--format", fmt, *ARGS, *extra])


@pytest.mark.slow
def test_a_format_in_one_file_is_written_on_both_paths_and_read_back(tmp_path, toy_format):
    from test_low_memory import hashes
    assert quantize(tmp_path / "memory", "toy", "--no-low-memory") == 0
    assert quantize(tmp_path / "stream", "toy", "--low-memory") == 0
    assert hashes(tmp_path / "memory") == hashes(tmp_path / "stream")
    config = json.loads((tmp_path / "memory" / "config.json").read_text())
    assert config["quantization_config"] == {"quant_method": "toy", "bits": 4, "group_size": 32, "sym": False}
    stored = load_file(tmp_path / "memory" / "model.safetensors")
    layer = "model.layers.0.mlp.down_proj"
    assert stored[f"{layer}.toy_q"].dtype == torch.uint8 and f"{layer}.weight" not in stored
    # the in-memory save check read it back through the registry (crossblock.load) and compared logits
    check = json.loads((tmp_path / "memory" / "crossblock.json").read_text())["save_check"]
    assert 0 <= check["max_rel_logit_diff"] <= check["tolerance"]
    card = (tmp_path / "memory" / "README.md").read_text()  # the format's own Loading text (Format.loading)
    assert 'crossblock.load("memory")' in card and "from_pretrained" not in card
    # read back: the integers as written, and the dense weights of the same run written as fake
    loaded = cb.load(tmp_path / "stream")
    qw = loaded.get_submodule(layer).crossblock_qweight
    assert torch.equal(qw.q, stored[f"{layer}.toy_q"]) and (qw.bits, qw.group_size, qw.sym) == (4, 32, False)
    assert quantize(tmp_path / "fake", "fake") == 0
    fake = cb.load(tmp_path / "fake")
    for name, t in fake.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name


def test_an_unregistered_format_is_not_offered(capsys, tmp_path, toy_format):
    FORMATS.classes.pop("toy")
    with pytest.raises(SystemExit):
        quantize(tmp_path / "o", "toy")
    assert "invalid choice: 'toy'" in capsys.readouterr().err
