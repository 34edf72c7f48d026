"""The command line is a skin over the API: for the same recipe, `crossblock quantize` and
`cb.quantize(..., format=F)` + `cb.save(..., format=F)` write the same files, byte for byte
(crossblock.json aside, whose timings and paths differ; its recipe and per-block errors agree)."""
import json

import pytest

import crossblock as cb
from crossblock.cli import main
from crossblock.data.text import read_texts
from conftest import CALIB_FILE, STORIES

SMALL = dict(nsamples=8, seqlen=64, batch_size=4, iters=3)


def flags(settings: dict) -> list[str]:
    return [x for k, v in settings.items() for x in (f"--{k.replace('_', '-')}", str(v))
            if not isinstance(v, bool)] + [f"--{k}" for k, v in settings.items() if v is True]


# gptq needs whole int32 words along 172-wide layers (8 bits) and non-zero zero points (sym)
@pytest.mark.slow
@pytest.mark.parametrize("fmt,grid", [
    ("fake", dict(wbits=3, group_size=32)),
    ("compressed-tensors", dict(wbits=4, group_size=-1)),
    ("gptq", dict(wbits=8, group_size=-1, sym=True)),
])
def test_api_and_cli_write_byte_identical_files(tmp_path, fmt, grid):
    settings = {**SMALL, **grid}
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(tmp_path / "cli"),
                 "--recipe", "block", "--format", fmt, "--quiet", *flags(settings)]) == 0
    model, tok = cb.load_model(str(STORIES))
    model, report = cb.quantize(model, tok, cb.Recipe.preset("block", **settings), calib=read_texts([CALIB_FILE]),
                                format=fmt, progress=False)
    cb.save(model, tok, tmp_path / "api", format=fmt, report=report)

    files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "api").iterdir())
    for name in files:
        if name not in ("crossblock.json", "README.md"):  # the card is written from crossblock.json
            assert (tmp_path / "cli" / name).read_bytes() == (tmp_path / "api" / name).read_bytes(), name
    cli, api = (json.loads((tmp_path / side / "crossblock.json").read_text()) for side in ("cli", "api"))
    assert cli["recipe"] == api["recipe"] and cli["blocks"] == api["blocks"]
    if fmt == "gptq":  # the API, not the CLI, rounded the scales to what the format stores
        assert api["recipe"]["grid"]["scale_dtype"] == "float16"


def test_the_cli_offers_every_registered_format():
    from crossblock import export
    from crossblock.cli import build_parser
    quantize = build_parser()._subparsers._group_actions[0].choices["quantize"]
    offered = next(a.choices for a in quantize._actions if a.dest == "format")
    assert sorted(offered) == sorted(export.FORMATS.names()) == ["compressed-tensors", "fake", "gguf", "gptq"]
