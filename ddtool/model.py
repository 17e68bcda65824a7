"""Helpers on any ``nn.Module`` that every stage uses: copy, freeze, count, run once, memory layout."""

from __future__ import annotations

import contextlib
import copy
import io

import torch
from torch import nn

from .dropout import deterministic
from .errors import DDToolError, ModelError, first_line
from .outputs import select_output


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` with leaf parameters (deepcopy breaks ScriptModules' ones)."""
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)


def freeze(model: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``model``; returns it."""
    for param in model.parameters():  # not requires_grad_(): ScriptModules refuse it
        param.requires_grad_(False)
    return model


def nonfinite_weights(model: nn.Module) -> str | None:
    """What is wrong if ``model`` holds NaN or infinite parameters, or NaN buffers (a buffer may
    hold an -inf mask, never NaN), e.g. ``"NaN weights (3 of 10 values of fc.bias)"``; else None.
    Every prediction of such a model is NaN, and a table of NaN is not a result."""
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
            continue
        is_param = isinstance(tensor, nn.Parameter)
        count = int((~torch.isfinite(tensor) if is_param else torch.isnan(tensor)).sum())
        if count:
            kind = "NaN or infinite" if is_param else "NaN"
            return f"{kind} weights ({count:,} of {tensor.numel():,} values of {name})"
    return None


def count_parameters(model: nn.Module) -> int:
    """The number of parameter elements of ``model``."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def probe(model: nn.Module, x, select=None) -> torch.Tensor:
    """Run ``model`` once on ``x`` (in eval mode) and return its prediction tensor; a model that
    fails on the inputs, or does not return one row per input, is a :class:`ModelError`."""
    try:
        with deterministic(model):
            out = select_output(model(x), select)
    except DDToolError:
        raise
    except Exception as err:  # noqa: BLE001 - a model failing on the data is a user error
        first = first_line(err)
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelError(f"the model failed on inputs of shape {shape}: {first}") from None
    if out.dim() == 0 or out.shape[0] != (x.shape[0] if isinstance(x, torch.Tensor) else out.shape[0]):
        raise ModelError(f"the model must return one output row per input; it returned shape {tuple(out.shape)}")
    return out


def uses_channels_last(model: nn.Module, example) -> bool:
    """channels_last helps 2-D convolutions on CPU (oneDNN: about 1.5-1.9x for our nets, forward
    and backward) and on CUDA (tensor cores); it is used for conv models on image batches."""
    return (isinstance(example, torch.Tensor) and example.dim() == 4 and example.is_floating_point()
            and not isinstance(model, torch.jit.ScriptModule) and any(isinstance(m, nn.Conv2d) for m in model.modules()))


@contextlib.contextmanager
def fast_layout(models: list[nn.Module], x: torch.Tensor):
    """channels_last for conv models on image batches (see :func:`uses_channels_last`), for the
    duration of the block; the models get their usual layout back afterwards."""
    if not all(uses_channels_last(m, x) for m in models):
        yield x
        return
    for m in models:
        m.to(memory_format=torch.channels_last)
    try:
        yield x.contiguous(memory_format=torch.channels_last)
    finally:
        for m in models:
            m.to(memory_format=torch.contiguous_format)
