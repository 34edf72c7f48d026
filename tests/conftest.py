import hashlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).resolve().parent / "assets"  # vendored with their licenses: see assets/SOURCE.md
STORIES = ASSETS / "stories260k"
CALIB_FILE = ASSETS / "tinystories" / "calib.txt"
EVAL_FILE = ASSETS / "tinystories" / "eval.txt"  # held out from CALIB_FILE

# Tiny matrices: one thread is faster and makes results independent of the machine's cores. The
# subprocesses (CLI runs, torchrun ranks) inherit it: beside the other test workers, more threads
# than cores would only contend.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def load_stories():
    import crossblock as cb
    return cb.load_model(str(STORIES))


@pytest.fixture(scope="session")
def tokenizer():
    return load_stories()[1]


@pytest.fixture(scope="session")
def calib_text():
    return CALIB_FILE.read_text()


@pytest.fixture(scope="session")
def eval_text():
    return EVAL_FILE.read_text()


def weights_hash(model) -> str:
    """A model's weights to the bit (fake-quantized: its integers, scales and zero points decoded)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def kill_when(proc, reached, timeout: float = 300):
    """SIGKILL `proc` (a crossblock run) as soon as `reached()` holds; fail if it ends first."""
    deadline = time.time() + timeout
    while not reached():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
