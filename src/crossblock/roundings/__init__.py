"""Roundings: how a window decides which grid point each weight goes to.

A rounding is a registered Config (`ROUNDINGS`) that owns its parameters (added to each
QuantLinear by `add_params`), how they give integers (`integers`, `quantized_weight`), what they
add to the loss (`penalty`), how they are kept valid (`project`) and how they are optimized
(`optimizer`). The window engine never branches on which rounding it runs. A new rounding is one
file here and one `@ROUNDINGS.register` line.
"""
from .adaround import AdaRound
from .base import ROUNDINGS, Rounding
from .lora import LoraRound
from .nearest import Nearest
from .signround import SignRound
from .weights import TrainedWeights

__all__ = ["ROUNDINGS", "Rounding", "Nearest", "SignRound", "AdaRound", "LoraRound", "TrainedWeights"]
