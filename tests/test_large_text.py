"""A large calibration file is tokenized only as far as the windows need (issue 13.9)."""
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import CALIB_FILE, STORIES
from crossblock.data.text import WHOLE_CHARS, tokenize

PROBE = textwrap.dedent("""
    import resource, sys
    import torch
    torch.set_num_threads(1)
    import crossblock as cb
    from crossblock.data.text import read_texts
    model, tok = cb.load_model(sys.argv[1])
    text = read_texts(sys.argv[2])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ids = cb.api.calibration_ids(tok, text, cb.Recipe.preset("rtn", nsamples=128, seqlen=512).data)
    grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    print(tuple(ids.shape), int(ids.min()), int(ids.max()), grew // 1024)
""")


@pytest.mark.slow
def test_a_32_mb_calibration_file_costs_little(tmp_path):
    big = tmp_path / "big.txt"
    chunk = CALIB_FILE.read_text()
    with open(big, "w") as f:
        for _ in range(32_000_000 // len(chunk) + 1):
            f.write(chunk)
    out = subprocess.run([sys.executable, "-c", PROBE, str(STORIES), str(big)], capture_output=True, text=True,
                         timeout=300, check=True).stdout.split()
    shape, grew_mib = out[0] + out[1], int(out[4])
    assert shape == "(128,512)" and 0 <= int(out[2]) and int(out[3]) < 512
    # tokenizing the whole file would take ~4.5 GB: the bound shows only a prefix was read (no
    # wall-clock bound here: speed belongs in benchmarks)
    assert grew_mib < 800, f"tokenizing grew RSS by {grew_mib} MiB"


def test_texts_that_fit_are_tokenized_as_before(tokenizer, calib_text):
    assert len(calib_text) <= WHOLE_CHARS
    assert torch.equal(tokenize(tokenizer, calib_text, enough=10), torch.tensor(tokenizer(calib_text)["input_ids"]))


@pytest.mark.slow
def test_a_long_text_chunked_keeps_one_bos_and_every_line(tokenizer, calib_text):
    long = calib_text * (WHOLE_CHARS // len(calib_text) + 2)
    ids = tokenize(tokenizer, long)
    bos = tokenizer.bos_token_id
    if bos is not None:
        assert ids[0] == bos and int((ids == bos).sum()) == int((torch.tensor(tokenizer(calib_text)["input_ids"]) == bos).sum())
    assert abs(ids.numel() - len(tokenizer(long)["input_ids"])) < 0.001 * ids.numel()
    assert tokenize(tokenizer, long, enough=1000).numel() < ids.numel() / 2
