"""Finding dropout sites, and switching a model between MC and deterministic mode.

*Standard dropout* inference runs the network with every dropout layer in eval mode, which (with
PyTorch's inverted dropout) is the weight-scaling rule of Hinton et al.: each unit contributes
its expectation. *MC dropout* (Bulo et al. 2016, Eq. 4) keeps the gates random at test time and
averages m sampled networks,

    f_hat(x) = 1/m * sum_i f_{Theta, sigma_i}(x),    sigma_i ~ Bernoulli(1 - p) per unit,

which converges to the ideal ensemble predictor f_dropout(x) = E_sigma[f_{Theta,sigma}(x)]
(Eq. 3) as m grows. :func:`mc_mode` turns on exactly the dropout modules and nothing else, so
BatchNorm keeps using (and never updates) its running statistics while masks are sampled.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import NoDropoutError

#: Module types whose training flag switches random masking on.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_DROPOUT_NAMES = {t.__name__ for t in DROPOUT_TYPES}


@dataclass(frozen=True)
class DropoutSite:
    """One place where the model drops units: its qualified name, its kind and its rate."""

    name: str
    kind: str
    p: float

    def as_dict(self) -> dict:
        return asdict(self)


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, DROPOUT_TYPES):
        return type(module).__name__
    # Scripted modules keep the Python class name as ``original_name``.
    original = getattr(module, "original_name", None)
    return original if original in _DROPOUT_NAMES else None


def dropout_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs of every dropout module with a positive rate."""
    found = []
    for name, module in model.named_modules():
        if _kind(module) and float(getattr(module, "p", 0.0)) > 0.0:
            found.append((name, module))
    return found


def find_dropout(model: nn.Module) -> list[DropoutSite]:
    """Every dropout site of ``model``, in module order."""
    return [DropoutSite(name or "<root>", _kind(m), float(m.p)) for name, m in dropout_modules(model)]


def require_dropout(model: nn.Module) -> list[DropoutSite]:
    """:func:`find_dropout`, raising :class:`NoDropoutError` when there is nothing to sample."""
    sites = find_dropout(model)
    if not sites:
        raise NoDropoutError("no active dropout found in the model (no dropout layer with p > 0)")
    return sites


def set_mc(model: nn.Module) -> nn.Module:
    """Put ``model`` in eval mode with only its dropout modules sampling. Returns ``model``."""
    model.eval()
    for _, module in dropout_modules(model):
        module.train()
    return model


@contextlib.contextmanager
def mc_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Sample dropout masks inside the block; restore every module's training flag after it."""
    flags = {m: m.training for m in model.modules()}
    try:
        yield set_mc(model)
    finally:
        for module, flag in flags.items():
            module.train(flag)


@torch.no_grad()
def mc_average(model: nn.Module, x: torch.Tensor, samples: int, transform=None) -> torch.Tensor:
    """Average ``transform(model(x))`` over ``samples`` fresh dropout masks (Eq. 4).

    ``transform`` maps outputs to the space the ensemble is averaged in: probabilities
    (softmax) for classifiers, identity for regression. The masks are drawn from torch's
    global generator, so ``torch.manual_seed`` makes the average reproducible.
    """
    transform = transform or (lambda out: out)
    with mc_mode(model):
        total = transform(model(x))
        for _ in range(samples - 1):
            total += transform(model(x))
    return total / samples
