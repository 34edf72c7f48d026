"""crossblock: post-training quantization of LLMs by cross-block reconstruction."""
from .version import __version__  # noqa: E402

from .api import evaluate, load, load_model, quantize, save  # noqa: E402
from .errors import CrossblockError  # noqa: E402
from .eval.tasks import run_tasks as evaluate_tasks  # noqa: E402  (lm-eval is imported when called)
from .recipe import PRESETS, Recipe  # noqa: E402

__all__ = ["Recipe", "PRESETS", "quantize", "save", "load", "load_model", "evaluate", "evaluate_tasks",
           "CrossblockError"]
