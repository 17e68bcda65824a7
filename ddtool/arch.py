"""Architecture references: how ``--arch`` and a bundle name the module a set of weights fits.

A state dict holds weights, not code; the module they belong to is built by a *factory*, a
callable named as ``path/to/file.py:factory`` or ``package.module:factory`` and called with the
``--arch-args`` JSON object as keyword arguments. A bundle records the factory as a reference,

    {"kind": "factory", "spec": "net.py:build", "abs": "/abs/path/net.py:build", "args": {...}}

with the file's SHA-256 when it is a file. A factory is Python code, so a bundle's reference is
honoured only when the user names that same factory again (:func:`same_factory`: the same
``module:callable``, or the same callable in the same file, by resolved path or by SHA-256) or
passes ``--trust-checkpoint``; otherwise ``ddtool.checkpoint`` uses the bundle's code-free
program, or says which ``--arch`` to pass. ``abs`` is the path to try when a trusted bundle is
read from another working directory. (The other kinds of reference, archives and transformers
configs, are rebuilt by ``ddtool.checkpoint``; a shrunk student's by ``ddtool.compress``.)

``--arch`` imports and runs the file it names, by design; whatever that code raises (even
``SystemExit`` or ``KeyboardInterrupt``) is one :class:`CheckpointError` line, and the module
it builds is first built on the meta device, so that arguments asking for more memory than
there is are refused before anything is allocated.
"""

from __future__ import annotations

import contextlib
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

from .errors import CheckpointError, UsageError
from .files import is_regular_file, sha256
from .limits import require_fits


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
    except BaseException as err:  # noqa: BLE001 - any error in user code (SystemExit too) becomes one line
        sys.modules.pop(mod_name, None)
        raise CheckpointError(f"--arch file {target} failed to import: {_user_error(err)}") from None
    return module


def _user_error(err: BaseException) -> str:
    """``Type: message`` of an exception raised by user code, on one line."""
    if isinstance(err, SystemExit):
        return f"SystemExit({err.code!r}): user code tried to exit the process"
    if isinstance(err, KeyboardInterrupt):
        return "KeyboardInterrupt"
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


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
        except BaseException as err:  # noqa: BLE001 - SystemExit or KeyboardInterrupt from user code too
            raise CheckpointError(f"--arch module {target} failed to import: {_user_error(err)}") from None
    factory = getattr(module, name, None)
    if not callable(factory):
        raise CheckpointError(f"--arch {spec}: {target} has no callable named {name!r}")
    return factory


def build_arch(spec: str, args: dict | None = None) -> nn.Module:
    """Call the architecture factory with ``args`` and check that it returns a module (and, built
    first on the meta device, that it fits in memory: arguments are data, and data can be huge)."""
    factory = resolve_factory(spec)

    def build():
        try:
            model = factory(**(args or {}))
        except BaseException as err:  # noqa: BLE001 - SystemExit or KeyboardInterrupt from user code too
            raise CheckpointError(f"--arch {spec}: the factory raised {_user_error(err)}") from None
        if not isinstance(model, nn.Module):
            raise CheckpointError(f"--arch {spec}: the factory returned {type(model).__name__}, not a torch.nn.Module")
        return model

    require_fits(build, f"the module --arch {spec} builds")
    return build()


def factory_ref(spec: str, args: dict | None = None) -> dict:
    """The architecture reference of a factory: its file made absolute, and its SHA-256, so that
    a later ``--arch`` naming the same file (by path or by content) can be recognised."""
    target, _, name = spec.rpartition(":")
    ref = {"kind": "factory", "spec": spec, "abs": spec, "args": dict(args or {})}
    if is_file_spec(target):
        ref["abs"] = f"{Path(target).resolve()}:{name}"
        with contextlib.suppress(OSError):
            ref["sha256"] = sha256(target)
    return ref


def same_factory(ref: dict, spec: str) -> bool:
    """Whether ``--arch spec`` names the factory a bundle recorded: the same ``module:callable``,
    or the same callable in the same file (resolved path, or the file's recorded SHA-256)."""
    target, _, name = spec.rpartition(":")
    rec_target, _, rec_name = str(ref.get("spec", "")).rpartition(":")
    if name != rec_name:
        return False
    if not is_file_spec(target):
        return not is_file_spec(rec_target) and target == rec_target
    if not is_file_spec(rec_target) or not is_regular_file(target):
        return False
    if str(Path(target).resolve()) == str(ref.get("abs") or ref.get("spec")).rpartition(":")[0]:
        return True
    return bool(ref.get("sha256")) and sha256(target) == ref.get("sha256")


def factory_of(ref: dict) -> dict | None:
    """The factory reference inside ``ref`` (itself, or the base of a shrink), if any: the part
    of a bundle's architecture that is code."""
    while isinstance(ref, dict) and ref.get("kind") == "shrink":
        ref = ref.get("base")
    return ref if isinstance(ref, dict) and ref.get("kind") == "factory" else None


def with_factory(ref: dict, factory: dict) -> dict:
    """``ref`` with its factory reference replaced by ``factory``."""
    if ref.get("kind") == "shrink":
        return {**ref, "base": with_factory(ref["base"], factory)}
    return factory


def arch_hint(factory: dict) -> str:
    """The ``--arch`` that names a recorded factory from here: its spec, or its absolute path
    if the spec's relative file is not found from this working directory."""
    spec = str(factory.get("spec", ""))
    if _file_gone(spec):
        spec = str(factory.get("abs") or spec)
    return spec


def _file_gone(spec: str) -> bool:
    target = spec.rpartition(":")[0]
    return is_file_spec(target) and not Path(target).is_file()


def build_factory_ref(ref: dict) -> nn.Module:
    """Rebuild the (untrained) module of a factory reference: its spec, else its absolute path."""
    spec = ref["spec"]
    if _file_gone(spec):
        spec = ref.get("abs") or spec  # recorded relative to another working directory
    return build_arch(spec, ref.get("args"))


def parse_arch_args(text: str | None, option: str = "--arch-args") -> dict:
    """Parse ``--arch-args`` (a JSON object) into keyword arguments; malformed is a usage error."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as err:
        where = f": {err.msg} at column {err.colno}" if isinstance(err, json.JSONDecodeError) else ""
        raise UsageError(f"{option} is not valid JSON{where}") from None
    if not isinstance(args, dict):
        raise UsageError(f"{option} must be a JSON object, such as '{{\"num_classes\": 10}}'")
    return args


def _preview(items: list[str], n: int = 4) -> str:
    more = f", +{len(items) - n} more" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _stale_buffers(model: nn.Module, state: dict[str, torch.Tensor], own: dict) -> list[str]:
    """Keys of ``state`` that name a non-persistent buffer of ``model``: saved by an older
    version of its code, recomputed by the model itself, and so safe to ignore."""
    buffers = {name for name, _ in model.named_buffers()}
    return [k for k in state if k not in own and k in buffers]


def load_state_dict_into(model: nn.Module, state: dict[str, torch.Tensor], arch: str) -> None:
    """``model.load_state_dict(state)``, with a mismatch listed as missing/unexpected/mis-shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    stale = _stale_buffers(model, state, own)
    if stale:  # transformers made some buffers non-persistent (embeddings.position_ids): not weights
        print(f"note: ignored {len(stale)} key(s) of the state dict that are non-persistent buffers of the model, "
              f"which computes them itself: {_preview(stale)}", file=sys.stderr)
        state = {k: v for k, v in state.items() if k not in stale}
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
