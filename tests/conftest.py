import os
from pathlib import Path

import pytest
import torch

SHARED = Path(os.environ.get("CROSSBLOCK_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
STORIES = SHARED / "models" / "stories260k"
CALIB_FILE = SHARED / "data" / "tinystories" / "valid.txt"
EVAL_FILE = SHARED / "data" / "tinystories" / "valid.partial.txt"

# Tiny matrices: one thread is faster and makes results independent of the machine's cores.
torch.set_num_threads(1)


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
