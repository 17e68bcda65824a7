"""Every checkpoint format in, and ddtool's own bundle out.

The format is detected from the file's content, never its extension:

  state-dict     torch.save of a state dict (zip or legacy pickle), also nested under the usual
                 keys and with DataParallel/compile prefixes; needs ``--arch``
  safetensors    a .safetensors file; needs ``--arch``
  torchscript    a TorchScript archive; needs nothing (its dropout is read from its graph)
  torch-export   a torch.export program (.pt2); its random ops are switched in the graph, its
                 training-mode batch norms turned to running statistics (ExportedModel)
  pickled-module torch.save(model): refused unless ``trust=True`` (``--trust-checkpoint``)
  hf             a Hugging Face transformers folder (config.json + weights), ``ddtool[hf]``
  ddtool-bundle  ddtool's own output; needs nothing

Everything ``torch.load`` reads goes through ``weights_only=True``, so a checkpoint cannot run
code; the one exception is a pickled module the user has explicitly trusted.

A *bundle* is a plain dict (tensors, strings, numbers only) holding the weights, an
*architecture reference* that rebuilds the module, the preprocessing, and provenance (the
teacher's hash, ddtool's version, the distillation settings). The reference is one of
  {"kind": "factory", "spec", "abs", "args"}      a file.py:callable or package.module:callable (ddtool.arch)
  {"kind": "torchscript" | "torch-export", "archive": uint8 tensor}   the teacher's archive
  {"kind": "hf", "class", "config"}               a transformers class and its config as JSON
  {"kind": "pickled-module", "path", "sha256"}   the trusted teacher file itself
  {"kind": "shrink", "base": <reference>, "keep"} a reference with layers shrunk (ddtool.compress)

Loading runs no code the user did not name. A "factory" reference (or a "shrink" of one) names
Python code, so it is honoured only when the user passes that same factory with ``--arch``
(the same ``module:callable``, or the same file: same resolved path or same SHA-256 as when
the bundle was written) or ``--trust-checkpoint``; the bundle's recorded arguments are only
data for the user's own factory. Otherwise the bundle's *program* is used: a torch.export
archive of the student written beside the weights (when torch.export could trace it), read
like any .pt2 below, which needs no code at all. TorchScript, torch.export and transformers
references are code-free and need nothing.

A .pt2 archive is never handed to torch as it is: every member torch may unpickle is first
checked with the weights-only rules, and torch.export.load then runs under a guard in which
nothing can be unpickled, every symbolic expression it parses is checked to be arithmetic
(sympy's parser evaluates Python), and the graph it builds may call torch operators only.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import datetime as _dt
import hashlib
import io
import json
import math
import operator
import os
import pickle
import pickletools
import sys
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import (arch_hint, build_arch, build_factory_ref, factory_of, factory_ref, load_state_dict_into, same_factory,
                   with_factory)
from .compress import rebuild_shrunk
from .data import Preprocess, spec_example
from .dropout import program_running_stats, program_sites, program_switches
from .errors import CheckpointError, UsageError, first_line
from .files import Outputs, is_regular_file, sha256, to_bytes, write_bytes
from .mihead import valid_head_field, with_mi
from .model import nonfinite_weights
from .version import __version__

BUNDLE_KEY = "ddtool_bundle"
BUNDLE_VERSION = 1
#: The file a ``distill --out DIR`` writes; a folder holding it is accepted wherever a model is.
BUNDLE_NAME = "model.pt"
#: Keys under which training scripts commonly nest the state dict, tried in this order.
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "state_dict_ema")
#: Prefixes added by DataParallel/DistributedDataParallel and torch.compile.
STRIP_PREFIXES = ("module.", "_orig_mod.")
#: Formats whose weights come without an architecture.
NEEDS_ARCH = ("state-dict", "safetensors")


@dataclass
class LoadedModel:
    """A model ready to run, and what ddtool knows about where it came from."""

    model: nn.Module
    format: str
    path: Path
    sha256: str
    arch_ref: dict | None = None  # rebuilds the module; see the module docstring
    preprocess: dict | None = None
    provenance: dict | None = None
    example: Any = None  # an input the format itself provides (HF dummy inputs, .pt2 sample inputs)
    input_spec: dict | None = None  # {"shape", "dtype"} of the model input, recorded in bundles
    classes: list[str] | None = None  # class names, recorded in bundles
    mi_head: dict | None = None  # a bundle's MI head (ddtool.mihead.head_field), if it was distilled with one

    @property
    def arch(self) -> str:
        """A one-word description of the architecture reference, for reports."""
        ref = self.arch_ref or {}
        return ref.get("spec") or ref.get("class") or ref.get("kind") or self.format


# --------------------------------------------------------------------------- architectures
def build_from_ref(ref: dict, trust: bool = False) -> nn.Module:
    """Rebuild the (untrained) module an architecture reference describes."""
    kind = ref.get("kind")
    if kind == "factory":
        return build_factory_ref(ref)
    if kind == "torchscript":
        return _load_torchscript(io.BytesIO(_tensor_bytes(ref["archive"])), "the bundle's TorchScript archive")
    if kind == "torch-export":
        return _load_exported(io.BytesIO(_tensor_bytes(ref["archive"])), "the bundle's torch.export archive", trust)[0]
    if kind == "hf":
        from .hf import from_config

        return from_config(ref)
    if kind == "shrink":
        try:
            return rebuild_shrunk(build_from_ref(ref["base"], trust), ref)
        except UsageError as err:
            raise CheckpointError(f"the bundle's shrunk architecture does not fit its base: {err}") from None
    if kind == "pickled-module":
        if not trust:
            raise CheckpointError("the bundle's architecture is a pickled module, and unpickling runs code from it: "
                                  "pass --trust-checkpoint if you trust whoever made it")
        path = Path(ref["path"])
        if not path.is_file():
            raise CheckpointError(f"the bundle's architecture is the pickled module {path}, which is gone")
        if sha256(path) != ref["sha256"]:
            raise CheckpointError(f"the pickled module {path} changed since the bundle was made (hash differs)")
        return _load_pickled_module(path, trust)
    raise CheckpointError(f"unknown architecture reference {kind!r} in the bundle")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.numpy().tobytes()


def _bytes_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


# --------------------------------------------------------------------------- format detection
def sniff_format(path: Path) -> str:
    """Tell the format from the bytes (see the module docstring for the names)."""
    if path.is_dir():
        if (path / BUNDLE_NAME).is_file():
            return "ddtool-bundle-dir"
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"{path} is a folder with neither a ddtool {BUNDLE_NAME} nor a transformers config.json")
    if not is_regular_file(path):
        raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO, device or socket?)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    if not head:
        raise CheckpointError(f"checkpoint {path} is empty")
    if head.startswith(b"PK"):
        try:
            with zipfile.ZipFile(path) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError):
            raise CheckpointError(f"checkpoint {path} is a damaged or truncated zip archive") from None
        if any(n.endswith("archive_format") for n in names) or any("/models/" in n and n.endswith(".json") for n in names):
            return "torch-export"
        if any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names):
            return "torchscript"
        if any(n.endswith("data.pkl") for n in names):
            return "torch-zip"
        raise CheckpointError(f"checkpoint {path} is a zip archive but not one torch wrote")
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol marker: the pre-1.6 torch.save format
        return "torch-legacy"
    raise CheckpointError(
        f"checkpoint {path} is not a format ddtool reads "
        "(state dict, safetensors, TorchScript, torch.export, transformers folder or ddtool bundle)"
    )


# --------------------------------------------------------------------------- pickles
def pickle_globals(data: bytes) -> list[str]:
    """The ``module.name`` globals a pickle stream would import, read without unpickling it.

    Handles GLOBAL/INST and STACK_GLOBAL (whose two strings are the last ones pushed, directly
    or through the memo); several pickles back to back (torch's legacy format) are all read.
    """
    found: list[str] = []
    stream = io.BytesIO(data)
    while stream.tell() < len(data):
        strings: list[str] = []
        memo: dict[int, str] = {}
        try:
            for op, arg, _ in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST"):
                    found.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    found.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINPUT", "LONG_BINPUT", "PUT") and strings:
                    memo[arg] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                    strings.append(memo[arg])
        except Exception:  # noqa: BLE001 - past the last pickle come raw tensor bytes
            break
    return list(dict.fromkeys(found))


def _checkpoint_pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            return zf.read(name) if name else b""
    return path.read_bytes()


def _unsafe_globals(path: Path) -> list[str]:
    """Globals of the checkpoint's pickle that ``weights_only`` loading does not allow."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        allowed = set(_get_allowed_globals()) | {
            f"{getattr(g, '__module__', '')}.{getattr(g, '__name__', '')}" for g in torch.serialization.get_safe_globals()
        }
    except Exception:  # noqa: BLE001 - a private helper; without it, report every global
        allowed = set()
    return [g for g in pickle_globals(_checkpoint_pickle_bytes(path)) if g not in allowed]


def _torch_load(path: Path | io.BytesIO, what: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        names = _unsafe_globals(path) if isinstance(path, Path) else []
        if not names and "global" not in str(err).lower():  # a malformed pickle, not a forbidden one
            raise CheckpointError(f"{what} could not be read (truncated or damaged?): {str(err).strip()[:200]}") from None
        shown = ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")
        raise CheckpointError(
            f"{what} holds pickled Python objects" + (f" (it would import {shown})" if names else "")
            + "; ddtool loads weights only. Remedy: save model.state_dict() and pass --arch, "
            "or pass --trust-checkpoint if you trust whoever made this file"
        ) from None
    except Exception as err:  # noqa: BLE001 - malformed pickles raise IndexError, AssertionError, ...
        first = first_line(err)
        raise CheckpointError(f"{what} could not be read (truncated or damaged?): {first}") from None


def _load_pickled_module(path: Path, trust: bool) -> nn.Module:
    if not trust:
        _torch_load(path, f"checkpoint {path}")  # raises with the list of classes
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - unpickling runs the file's own code
        raise CheckpointError(f"trusted checkpoint {path} failed to unpickle: {type(err).__name__}: {err}") from None
    if isinstance(obj, dict):
        obj = next((obj[k] for k in ("model", "module", "net") if isinstance(obj.get(k), nn.Module)), obj)
    if not isinstance(obj, nn.Module):
        raise CheckpointError(f"trusted checkpoint {path} holds a {type(obj).__name__}, not a torch.nn.Module")
    return obj


# --------------------------------------------------------------------------- state dicts
def extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    """Find the state dict in a loaded checkpoint: nested under a usual key, prefixes stripped."""
    def is_state(o):
        return isinstance(o, dict) and o and all(isinstance(v, torch.Tensor) for v in o.values())

    for _ in range(3):  # {"model": {"state_dict": ...}} happens
        if is_state(obj) or not isinstance(obj, dict):
            break
        nested = next((obj[k] for k in NESTED_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            break
        obj = nested
    if not is_state(obj):
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


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"safetensors file {path} could not be read (truncated or damaged?): {err}") from None


# --------------------------------------------------------------------------- TorchScript and torch.export
def _load_torchscript(source, what: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(source, map_location="cpu")
    except Exception as err:  # noqa: BLE001
        first = first_line(err)
        raise CheckpointError(f"{what} could not be loaded as TorchScript: {first}") from None


class ExportedModel(nn.Module):
    """A torch.export program as a module whose random ops follow ``train()``/``eval()``.

    torch.export records each random op as it ran at export (``aten.dropout(x, p, train)`` with
    the flag of the moment, SDPA's ``dropout_p``, a drop path's ``bernoulli_``) and refuses
    ``train()`` on the module it returns. This wrapper switches those ops in the graph instead
    (:func:`ddtool.dropout.program_switches`) and recompiles it, so MC sampling and deterministic
    inference both work; drop paths are sampled only when ``sample_drop_path`` is set (as
    ``--sample-drop-path`` does). A program exported in train mode has its batch norms turned to
    their eval form (running statistics) once, at load. ``refused`` lists the random ops that
    cannot be switched (the loader refuses such a program).
    """

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.program = graph_module
        self.batch_norms_turned = program_running_stats(graph_module.graph)
        self.switches, self.refused = program_switches(graph_module.graph)
        self.sample_drop_path = False
        self._state: tuple | None = None
        self.training = False
        self.train(False)

    def train(self, mode: bool = True):  # no recursion: the exported module refuses train()
        self.training = mode
        state = tuple(mode and (self.sample_drop_path or not s.drop_path) for s in self.switches)
        if state != self._state:  # recompiling costs milliseconds: only on a change
            nodes = {node.name: node for node in self.program.graph.nodes}
            for switch, sample in zip(self.switches, state):
                switch.apply(nodes[switch.node], sample)
            self.program.recompile()
            self._state = state
        return self

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def __deepcopy__(self, memo):
        """The usual deep copy, without the FutureWarning torch's pytree specs give when copied."""
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return new

    def ddtool_dropout_sites(self, sample_drop_path: bool = False):
        return program_sites(self.switches, sample_drop_path)


_UNSAFE_PT2_PREFIXES = ("custom_obj_", "opaque_obj_")
#: aten operators whose names look like Python dunders (the bitwise ones a transformers attention
#: mask uses); none is an attribute of torch.ops' namespaces, so each resolves to the operator.
_ATEN_DUNDER_OPS = {"__and__", "__or__", "__xor__", "__lshift__", "__rshift__"}
#: Members of a .pt2 archive that torch reads as text or JSON, never as a pickle.
_PT2_TEXT = ("archive_format", "archive_version", "version", "byteorder", "serialization_id")
#: Functions a sympy expression in a .pt2 may call (sympy's own and torch's symbolic functions).
_SYMPY_CALLS = {
    "Symbol", "Integer", "Float", "Rational", "Max", "Min", "Abs", "Mod", "Pow", "Mul", "Add", "floor", "ceiling",
    "sqrt", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not", "Piecewise", "ITE",
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "IsNonOverlappingAndDenseIndicator",
    "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Identity", "OpaqueUnaryFn_sqrt",
}
_SYMPY_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Constant, ast.Name, ast.Call,
                ast.keyword, ast.Load, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Tuple)
#: Python functions an exported graph may call besides torch operators (symbolic-shape arithmetic).
_GRAPH_FUNCTIONS = {
    *(getattr(operator, n) for n in ("getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pos", "pow",
                                     "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs")),
    *(getattr(math, n) for n in ("ceil", "floor", "sqrt", "trunc")),
    *(getattr(torch, n) for n in ("sym_int", "sym_float", "sym_ite", "sym_max", "sym_min", "sym_not", "sym_sqrt",
                                  "sym_sum") if hasattr(torch, n)),
    torch._C._set_grad_enabled, torch.autograd.grad_mode.set_grad_enabled,
}


def _arithmetic_expression(text: str) -> bool:
    """Whether ``text`` is a sympy expression made of numbers, names, operators and calls of
    known sympy/torch functions only: nothing that could reach Python's attributes or builtins."""
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError):
        return False
    for node in ast.walk(tree):
        if not isinstance(node, _SYMPY_NODES):
            return False
        if isinstance(node, ast.Name) and node.id.startswith("_"):
            return False
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYMPY_CALLS):
            return False
        if isinstance(node, ast.keyword) and (node.arg is None or not isinstance(node.value, ast.Constant)):
            return False
    return True


def _safe_target(text: str) -> bool:
    """Whether a serialized node target names a torch operator or plain arithmetic."""
    parts = text.split(".")
    if text.startswith("torch.ops.aten.") and len(parts) in (4, 5) and parts[3] in _ATEN_DUNDER_OPS:
        parts = parts[:3] + parts[4:]  # (an operator named like a dunder: nothing Python would resolve as an attribute)
    if any(not p or p.startswith("__") for p in parts):
        return False
    if text.startswith("torch.ops."):
        return len(parts) in (4, 5)
    if parts[0] in ("_operator", "math"):
        return len(parts) == 2
    return text.startswith("torch.sym_") and len(parts) == 2


def _json_values(obj, key: str):
    """Every value stored under ``key`` anywhere in a parsed JSON document."""
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for k, v in item.items():
                if k == key:
                    yield v
                stack.append(v)
        elif isinstance(item, list):
            stack.extend(item)


def _refuse_pickle(what: str, member: str) -> CheckpointError:
    return CheckpointError(f"{what} holds pickled Python objects ({member}); ddtool loads weights only. "
                           "Pass --trust-checkpoint if you trust whoever made this file")


def _check_pt2_archive(source, what: str) -> None:
    """Refuse a .pt2 whose loading would unpickle anything but plain tensors or call anything
    but torch operators: every member torch may unpickle must pass the weights-only rules, and
    the graph's targets and symbolic expressions must be operators and arithmetic."""
    try:
        zf = zipfile.ZipFile(source)
    except (zipfile.BadZipFile, OSError, ValueError):
        raise CheckpointError(f"{what} is a damaged or truncated zip archive") from None
    with zf:
        names = zf.namelist()
        raw: set[str] = set()  # payloads torch reads as raw tensor bytes
        for name in names:
            if name.endswith("_config.json") and ("/weights/" in name or "/constants/" in name):
                config = _json_member(zf, name, what).get("config", {})
                for key, meta in (config.items() if isinstance(config, dict) else ()):
                    path_name = str(meta.get("path_name", "")) if isinstance(meta, dict) else ""
                    if path_name.startswith(_UNSAFE_PT2_PREFIXES):
                        raise _refuse_pickle(what, f"{key!r} is a scripted or opaque object")
                    if isinstance(meta, dict) and not meta.get("use_pickle"):
                        raw.add(name.rpartition("/")[0] + "/" + path_name)
        for name in names:
            base = name.rpartition("/")[2]
            if "/aotinductor/" in f"/{name}":
                raise CheckpointError(f"{what} holds compiled native code (AOTInductor, {name}), which loading would run; "
                                      "refused (pass --trust-checkpoint if you trust whoever made this file)")
            if name.endswith("/") or name in raw or base in _PT2_TEXT or "/extra/" in name:
                continue
            if name.endswith(".json"):
                doc = _json_member(zf, name, what)
                bad = next((t for t in _json_values(doc, "target") if isinstance(t, str) and not _safe_target(t)), None)
                if bad is not None:
                    raise CheckpointError(f"{what} calls {bad[:80]!r}, which is not a torch operator; refused "
                                          "(pass --trust-checkpoint if you trust whoever made this file)")
                expr = next((e for e in _json_values(doc, "expr_str") if isinstance(e, str) and not _arithmetic_expression(e)), None)
                if expr is not None:
                    raise CheckpointError(f"{what} holds a symbolic expression that is not arithmetic ({expr[:60]!r}); "
                                          "refused, since parsing it would run Python code")
                continue
            _torch_load(io.BytesIO(zf.read(name)), f"{what} (its member {name})")  # weights-only rules


def _json_member(zf: zipfile.ZipFile, name: str, what: str):
    try:
        return json.loads(zf.read(name))
    except (ValueError, RecursionError):
        raise CheckpointError(f"{what} is damaged: its member {name} is not JSON") from None


class _Refused(Exception):
    """Raised inside torch when a guarded load reaches something ddtool does not allow."""


@contextlib.contextmanager
def code_free_loading() -> Any:
    """Load archives so that nothing can run: ``torch.load`` is held to ``weights_only=True``,
    pickle's ``load`` and ``loads`` and TorchScript object unpickling refuse, ``sympy.sympify`` (which
    evaluates Python) accepts arithmetic only, and AOTInductor's compiled libraries are not
    loaded. The guard holds for the block only."""
    import sympy

    real_load, real_sympify = torch.load, sympy.sympify

    def weights_only(f, *args, **kwargs):
        kwargs.pop("pickle_module", None)
        kwargs["weights_only"] = True
        return real_load(f, *args, **kwargs)

    def refuse(*_args, **_kwargs):
        raise _Refused("a pickled object")

    def checked_sympify(a, *args, **kwargs):
        if isinstance(a, str) and not _arithmetic_expression(a):
            raise _Refused(f"a symbolic expression that is not arithmetic ({a[:60]!r})")
        return real_sympify(a, *args, **kwargs)

    from torch.export.pt2_archive import _package

    def no_native_code(*_args, **_kwargs):
        raise _Refused("compiled native code (AOTInductor)")

    patches = [(torch, "load", weights_only), (torch.serialization, "load", weights_only), (pickle, "load", refuse),
               (pickle, "loads", refuse), (torch._C, "_pickle_load_obj", refuse), (sympy, "sympify", checked_sympify),
               (_package, "_load_aoti", no_native_code)]
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    for obj, name, value in patches:
        setattr(obj, name, value)
    try:
        yield
    finally:
        for obj, name, value in saved:
            setattr(obj, name, value)


def _check_graph_targets(module: nn.Module, what: str) -> None:
    """Every node of every graph in ``module`` calls a torch operator or plain arithmetic."""
    from torch.fx import GraphModule

    for sub in module.modules():
        if not isinstance(sub, GraphModule):
            continue
        for node in sub.graph.nodes:
            if node.op in ("placeholder", "output", "get_attr"):
                continue
            target = node.target
            ok = node.op == "call_function" and (
                isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket, torch._ops.HigherOrderOperator))
                or any(target is f for f in _GRAPH_FUNCTIONS))
            if node.op == "call_module":
                ok = isinstance(sub.get_submodule(str(target)), GraphModule)
            if not ok:
                raise CheckpointError(f"{what} calls {getattr(target, '__name__', target)!s:.80}, which is not a torch "
                                      "operator; refused (pass --trust-checkpoint if you trust whoever made this file)")


def _load_exported(source, what: str, trust: bool, require_dropout_ops: bool = True) -> tuple[ExportedModel, Any]:
    if not trust:
        _check_pt2_archive(source, what)
        if hasattr(source, "seek"):
            source.seek(0)
    guard = contextlib.nullcontext() if trust else code_free_loading()
    try:
        with warnings.catch_warnings(), guard:
            warnings.simplefilter("ignore")
            program = torch.export.load(source)
            module = program.module()
    except _Refused as err:
        raise CheckpointError(f"{what} holds {err}; ddtool loads weights only "
                              "(pass --trust-checkpoint if you trust whoever made this file)") from None
    except Exception as err:  # noqa: BLE001
        if isinstance(err.__context__, _Refused) or isinstance(err.__cause__, _Refused):
            raise CheckpointError(f"{what} holds {err.__context__ or err.__cause__}; ddtool loads weights only "
                                  "(pass --trust-checkpoint if you trust whoever made this file)") from None
        first = first_line(err)
        raise CheckpointError(f"{what} could not be loaded as a torch.export program: {first}") from None
    if not trust:  # the program's own graph; what unlifting adds (input guards) torch generates itself
        _check_graph_targets(program.graph_module, what)
    model = ExportedModel(module)
    if model.refused:
        shown = ", ".join(model.refused[:4]) + (f" and {len(model.refused) - 4} more" if len(model.refused) > 4 else "")
        raise CheckpointError(f"{what} draws random numbers in ops ddtool cannot switch off: {shown}; give its state dict "
                              "and --arch instead")
    if require_dropout_ops and not model.switches:
        raise CheckpointError(f"{what} has no dropout op left in its graph, so there is nothing to sample: "
                              "export the model with its dropout layers in place, or give its state dict and --arch")
    example = None
    if program.example_inputs:
        args, kwargs = program.example_inputs
        example = args[0] if len(args) == 1 and not kwargs else (kwargs if not args else tuple(args))
    if isinstance(example, torch.Tensor) and example.dim() == 4:  # (N, C, H, W): the program's own channels
        model.ddtool_input_channels = int(example.shape[1])
    return model, example


def program_bytes(model: nn.Module, input_spec: dict | None) -> tuple[bytes | None, str]:
    """A torch.export archive of ``model`` (in eval mode, batch axis dynamic) for a bundle, so that
    using the bundle needs no architecture code; ``(None, why)`` if torch.export cannot trace it."""
    if not input_spec:
        return None, "no input shape recorded"
    from .exporting import quiet_fds  # (a heavier module, needed only here)

    was_training = model.training
    try:
        example = spec_example(input_spec)
        with quiet_fds():
            program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
            return to_bytes(lambda buffer: torch.export.save(program, buffer)), ""
    except Exception as err:  # noqa: BLE001 - tracing fails in many ways; the bundle stays usable with --arch
        return None, first_line(err)[:200]
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- Hugging Face
def _load_hf(folder: Path, output: str | None = None) -> LoadedModel:
    """A transformers folder (see :mod:`ddtool.hf`): the model with its output chosen, and, when
    the folder has a tokenizer, the text settings its inputs are read with."""
    from . import hf
    from .text import encode, text_settings

    wrapped, ref = hf.load_folder(folder, output)
    config = json.loads(ref["config"])
    tokenizer = hf.tokenizer_json(folder)
    preprocess = example = None
    if tokenizer is not None:
        settings = text_settings(tokenizer, ref["names"], hf.default_max_length(folder, config), wrapped.kind,
                                 config.get("pad_token_id"))
        preprocess = {**Preprocess().as_dict(), "text": settings}
        example = encode(settings, ["a short example", "another example sentence, a little longer"])
    else:
        dummy = getattr(wrapped.model, "dummy_inputs", None) or {}
        example = dummy.get("input_ids") if isinstance(dummy, dict) else None
    return LoadedModel(wrapped, "hf", folder, sha256(folder / "config.json"), arch_ref=ref, preprocess=preprocess,
                       example=example)


# --------------------------------------------------------------------------- the entry point
def _resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    try:
        if not path.exists():
            raise CheckpointError(f"checkpoint not found: {path}")
        if not path.is_dir() and not is_regular_file(path):
            raise CheckpointError(f"checkpoint {path} is not a regular file (a FIFO, device or socket?)")
    except OSError as err:
        raise CheckpointError(f"checkpoint {path} cannot be used: {err.strerror or err}") from None
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)")
    return path


def check_finite(model: nn.Module, what: str) -> None:
    """Refuse NaN or infinite weights (see :func:`ddtool.model.nonfinite_weights`)."""
    bad = nonfinite_weights(model)
    if bad:
        raise CheckpointError(f"{what} holds {bad}; it cannot predict anything")


def load_model(
    path: str | os.PathLike, arch: str | None = None, arch_args: dict | None = None, trust: bool = False,
    output: str | int | None = None,
) -> LoadedModel:
    """Load any supported checkpoint into an ``nn.Module`` in eval mode.

    ``arch``/``arch_args`` are needed for a state dict or safetensors file. A bundle whose
    architecture is a factory uses it only if ``arch`` names that same factory (or ``trust``);
    otherwise it uses its code-free program, or says which ``--arch`` to pass. ``trust`` allows
    unpickling a full module and importing recorded code (code from the file runs!). ``output``
    names the output of a transformers folder to use (see :mod:`ddtool.hf`; others ignore it).
    """
    path = _resolve_checkpoint_path(path)
    fmt = sniff_format(path)
    if fmt == "ddtool-bundle-dir":
        path = _resolve_checkpoint_path(path / BUNDLE_NAME)
        fmt = sniff_format(path)
    if fmt == "hf":
        loaded = _load_hf(path, output if isinstance(output, str) else None)
    else:
        loaded = _load(path, fmt, arch, arch_args, trust)
    check_finite(loaded.model, f"checkpoint {path}")
    return loaded


def _load(path: Path, fmt: str, arch: str | None, arch_args: dict | None, trust: bool) -> LoadedModel:
    what = f"checkpoint {path}"
    if fmt in ("torchscript", "torch-export"):
        data = path.read_bytes()  # read once: what is checked is what is loaded
        digest = hashlib.sha256(data).hexdigest()
        ref = {"kind": fmt, "archive": _bytes_tensor(data)}
        if fmt == "torchscript":
            return LoadedModel(_load_torchscript(io.BytesIO(data), what).eval(), fmt, path, digest, arch_ref=ref)
        model, example = _load_exported(io.BytesIO(data), what, trust)
        if model.batch_norms_turned:
            print(f"note: {path.name} was exported in train mode: its {model.batch_norms_turned} batch norm(s) run on "
                  "their running statistics, as in eval mode", file=sys.stderr)
        spec = {"shape": list(example.shape[1:]), "dtype": str(example.dtype).removeprefix("torch.")} \
            if isinstance(example, torch.Tensor) and example.dim() > 1 else None  # the program's own input
        return LoadedModel(model.eval(), fmt, path, digest, example=example, arch_ref=ref, input_spec=spec)
    digest = sha256(path)
    if fmt == "safetensors":
        obj = _load_safetensors(path)
    else:
        try:
            obj = _torch_load(path, what)
        except CheckpointError:
            if not trust:
                raise
            model = _load_pickled_module(path, trust)
            ref = {"kind": "pickled-module", "path": str(path.resolve()), "sha256": digest}
            return LoadedModel(model.eval(), "pickled-module", path, digest, arch_ref=ref)
        if isinstance(obj, dict) and obj.get(BUNDLE_KEY):
            try:
                return _load_bundle(obj, path, digest, arch, trust)
            except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
                raise CheckpointError(f"{path} is a damaged ddtool bundle ({type(err).__name__}: {err})") from None
        fmt = "state-dict"
    state = extract_state_dict(obj)
    if not arch:
        raise CheckpointError(
            f"{path} is a {fmt}; pass its architecture with --arch file.py:factory or --arch package.module:factory"
        )
    model = build_arch(arch, arch_args)
    load_state_dict_into(model, state, arch)
    return LoadedModel(model.eval(), fmt, path, digest, arch_ref=factory_ref(arch, arch_args))


def _check_bundle(obj: dict, path: Path) -> None:
    """The fields of a bundle have the types ddtool writes (it is a file like any other)."""
    def bad(field: str):
        return CheckpointError(f"{path} is a damaged ddtool bundle: its {field!r} field is malformed")

    if not isinstance(obj.get("arch"), dict) or not isinstance(obj["arch"].get("kind"), str):
        raise bad("arch")
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise bad("state_dict")
    spec = obj.get("input")
    if spec is not None:
        dtype = getattr(torch, str(spec.get("dtype")), None) if isinstance(spec, dict) else None
        shape = spec.get("shape") if isinstance(spec, dict) else None
        if not isinstance(dtype, torch.dtype) or not isinstance(shape, list) or not shape \
                or not all(isinstance(d, int) and 0 < d <= 1 << 20 for d in shape) or math.prod(shape) > 1 << 28:
            raise bad("input")
    classes = obj.get("classes")
    if classes is not None and not (isinstance(classes, list) and all(isinstance(c, str) for c in classes)):
        raise bad("classes")
    for key in ("preprocess", "provenance"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise bad(key)
    if obj.get("preprocess") is not None:
        try:
            Preprocess.from_dict(obj["preprocess"])
        except Exception:  # noqa: BLE001 - any malformed field
            raise bad("preprocess") from None
    if obj.get("program") is not None and not (isinstance(obj["program"], torch.Tensor) and obj["program"].dtype == torch.uint8):
        raise bad("program")
    if obj.get("mi_head") is not None and not valid_head_field(obj["mi_head"]):
        raise bad("mi_head")


def _load_bundle(obj: dict, path: Path, digest: str, arch: str | None, trust: bool) -> LoadedModel:
    if obj.get(BUNDLE_KEY) != BUNDLE_VERSION:
        raise CheckpointError(f"{path} is a ddtool bundle of version {obj.get(BUNDLE_KEY)}; this ddtool reads {BUNDLE_VERSION}")
    _check_bundle(obj, path)
    ref = obj["arch"]
    factory = factory_of(ref)
    model = None
    if factory is not None and not trust:
        if arch and same_factory(factory, arch):
            ref = with_factory(ref, factory_ref(arch, factory.get("args")))  # the user's file, the bundle's args
        elif obj.get("program") is not None:
            model, _ = _load_exported(io.BytesIO(_tensor_bytes(obj["program"])), f"the program in {path}", False,
                                      require_dropout_ops=False)
            load_state_dict_into(model.program, obj["state_dict"], "the bundle's program")
            ref = {"kind": "torch-export", "archive": obj["program"]}
        else:
            given = f" (--arch {arch} is another factory)" if arch else ""
            raise CheckpointError(f"{path} holds no code-free program, and its architecture {factory.get('spec')!s:.200} is "
                                  f"code that would run: if you trust that code, pass --arch {arch_hint(factory)!s:.300}"
                                  f"{given} (or --trust-checkpoint)")
    if model is None:
        try:
            model = build_from_ref(ref, trust)
        except UsageError as err:  # the bundle's own arguments: a checkpoint error, not the user's option
            raise CheckpointError(f"{path}: {err}") from None
        load_state_dict_into(model, obj["state_dict"], ref.get("spec") or ref.get("kind"))
    spec = obj.get("input")
    example = spec_example(spec) if spec else None
    mi_head = _load_mi_program(obj, path) if ref.get("kind") == "torch-export" else obj.get("mi_head")
    return LoadedModel(model.eval(), "ddtool-bundle", path, digest, arch_ref=ref, preprocess=obj.get("preprocess"),
                       provenance=obj.get("provenance"), example=example, input_spec=spec, classes=obj.get("classes"),
                       mi_head=mi_head)


def _mi_program(model: nn.Module, mi_head: dict, input_spec: dict | None) -> dict:
    """{"program": the torch.export archive of the student with its MI head}, or {} if it does not trace."""
    data, _ = program_bytes(with_mi(model, mi_head), input_spec)
    return {"program": _bytes_tensor(data)} if data is not None else {}


def _load_mi_program(obj: dict, path: Path) -> dict | None:
    """A bundle's MI head field, with the code-free program of student and head loaded as
    ``module`` when the student itself is loaded from its program (see ddtool.mihead.with_mi)."""
    field = obj.get("mi_head")
    if not field or field.get("program") is None:
        return field
    module, _ = _load_exported(io.BytesIO(_tensor_bytes(field["program"])), f"the MI head's program in {path}", False,
                               require_dropout_ops=False)
    state = {**{f"student.{k}": v for k, v in obj["state_dict"].items()},
             **{f"head.{k}": v for k, v in field["state_dict"].items()}}
    load_state_dict_into(module.program, state, "the bundle's program with its MI head")
    return {**field, "module": module}


def bundle_bytes(
    model: nn.Module,
    *,
    arch_ref: dict,
    preprocess: dict | None = None,
    input_spec: dict | None = None,
    classes: list[str] | None = None,
    provenance: dict | None = None,
    program: bool = True,
    mi_head: dict | None = None,
) -> bytes:
    """``model`` as a ddtool bundle, serialized in memory (see :func:`save_bundle`).

    When the architecture is Python code (a factory), a torch.export program of the model is
    stored too (``program``), so that using the bundle needs no code; if torch.export cannot
    trace the model, a note says that using the bundle will need ``--arch``. ``mi_head`` is the
    MI head's field (:func:`ddtool.mihead.head_field`), stored only when given.
    """
    bundle = {
        BUNDLE_KEY: BUNDLE_VERSION,
        "arch": arch_ref,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "preprocess": preprocess,
        "input": input_spec,
        "classes": list(classes) if classes else None,
        "provenance": {
            "ddtool_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **(provenance or {}),
        },
    }
    if mi_head is not None:
        bundle["mi_head"] = mi_head
    factory = factory_of(arch_ref)
    if program and factory is not None:
        data, why = program_bytes(model, input_spec)
        if data is None:
            print(f"note: the bundle holds no code-free program (torch.export: {why}); using it will need "
                  f"--arch {factory.get('spec')}", file=sys.stderr)
        else:
            bundle["program"] = _bytes_tensor(data)
            if mi_head is not None:  # the student with its MI head, code-free too
                bundle["mi_head"] = {**mi_head, **_mi_program(model, mi_head, input_spec)}
    return to_bytes(lambda buffer: torch.save(bundle, buffer))


def save_bundle(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    force: bool = False,
    outputs: Outputs | None = None,
    **fields,
) -> Path:
    """Write ``model`` as a ddtool bundle, atomically (into ``outputs``, if given, to be moved into
    place with the rest of a set of outputs). ``fields`` are those of :func:`bundle_bytes`:
    ``arch_ref``, ``preprocess``, ``input_spec`` ({"shape", "dtype"} of the model's input without
    the batch axis, see ``ddtool.data.input_spec``), ``classes``, ``provenance``, ``program``."""
    data = bundle_bytes(model, **fields)
    if outputs is not None:
        outputs.write(path, data)
    else:
        write_bytes(path, data, force)
    return Path(path)
