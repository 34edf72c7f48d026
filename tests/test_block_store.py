"""Where the blocks live is a strategy (engine/blocks.py): the window engine runs on any BlockStore,
asks it for exactly the blocks the window schedule names, and gives the same weights whichever
store holds them; a store that streams blocks refuses a stage that needs the whole model."""
import pytest
import torch

import crossblock as cb
import crossblock.api as api
from conftest import CALIB_FILE, load_stories
from crossblock.engine.blocks import BlockStore, InMemoryBlocks
from crossblock.engine.schedule import make_schedule
from crossblock.errors import CrossblockError
from crossblock.stages import Finetune, Windows

# cbq with a look-ahead block: windows overlap (live blocks in a checkpoint) and reach past their end
SETTINGS = dict(wbits=3, group_size=-1, iters=2, nsamples=8, seqlen=64, batch_size=4, lookahead=1)
STOP_AFTER = 2  # windows done when the interrupted run stops


class CountingBlocks(BlockStore):
    """The smallest store: every block stays where it is; it records what the engine asks."""

    def __init__(self, blocks):
        self.blocks, self.calls = blocks, []

    def fetch(self, j):
        self.calls.append(("fetch", j))

    def leave(self, j, finished):
        self.calls.append(("leave", j, finished))
        return False


def expected_calls(num_blocks: int, first: int = 0) -> list[tuple]:
    """What the schedule implies: a resumed run replays the blocks its done windows finished (each
    fetched and handed back finished), then every later window fetches its blocks through its
    target and hands them back, finished or not."""
    schedule = make_schedule(num_blocks, 2, 1, 1)
    calls = [c for w in schedule[:first] for j in w.finished for c in (("fetch", j), ("leave", j, True))]
    for w in schedule[first:]:
        blocks = range(w.start, w.target + 1)
        calls += [("fetch", j) for j in blocks] + [("leave", j, j in w.finished) for j in blocks]
    return calls


def run(monkeypatch, stores: list, folder=None, stop: bool = False):
    model, tok = load_stories()
    monkeypatch.setattr(api, "InMemoryBlocks", lambda blocks: stores.append(CountingBlocks(blocks)) or stores[-1])
    if stop:
        write = api.write_checkpoint

        def write_then_stop(folder, state, key, *on_disk):
            write(folder, state, key, *on_disk)
            if state.next_window == STOP_AFTER:
                raise KeyboardInterrupt
        monkeypatch.setattr(api, "write_checkpoint", write_then_stop)
    try:
        model, report = cb.quantize(model, tok, cb.Recipe.preset("cbq", **SETTINGS), calib=CALIB_FILE.read_text(),
                                    device="cpu", progress=False, checkpoint_dir=folder)
    finally:
        monkeypatch.undo()
    return {k: v.clone() for k, v in model.state_dict().items()}, report


def reference():
    model, tok = load_stories()
    model, _ = cb.quantize(model, tok, cb.Recipe.preset("cbq", **SETTINGS), calib=CALIB_FILE.read_text(),
                           device="cpu", progress=False)
    return model.state_dict()


@pytest.mark.slow
def test_engine_asks_a_custom_store_for_what_the_schedule_names_and_resumes_through_it(tmp_path, monkeypatch):
    ref = reference()
    stores = []
    weights, _ = run(monkeypatch, stores)
    num_blocks = len(stores[0].blocks)
    assert num_blocks == 5 and stores[0].calls == expected_calls(num_blocks)
    assert all(torch.equal(weights[k], v) for k, v in ref.items())  # the store changes nothing else
    # killed after window 2, resumed: the one resume path replays through the store
    with pytest.raises(KeyboardInterrupt):
        run(monkeypatch, [], tmp_path, stop=True)
    stores = []
    weights, report = run(monkeypatch, stores, tmp_path)
    assert report["resumed_at_window"] == STOP_AFTER
    assert stores[0].calls == expected_calls(num_blocks, first=STOP_AFTER)
    assert all(torch.equal(weights[k], v) for k, v in ref.items())


class Streamed(BlockStore):
    holds_whole_model = False
    asked_by = "--toy-store"


def test_a_store_without_the_whole_model_refuses_a_stage_that_needs_it(monkeypatch):
    model, tok = load_stories()
    monkeypatch.setattr(api, "check_weights_finite", lambda model: pytest.fail("worked first"))
    with pytest.raises(CrossblockError, match="^--toy-store cannot run the finetune stage"):
        cb.quantize(model, tok, cb.Recipe.preset("block", group_size=32, finetune_steps=2),
                    calib=CALIB_FILE.read_text(), device="cpu", stream=Streamed())
    with pytest.raises(CrossblockError) as e:
        with Streamed().whole_model(model, Finetune(), "cpu"):
            pytest.fail("ran")
    assert str(e.value) == ("--toy-store cannot run the finetune stage: it needs the whole model in memory "
                            "(run without --toy-store, or drop finetune from the recipe)")
    Streamed.admit(Windows())  # a stage that does not need it is admitted
    with pytest.raises(TypeError, match="the windows stage asks for the whole model: declare needs_whole_model"):
        with InMemoryBlocks(None).whole_model(model, Windows(), "cpu"):
            pytest.fail("ran")
    moves = []
    model.to = lambda device: moves.append(str(device))
    with InMemoryBlocks(None).whole_model(model, Finetune(), "cuda:1"):  # on the device for the stage, back after
        assert moves == ["cuda:1"]
    assert moves == ["cuda:1", "cpu"]
