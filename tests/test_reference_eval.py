"""`crossblock eval --reference FP`: KL to the full-precision model, top-1 agreement, both perplexities."""
import json

import pytest

import crossblock as cb
from crossblock.cli import main
from conftest import CALIB_FILE, EVAL_FILE, STORIES

WINDOWS = ["--seqlen", "128", "--max-windows", "4"]


def reference_json(capsys, model, *extra) -> dict:
    capsys.readouterr()
    assert main(["eval", "--model", str(model), "--reference", str(STORIES), "--ppl", str(EVAL_FILE), "--json",
                 "--quiet", *WINDOWS, *extra]) == 0
    return json.loads(capsys.readouterr().out)


def quantized(tmp_path, bits) -> str:
    out = tmp_path / f"rtn{bits}"
    assert main(["quantize", "--model", str(STORIES), "--calib", str(CALIB_FILE), "--out", str(out), "--quiet",
                 "--recipe", "rtn", "--wbits", str(bits), "--group-size", "-1", "--nsamples", "8", "--seqlen", "64",
                 "--batch-size", "4"]) == 0
    return out


def test_identical_model_has_kl_zero_and_full_agreement(capsys):
    same = reference_json(capsys, STORIES)
    assert set(same) == {"kl", "top1", "ppl", "ppl_reference", "tokens"}
    assert abs(same["kl"]) < 1e-6 and same["top1"] == 1.0 and same["ppl"] == same["ppl_reference"]
    assert same["tokens"] == 4 * 127
    # the same number as plain `eval --ppl` (the protocol is one)
    assert main(["eval", "--model", str(STORIES), "--ppl", str(EVAL_FILE), "--quiet", *WINDOWS]) == 0
    assert capsys.readouterr().out.split()[-1] == f"{same['ppl']:.4f}"


@pytest.mark.slow
def test_fewer_bits_move_further_from_the_reference(tmp_path, capsys):
    w4, w2 = (reference_json(capsys, quantized(tmp_path, bits)) for bits in (4, 2))
    assert 0 < w4["kl"] < w2["kl"] and w4["top1"] > w2["top1"]
    assert w2["ppl"] > w4["ppl"] > w4["ppl_reference"] == w2["ppl_reference"]
    capsys.readouterr()
    assert main(["eval", "--model", str(tmp_path / "rtn2"), "--reference", str(STORIES), "--ppl", str(EVAL_FILE),
                 "--quiet", *WINDOWS]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "KL(FP||Q)" in table[0] and float(table[1].split()[3]) == pytest.approx(w2["kl"], abs=1e-5)


def test_reference_needs_a_text_and_the_same_vocabulary(tmp_path, capsys):
    assert main(["eval", "--model", str(STORIES), "--reference", str(STORIES), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference compares on a text" in err and len(err.splitlines()) == 1
    from transformers import LlamaConfig, LlamaForCausalLM
    other = tmp_path / "other"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                 vocab_size=1000)).save_pretrained(other)
    model, tok = cb.load_model(str(STORIES))
    with pytest.raises(cb.CrossblockError, match="reference's vocabulary"):
        cb.evaluate(model, tok, EVAL_FILE.read_text(), seqlen=128, max_windows=1,
                    reference=cb.load(str(other)), progress=False)
