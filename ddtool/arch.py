"""Architecture references: how ``--arch`` and a bundle name the module a set of weights fits.

A state dict holds weights, not code; the module they belong to is built by a *factory*, a
callable named as ``path/to/file.py:factory`` or ``package.module:factory`` and called with the
``--arch-args`` JSON object as keyword arguments. A bundle records the factory as a reference,

    {"kind": "factory", "spec": "net.py:build", "abs": "/abs/path/net.py:build", "args": {...}}

so that it rebuilds without flags; ``abs`` is the fallback when the bundle is read from another
working directory. (The other kinds of reference, archives and transformers configs, are
rebuilt by ``ddtool.checkpoint``; a shrunk student's by ``ddtool.compress``.)
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .errors import CheckpointError


def is_file_spec(target: str) -> bool:
    """Whether the part of a factory spec before the colon names a file (else a module)."""
    return target.endswith(".py") or "/" in target or os.sep in target


def _import_file(target: str):
    file = Path(target)
    if not file.is_file():
        raise CheckpointError(f"--arch file not found: {target}")
    mod_name = "ddtool_arch_" + hashlib.sha1(str(file.resolve()).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(mod_name, file)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[mod_name] = module  # lets dataclasses/pickle inside the file find it
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # noqa: BLE001 - any error in user code becomes one line
        sys.modules.pop(mod_name, None)
        raise CheckpointError(f"--arch file {target} failed to import: {type(err).__name__}: {err}") from err
    return module


def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``path/to/file.py:factory`` or ``package.module:factory`` to the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CheckpointError(f"--arch {spec!r} must look like file.py:factory or package.module:factory")
    if is_file_spec(target):
        module = _import_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"--arch module {target} failed to import: {type(err).__name__}: {err}") from err
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CheckpointError(f"--arch {spec}: {target} has no callable named {name!r}")
    return factory


def build_arch(spec: str, args: dict | None = None) -> nn.Module:
    """Call the architecture factory with ``args`` and check that it returns a module."""
    factory = resolve_factory(spec)
    try:
        model = factory(**(args or {}))
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"--arch {spec}: the factory raised {type(err).__name__}: {err}") from err
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"--arch {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
    return model


def factory_ref(spec: str, args: dict | None = None) -> dict:
    """The architecture reference of a factory, with its file made absolute as a fallback."""
    target, _, name = spec.rpartition(":")
    absolute = f"{Path(target).resolve()}:{name}" if is_file_spec(target) else spec
    return {"kind": "factory", "spec": spec, "abs": absolute, "args": dict(args or {})}


def _file_gone(spec: str) -> bool:
    target = spec.rpartition(":")[0]
    return is_file_spec(target) and not Path(target).is_file()


def build_factory_ref(ref: dict) -> nn.Module:
    """Rebuild the (untrained) module of a factory reference: its spec, else its absolute path."""
    spec = ref["spec"]
    if _file_gone(spec):
        spec = ref.get("abs") or spec  # recorded relative to another working directory
    return build_arch(spec, ref.get("args"))


def stand_in(ref: dict, arch: str | None, arch_args: dict | None) -> dict:
    """``ref``, or the user's ``--arch`` in its place when ``ref`` is a factory whose file is gone
    (under both its recorded and its absolute path)."""
    if ref.get("kind") == "factory" and arch and _file_gone(ref["spec"]) and _file_gone(ref.get("abs") or ref["spec"]):
        return factory_ref(arch, arch_args)
    return ref


def parse_arch_args(text: str | None) -> dict:
    """Parse ``--arch-args`` (a JSON object) into keyword arguments."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"--arch-args is not valid JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(args, dict):
        raise CheckpointError("--arch-args must be a JSON object, such as '{\"num_classes\": 10}'")
    return args


def _preview(items: list[str], n: int = 4) -> str:
    more = f", +{len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch listed as missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    misshaped = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} ({_preview(missing)})")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} ({_preview(unexpected)})")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)} (checkpoint vs model: {_preview(misshaped, 2)})")
        raise CheckpointError(f"state dict does not fit --arch {arch}: " + "; ".join(parts))
    model.load_state_dict(state)
