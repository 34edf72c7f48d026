import pytest

from crossblock.engine.schedule import Window, make_schedule
from crossblock.recipe import PRESETS


def windows(n, **kw):
    return [(w.start, w.end, w.target, w.next_start) for w in make_schedule(n, **kw)]


def test_block_preset_one_window_per_block():
    assert windows(5, size=1, stride=1) == [(i, i + 1, i, i + 1) for i in range(5)]


def test_mb_groups_without_overlap_and_short_last_group():
    assert windows(5, size=2, stride=2) == [(0, 2, 1, 2), (2, 4, 3, 4), (4, 5, 4, 5)]
    assert windows(6, size=3, stride=3) == [(0, 3, 2, 3), (3, 6, 5, 6)]


def test_la_lookahead_truncated_at_last_block():
    assert windows(4, size=1, stride=1, lookahead=2) == [(0, 1, 2, 1), (1, 2, 3, 2), (2, 3, 3, 3), (3, 4, 3, 4)]


def test_cbq_sliding_windows_overlap_and_end_at_last_block():
    assert windows(5, size=2, stride=1) == [(0, 2, 1, 1), (1, 3, 2, 2), (2, 4, 3, 3), (3, 5, 4, 5)]


def test_combination_window_2_stride_1_lookahead_1():
    assert windows(4, size=2, stride=1, lookahead=1) == [(0, 2, 2, 1), (1, 3, 3, 2), (2, 4, 3, 4)]


def test_window_larger_than_model_is_one_window():
    assert windows(3, size=8, stride=4) == [(0, 3, 2, 3)]


def test_every_block_finished_exactly_once_for_presets():
    for p in PRESETS.values():
        ws = make_schedule(7, p.get("window", 1), p.get("stride", 1), p.get("lookahead", 0))
        finished = [j for w in ws for j in w.finished]
        assert finished == list(range(7))


@pytest.mark.parametrize("kw", [dict(size=0), dict(size=2, stride=3), dict(stride=0), dict(lookahead=-1)])
def test_invalid_windows_refused(kw):
    with pytest.raises(ValueError):
        make_schedule(5, **kw)


def test_window_properties():
    w = Window(2, 4, 5, 3)
    assert list(w.trained) == [2, 3] and list(w.finished) == [2]
