"""Run-time input rotations of linear layers: x ↦ x H before the layer, whose weight absorbed
H (W ← W H, so (x H)(W H)ᵀ = x Wᵀ). Used where no weight can absorb the rotation offline, as
the input of down_proj (after the gated activation).

H = A ⊗ B (hadamard.Factors: A the small base, B a normalized Sylvester matrix), applied
without forming H: with x viewed as X (base x power), x H = Aᵀ X B, O(n·(base + power)) per
token. A transform holds only its spec (size, kind, base, seed): its matrices are rebuilt from
it, cached once per device, never stored in the state dict; `record_transforms` writes the
specs, `rebuild_transforms` re-attaches them to a loaded model.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..errors import CrossblockError
from ..precision import exact
from .hadamard import Factors, base_matrix, dense, paley_order, sylvester


@lru_cache(maxsize=None)
def _matrices(f: Factors, seed: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    a = base_matrix(f, seed).float().to(device)
    b = (sylvester(f.power) / f.power ** 0.5).float().to(device)
    return a, b


class OnlineRotation(nn.Module):
    """x ↦ x (A ⊗ B), computed in float32 and cast back to x's dtype."""

    def __init__(self, size: int, kind: str, base: int, seed: int = 0):
        super().__init__()
        power = size // base if base > 0 and size % base == 0 else 0
        if kind not in ("hadamard", "random-orthogonal") or power & (power - 1) or power == 0:
            raise CrossblockError(f"no online rotation of size {size} with a {kind!r} base of {base}")
        if kind == "hadamard" and base != 1 and not paley_order(base):
            raise CrossblockError(f"no Hadamard matrix of order {base} is constructed here")
        self.factors = Factors(kind, base, power)
        self.seed = seed

    @property
    def size(self) -> int:
        return self.factors.size

    def spec(self) -> dict:
        return {"size": self.size, "kind": self.factors.kind, "base": self.factors.base, "seed": self.seed}

    def matrix(self) -> torch.Tensor:
        """H, dense float64 (for folding it into weights)."""
        return dense(self.factors, self.seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = _matrices(self.factors, self.seed, str(x.device))
        with exact(x.device):  # the engine's bf16 autocast would round H
            y = x.float()
            if self.factors.base == 1:
                y = y @ b
            elif self.factors.power == 1:
                y = y @ a
            else:
                y = (a.T @ y.unflatten(-1, (self.factors.base, self.factors.power)) @ b).flatten(-2)
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items())


def _transform_input(module: nn.Module, args: tuple) -> tuple:
    return (module.crossblock_input_transform(args[0]), *args[1:])


def attach_input_transform(module: nn.Module, transform: nn.Module):
    """Make `module` (a Linear) apply `transform` to its input at run time. The pre-hook is
    prepended, so it runs before any hook already registered, the activation quantizer's
    included (quant/act.py): the quantizer must see the rotated input, whatever the order of
    attaching."""
    if hasattr(module, "crossblock_input_transform"):
        raise CrossblockError("this layer already has a run-time input transform; rotating twice is not supported")
    module.crossblock_input_transform = transform
    module.register_forward_pre_hook(_transform_input, prepend=True)


def record_transforms(model: nn.Module) -> dict | None:
    """{"layers": {name: spec}} for every layer with a run-time input transform (JSON), or None."""
    layers = {n: m.crossblock_input_transform.spec() for n, m in model.named_modules()
              if hasattr(m, "crossblock_input_transform")}
    return {"version": 1, "layers": dict(sorted(layers.items()))} if layers else None


def rebuild_transforms(model: nn.Module, recorded: dict):
    """Re-attach the transforms `record_transforms` described to a loaded model; call before
    act.rebuild (not required: the hook is prepended, but it keeps the order obvious)."""
    if not isinstance(recorded, dict) or recorded.get("version") != 1 or not isinstance(recorded.get("layers"), dict):
        raise CrossblockError("the recorded input transforms are not a version-1 record")
    plan = []
    for name, spec in recorded["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CrossblockError(f"the recorded input transform of {name} names no layer of this model") from None
        if not isinstance(module, nn.Linear):
            raise CrossblockError(f"the recorded input transform of {name} is on a {type(module).__name__}, "
                                  "not a Linear layer")
        if not isinstance(spec, dict) or set(spec) != {"size", "kind", "base", "seed"}:
            raise CrossblockError(f"the recorded input transform of {name} is malformed: {spec!r}")
        if spec["size"] != module.in_features:
            raise CrossblockError(f"the recorded input transform of {name} has size {spec['size']}, "
                                  f"but the layer reads {module.in_features} features")
        plan.append((module, OnlineRotation(**spec)))
    for module, transform in plan:  # nothing attached unless everything checks out
        attach_input_transform(module, transform)
