"""The built-in calibration set and calibration mixes (--calib, --calib-mix)."""
import json
import re

import pytest
import torch

import crossblock as cb
from conftest import CALIB_FILE, STORIES
from crossblock.cli import main
from crossblock.data import builtin
from crossblock.data.calibration import calibration_source
from crossblock.data.text import Mix
from crossblock.errors import CrossblockError


def test_every_domain_is_shipped_with_its_license_listed():
    sources = (builtin.HERE / "SOURCES.md").read_text()
    shipped = sorted(p.name.removesuffix(".txt.xz") for p in builtin.HERE.glob("*.txt.xz"))
    assert shipped == sorted(builtin.WEIGHTS)
    for domain in shipped:
        row = next(line for line in sources.splitlines() if line.startswith(f"| `{domain}.txt.xz`"))
        license_cell = row.split("|")[4]
        assert re.search(r"CC BY-SA|GPL|PSF|public domain", license_cell), (domain, license_cell)
    assert sum(builtin.WEIGHTS.values()) == pytest.approx(1.0)


def test_domains_are_text_and_not_the_benchmarks_texts():
    for domain in builtin.WEIGHTS:
        assert len(builtin.text(domain)) > 800_000
    # neither scored text is in the set: WikiText-2's test split and TinyStories
    assert "Robert Boulter" not in builtin.text("encyclopedic")  # the test split's first article
    assert "Once upon a time" not in builtin.text("narrative")


@pytest.mark.slow  # tokenizing the set three times: ~12 s
def test_the_builtin_windows_are_deterministic(tokenizer):
    a = builtin.mix().windows(tokenizer, 20, 64, seed=0)
    b = builtin.mix().windows(tokenizer, 20, 64, seed=0)
    c = builtin.mix().windows(tokenizer, 20, 64, seed=1)
    assert a.shape == (20, 64) and torch.equal(a, b) and not torch.equal(a, c)


def test_shares_follow_the_weights_and_add_up():
    mix = Mix([("a", "x", 1.0), ("b", "y", 1.0), ("c", "z", 2.0)])
    assert mix.shares(8) == [2, 2, 4]
    assert mix.shares(7) == [2, 2, 3]
    assert [sum(builtin.mix().shares(n)) for n in (1, 7, 128, 512)] == [1, 7, 128, 512]
    assert builtin.mix().shares(20) == [4, 5, 5, 3, 3]


def test_each_source_gives_its_own_windows(tokenizer):
    """A window never straddles two sources: with two distinct texts, every row is one or the other."""
    one, two = "a cat sat on the mat. " * 400, "the dog ran to the park. " * 400
    rows = Mix([("one", one, 1.0), ("two", two, 3.0)]).windows(tokenizer, 8, 16, seed=0)
    ids_one, ids_two = set(tokenizer(one)["input_ids"]), set(tokenizer(two)["input_ids"])
    kinds = [("one" if set(r.tolist()) <= ids_one else "two" if set(r.tolist()) <= ids_two else "mixed") for r in rows]
    assert sorted(kinds) == ["one"] * 2 + ["two"] * 6


@pytest.mark.parametrize("mix, message", [
    (lambda: Mix([]), "at least one source"),
    (lambda: Mix([("a", "text", -1.0)]), "calibration source a: weight must be a finite number >= 0"),
    (lambda: Mix([("a", "text", 0.0)]), "a weight above 0"),
    (lambda: calibration_source(["builtin", str(CALIB_FILE)]), "--calib builtin beside files needs --calib-mix"),
    (lambda: calibration_source([str(CALIB_FILE)], [0.5, 0.5]), "one weight per --calib entry: 1 entries, 2 weights"),
])
def test_bad_mixes_are_refused(mix, message):
    with pytest.raises(CrossblockError, match=re.escape(message)):
        mix()


def test_a_short_source_is_named(tokenizer):
    with pytest.raises(CrossblockError, match="calibration source tiny: calibration text too short"):
        Mix([("tiny", "a few words", 1.0), ("big", "words " * 5000, 1.0)]).windows(tokenizer, 8, 64, seed=0)


def test_files_alone_read_as_before_and_folders_read_their_txt_files(tmp_path):
    text, names = calibration_source([str(CALIB_FILE)])
    assert text == CALIB_FILE.read_text() and names == [str(CALIB_FILE)]
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "notes.md").write_text("not read")
    assert calibration_source([str(tmp_path)])[0] == "first\n\nsecond"
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CrossblockError, match="holds no .txt files"):
        calibration_source([str(empty)])


@pytest.mark.slow
def test_no_calib_means_the_builtin_set(tokenizer):
    mix, names = calibration_source(None)
    assert names == ["builtin"] and [p[0] for p in mix.parts] == [f"builtin:{d}" for d in builtin.WEIGHTS]
    model, tok = cb.load_model(str(STORIES))
    recipe = cb.Recipe.preset("rtn", nsamples=8, seqlen=64, batch_size=4, group_size=-1)
    _, report = cb.quantize(model, tok, recipe, progress=False)  # no calib: the built-in set
    assert [s["source"] for s in report["calibration"]["sources"]] == [f"builtin:{d}" for d in builtin.WEIGHTS]
    assert sum(s["windows"] for s in report["calibration"]["sources"]) == 8
    assert report["calibration"]["sha256"] == cb.api.digest(builtin.mix().windows(tok, 8, 64, 0))


@pytest.mark.slow
def test_cli_mix_of_builtin_and_a_file(tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(STORIES), "--calib", "builtin", str(CALIB_FILE), "--calib-mix", "1", "3",
                 "--out", str(out), "--quiet", "--recipe", "rtn", "--nsamples", "8", "--seqlen", "64",
                 "--group-size", "-1"]) == 0
    calibration = json.loads((out / "crossblock.json").read_text())["calibration"]
    assert calibration["files"] == ["builtin", str(CALIB_FILE)]
    windows = {s["source"]: s["windows"] for s in calibration["sources"]}
    assert windows[str(CALIB_FILE)] == 6 and sum(windows.values()) == 8
    assert f"{CALIB_FILE} (6)" in (out / "README.md").read_text()  # the card names the sources
