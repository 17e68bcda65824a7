"""Helpers on any ``nn.Module`` that every stage uses: copy, freeze, count, run once, memory layout."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn


def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` with leaf parameters (deepcopy breaks ScriptModules' ones)."""
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)
