"""Half-precision models (what users have) quantize on the CPU with every preset (issue 13.2)."""
import pytest
import torch

import crossblock as cb
from conftest import CALIB_FILE, STORIES
from crossblock.recipe import PRESETS

RECIPE = dict(wbits=3, group_size=-1, nsamples=8, seqlen=64, batch_size=4, iters=10)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset", list(PRESETS))
def test_half_precision_model_quantizes_and_beats_rtn(dtype, preset):
    model, tok = cb.load_model(str(STORIES), dtype=dtype)
    _, report = cb.quantize(model, tok, cb.Recipe.preset(preset, **RECIPE), calib=CALIB_FILE.read_text()[:300_000],
                            device="cpu", progress=False)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert all(torch.isfinite(p).all() for p in model.parameters())
    last = report["blocks"][-1]
    assert 0 < last["rel_mse"] < 1
    if preset != "rtn":  # the same sequences through the RTN-quantized model
        assert last["rtn"]["quantized_rel_mse"] < last["rtn"]["rel_mse"]
