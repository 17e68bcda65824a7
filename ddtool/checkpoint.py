"""Checkpoints in: state dicts (+ ``--arch``), TorchScript archives, ddtool bundles. Bundles out.

The format is detected from the file's content, never its extension. Everything ``torch.load``
reads goes through ``weights_only=True``, so a checkpoint cannot run code: a pickled full module
(``torch.save(model)``) is refused with the names of the classes it would import.

A *bundle* is ddtool's own output: a plain dict (tensors, strings, numbers only) holding the
weights, the architecture reference that rebuilds the module, the preprocessing, and provenance
(the teacher's hash, ddtool's version, the distillation settings). ``evaluate``, ``export`` and
``distill`` on a bundle need no extra flags.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import importlib
import importlib.util
import json
import os
import pickle
import re
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .errors import CheckpointError
from .files import atomic_output, sha256

BUNDLE_KEY = "ddtool_bundle"
BUNDLE_VERSION = 1
#: The file a ``distill --out DIR`` writes; a folder holding it is accepted wherever a model is.
BUNDLE_NAME = "model.pt"
#: Keys under which training scripts commonly nest the state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
#: Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")


@dataclass
class LoadedModel:
    """A model ready to run, and what ddtool knows about where it came from."""

    model: nn.Module
    format: str  # "state-dict", "torchscript" or "ddtool-bundle"
    path: Path
    sha256: str
    arch: str | None = None
    arch_args: dict = field(default_factory=dict)
    preprocess: dict | None = None
    provenance: dict | None = None


# --------------------------------------------------------------------------- architectures
def resolve_factory(spec: str) -> Callable[..., nn.Module]:
    """Resolve ``path/to/file.py:factory`` or ``package.module:factory`` to the callable."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise CheckpointError(f"--arch {spec!r} must look like file.py:factory or package.module:factory")
    if _is_file_spec(target):
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


# --------------------------------------------------------------------------- formats
def sniff_format(path: Path) -> str:
    """Tell the checkpoint format from the bytes: ``torchscript``, ``torch-zip`` or ``torch-legacy``."""
    with open(path, "rb") as f:
        head = f.read(8)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(f"checkpoint {path} is a damaged or truncated zip archive") from None
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise CheckpointError(f"checkpoint {path} is a zip archive but not one torch wrote")
    if head[:1] == b"\x80":  # a pickle protocol marker: the pre-1.6 torch.save format
        return "torch-legacy"
    raise CheckpointError(f"checkpoint {path} is not a format ddtool reads (state dict, TorchScript or ddtool bundle)")


def _unpickling_globals(err: Exception) -> list[str]:
    return sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(err))))


def _torch_load(path: Path) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unpickling_globals(err)
        what = f" (it would import {', '.join(names)})" if names else ""
        raise CheckpointError(
            f"checkpoint {path} holds pickled Python objects{what}; ddtool loads weights only: "
            "save model.state_dict() and pass --arch"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {path} could not be read (truncated or damaged?): {first}") from None


def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded checkpoint: nested under a usual key, prefixes stripped."""
    for _ in range(3):  # {"model": {"state_dict": ...}} happens
        if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, dict):
            nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
            if nested is not None:
                obj = nested
                continue
        break
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(
            "checkpoint holds no state dict (a dict of tensors, possibly under "
            + ", ".join(repr(k) for k in NESTED_KEYS) + ")"
        )
    out = {}
    for key, value in obj.items():
        for prefix in STRIP_PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


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


def _resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if path.is_dir():
        if (path / BUNDLE_NAME).is_file():
            return path / BUNDLE_NAME
        raise CheckpointError(f"{path} is a folder without a ddtool {BUNDLE_NAME}; give the checkpoint file")
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)")
    return path


def load_model(path: str | os.PathLike, arch: str | None = None, arch_args: dict | None = None) -> LoadedModel:
    """Load any supported checkpoint into an ``nn.Module`` in eval mode.

    ``arch``/``arch_args`` are needed for a plain state dict; a bundle rebuilds the architecture
    it recorded and uses them only if that architecture's file can no longer be found.
    """
    path = _resolve_checkpoint_path(path)
    fmt = sniff_format(path)
    digest = sha256(path)
    if fmt == "torchscript":
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torch.jit.load(str(path), map_location="cpu")
        except Exception as err:  # noqa: BLE001
            raise CheckpointError(f"TorchScript archive {path} could not be loaded: {str(err).splitlines()[0]}") from None
        return LoadedModel(model.eval(), "torchscript", path, digest)

    obj = _torch_load(path)
    if isinstance(obj, dict) and obj.get(BUNDLE_KEY):
        return _load_bundle(obj, path, digest, arch, arch_args)
    state = extract_state_dict(obj)
    if not arch:
        raise CheckpointError(
            f"{path} is a state dict; pass its architecture with --arch file.py:factory or --arch package.module:factory"
        )
    args = arch_args or {}
    model = build_arch(arch, args)
    load_state_dict_into(model, state, arch)
    return LoadedModel(model.eval(), "state-dict", path, digest, arch=arch, arch_args=args)


def _load_bundle(obj: dict, path: Path, digest: str, arch: str | None, arch_args: dict | None) -> LoadedModel:
    if obj.get(BUNDLE_KEY) != BUNDLE_VERSION:
        raise CheckpointError(f"{path} is a ddtool bundle of version {obj.get(BUNDLE_KEY)}; this ddtool reads {BUNDLE_VERSION}")
    # The bundle names its own architecture: as the user gave it, and as an absolute path in
    # case it was relative to another working directory. ``arch`` is the fallback when both moved.
    spec, args = obj["arch"], obj.get("arch_args") or {}
    if not _arch_available(spec):
        spec = obj.get("arch_abs") or spec
    if not _arch_available(spec) and arch:
        spec, args = arch, (arch_args or {})
    model = build_arch(spec, args)
    load_state_dict_into(model, obj["state_dict"], spec)
    return LoadedModel(
        model.eval(), "ddtool-bundle", path, digest, arch=spec, arch_args=args,
        preprocess=obj.get("preprocess"), provenance=obj.get("provenance"),
    )


def _is_file_spec(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


def _arch_available(spec: str) -> bool:
    target = spec.rpartition(":")[0]
    return not _is_file_spec(target) or Path(target).is_file()


def _abs_arch(spec: str) -> str:
    target, _, name = spec.rpartition(":")
    if _is_file_spec(target):
        return f"{Path(target).resolve()}:{name}"
    return spec


def save_bundle(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch: str,
    arch_args: dict | None = None,
    preprocess: dict | None = None,
    provenance: dict | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a ddtool bundle, atomically."""
    from . import __version__

    bundle = {
        BUNDLE_KEY: BUNDLE_VERSION,
        "arch": arch,
        "arch_abs": _abs_arch(arch),
        "arch_args": dict(arch_args or {}),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocess": preprocess,
        "provenance": {
            "ddtool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
    }
    with atomic_output(path, force) as tmp:
        torch.save(bundle, tmp)
    return Path(path)
