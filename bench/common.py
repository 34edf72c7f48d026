"""What the bench scripts share: where the repository and the shared data are, and their common flags."""
import argparse
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("CROSSBLOCK_SHARED", ROOT.parent / "shared")).resolve()


def parser(doc: str) -> argparse.ArgumentParser:
    """--model, --calib and --name (the results file), for scripts that compare two runs."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--name", required=True)
    return p
