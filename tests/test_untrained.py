"""Recipes that train nothing (rtn, gptq) report each block's output error on the first
REPORT_SAMPLES calibration sequences: RTN runs nothing else through the model, GPTQ still runs
every sequence through the quantized chain for its Hessians, and the weights are those of before."""
import json

import pytest

import crossblock as cb
from crossblock.engine.schedule import REPORT_SAMPLES
from crossblock.model.adapter import BlockCall
from crossblock.stages import windows
from conftest import CALIB_FILE, load_stories

CALIB = dict(nsamples=32, seqlen=64, batch_size=4, wbits=3, group_size=32)
# the weights equal those of the code before the change: test_bit_identity's rtn-32 and gptq-32
# cases (more sequences than the report reads) against the reference commit


@pytest.mark.parametrize("preset", ["rtn", "gptq"])
def test_the_report_reads_a_few_sequences_and_the_weights_do_not_change(preset, monkeypatch, tmp_path):
    captured, passes = [], []
    capture, call = windows.capture, BlockCall.__call__
    monkeypatch.setattr(windows, "capture", lambda model, ids, **kw: captured.append(len(ids)) or capture(model, ids, **kw))
    monkeypatch.setattr(BlockCall, "__call__", lambda self, block, h: passes.append(len(h)) or call(self, block, h))
    model, tok = load_stories()
    model, report = cb.quantize(model, tok, cb.Recipe.preset(preset, **CALIB, precision="fp32"),
                                calib=CALIB_FILE.read_text(), progress=False)
    assert report["report_sequences"] == REPORT_SAMPLES < CALIB["nsamples"]
    blocks = len(report["blocks"])
    if preset == "rtn":  # the FP and quantized chains, on the report's sequences only
        assert captured == [REPORT_SAMPLES] and sum(passes) == 2 * REPORT_SAMPLES * blocks
    else:  # every sequence through the quantized chain and the Hessians; FP and RTN chains: the report's
        assert captured == [CALIB["nsamples"]] and report["blocks"][-1]["rtn"]["rel_mse"] > report["blocks"][-1]["rel_mse"]
        assert sum(passes) == (2 * CALIB["nsamples"] + 2 * REPORT_SAMPLES) * blocks
    cb.save(model, tok, tmp_path / "out", report=report)
    assert json.loads((tmp_path / "out" / "crossblock.json").read_text())["report_sequences"] == REPORT_SAMPLES


def test_a_trained_recipe_reports_on_every_sequence():
    model, tok = load_stories()
    _, report = cb.quantize(model, tok, cb.Recipe.preset("block", **CALIB, iters=2), calib=CALIB_FILE.read_text(),
                            progress=False)
    assert report["report_sequences"] == CALIB["nsamples"]
