"""Every checkpoint format in, and ddtool's own bundle out.

The format is detected from the file's content, never its extension:

  state-dict     torch.save of a state dict (zip or legacy pickle), also nested under the usual
                 keys and with DataParallel/compile prefixes; needs ``--arch``
  safetensors    a .safetensors file; needs ``--arch``
  torchscript    a TorchScript archive; needs nothing
  torch-export   a torch.export program (.pt2); its dropout ops are switched in the graph
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
so that ``evaluate``, ``export`` and ``distill`` on a bundle need no extra flags.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import os
import pickle
import pickletools
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .arch import build_arch, build_factory_ref, factory_ref, load_state_dict_into, stand_in
from .compress import rebuild_shrunk
from .data import spec_example
from .dropout import DropoutSite
from .errors import CheckpointError, first_line
from .files import atomic_output, sha256
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
        return _hf_from_config(ref["class"], json.loads(ref["config"]))
    if kind == "shrink":
        return rebuild_shrunk(build_from_ref(ref["base"], trust), ref)
    if kind == "pickled-module":
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
    """A torch.export program as a module whose dropout follows ``train()``/``eval()``.

    torch.export records ``aten.dropout(x, p, train)`` with the train flag of the moment of
    export and refuses ``train()`` on the module it returns. This wrapper flips that flag in
    the graph instead (and recompiles it), so MC sampling and deterministic inference both
    work; BatchNorm nodes keep the mode they were exported in.
    """

    DROPOUT_OPS = ("aten.dropout.default", "aten.native_dropout.default", "aten.feature_dropout.default",
                   "aten.alpha_dropout.default", "aten.feature_alpha_dropout.default")

    def __init__(self, graph_module: nn.Module):
        super().__init__()
        self.program = graph_module
        self.training = False
        self.train(False)

    def _dropout_nodes(self):
        return [n for n in self.program.graph.nodes if n.op == "call_function" and str(n.target) in self.DROPOUT_OPS]

    def train(self, mode: bool = True):  # no recursion: the exported module refuses train()
        self.training = mode
        for node in self._dropout_nodes():
            node.update_arg(2, mode)
        self.program.recompile()
        return self

    def forward(self, *args, **kwargs):
        return self.program(*args, **kwargs)

    def ddtool_dropout_sites(self):
        sites = []
        for node in self._dropout_nodes():
            stack = node.meta.get("nn_module_stack") or {}
            name = list(stack.values())[-1][0] if stack else node.name
            sites.append(DropoutSite(f"program.{name}" if name else "program", str(node.target).split(".")[1],
                                     float(node.args[1]), "module"))
        return sites


_UNSAFE_PT2_PREFIXES = ("custom_obj_", "opaque_obj_")


def _check_pt2_payloads(source, what: str) -> None:
    """Refuse a .pt2 whose loading would unpickle anything beyond plain tensors."""
    with zipfile.ZipFile(source) as zf:
        for name in zf.namelist():
            if name.endswith("_config.json") and ("/weights/" in name or "/constants/" in name):
                config = json.loads(zf.read(name)).get("config", {})
                for key, meta in config.items():
                    if meta.get("use_pickle") or str(meta.get("path_name", "")).startswith(_UNSAFE_PT2_PREFIXES):
                        raise CheckpointError(f"{what} stores {key!r} as a pickled object; ddtool loads weights only "
                                              "(pass --trust-checkpoint if you trust whoever made it)")
            elif "/sample_inputs/" in name and name.endswith(".pt"):
                _torch_load(io.BytesIO(zf.read(name)), f"{what} (its sample inputs)")


def _load_exported(source, what: str, trust: bool) -> tuple[ExportedModel, Any]:
    if not trust:
        _check_pt2_payloads(source, what)
        if hasattr(source, "seek"):
            source.seek(0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(source)
    except Exception as err:  # noqa: BLE001
        first = first_line(err)
        raise CheckpointError(f"{what} could not be loaded as a torch.export program: {first}") from None
    model = ExportedModel(program.module())
    if not model._dropout_nodes():
        raise CheckpointError(f"{what} has no dropout op left in its graph, so there is nothing to sample: "
                              "export the model with its dropout layers in place, or give its state dict and --arch")
    example = None
    if program.example_inputs:
        args, kwargs = program.example_inputs
        example = args[0] if len(args) == 1 and not kwargs else (kwargs if not args else tuple(args))
    return model, example


# --------------------------------------------------------------------------- Hugging Face
class HFClassifier(nn.Module):
    """A transformers model as a tensor-in, logits-out module: ``forward(input_ids)``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask=None):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def _transformers():
    try:
        import transformers
    except ImportError:
        raise CheckpointError("this is a Hugging Face transformers folder; install ddtool[hf] to read it") from None
    transformers.utils.logging.disable_progress_bar()  # its bars would mix with ddtool's output
    return transformers


def _hf_class(transformers, name: str):
    cls = getattr(transformers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise CheckpointError(f"{name!r} is not a transformers model class")
    return cls


def _hf_from_config(class_name: str, config: dict) -> nn.Module:
    transformers = _transformers()
    cls = _hf_class(transformers, class_name)
    return HFClassifier(cls(cls.config_class.from_dict(config)))


def _load_hf(folder: Path) -> LoadedModel:
    transformers = _transformers()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{folder}/config.json could not be read: {err}") from None
    names = config.get("architectures") or []
    if not names:
        raise CheckpointError(f"{folder}/config.json names no architecture ('architectures' is empty)")
    cls = _hf_class(transformers, names[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(folder), local_files_only=True, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001
        first = first_line(err)
        raise CheckpointError(f"transformers could not load {folder}: {first}") from None
    wrapped = HFClassifier(model).eval()
    dummy = getattr(model, "dummy_inputs", None) or {}
    example = dummy.get("input_ids") if isinstance(dummy, dict) else None
    digest = sha256(folder / "config.json")
    ref = {"kind": "hf", "class": cls.__name__, "config": model.config.to_json_string()}
    return LoadedModel(wrapped, "hf", folder, digest, arch_ref=ref, example=example)


# --------------------------------------------------------------------------- the entry point
def _resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"checkpoint {path} is not readable (permission denied)")
    return path


def load_model(
    path: str | os.PathLike, arch: str | None = None, arch_args: dict | None = None, trust: bool = False,
) -> LoadedModel:
    """Load any supported checkpoint into an ``nn.Module`` in eval mode.

    ``arch``/``arch_args`` are needed for a state dict or safetensors file; a bundle rebuilds the
    architecture it recorded and uses them only if that architecture's file can no longer be
    found. ``trust`` allows unpickling a full module (code from the file runs!).
    """
    path = _resolve_checkpoint_path(path)
    fmt = sniff_format(path)
    if fmt == "ddtool-bundle-dir":
        path, fmt = path / BUNDLE_NAME, sniff_format(path / BUNDLE_NAME)
    if fmt == "hf":
        return _load_hf(path)
    digest = sha256(path)
    what = f"checkpoint {path}"
    if fmt == "torchscript":
        return LoadedModel(_load_torchscript(str(path), what).eval(), fmt, path, digest,
                           arch_ref={"kind": "torchscript", "archive": _bytes_tensor(path.read_bytes())})
    if fmt == "torch-export":
        model, example = _load_exported(str(path), what, trust)
        return LoadedModel(model.eval(), fmt, path, digest, example=example,
                           arch_ref={"kind": "torch-export", "archive": _bytes_tensor(path.read_bytes())})
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
            return _load_bundle(obj, path, digest, arch, arch_args, trust)
        fmt = "state-dict"
    state = extract_state_dict(obj)
    if not arch:
        raise CheckpointError(
            f"{path} is a {fmt}; pass its architecture with --arch file.py:factory or --arch package.module:factory"
        )
    model = build_arch(arch, arch_args)
    load_state_dict_into(model, state, arch)
    return LoadedModel(model.eval(), fmt, path, digest, arch_ref=factory_ref(arch, arch_args))


def _load_bundle(obj: dict, path: Path, digest: str, arch: str | None, arch_args: dict | None, trust: bool) -> LoadedModel:
    if obj.get(BUNDLE_KEY) != BUNDLE_VERSION:
        raise CheckpointError(f"{path} is a ddtool bundle of version {obj.get(BUNDLE_KEY)}; this ddtool reads {BUNDLE_VERSION}")
    ref = stand_in(obj["arch"], arch, arch_args)  # the recorded file moved: the user's --arch stands in
    model = build_from_ref(ref, trust)
    load_state_dict_into(model, obj["state_dict"], ref.get("spec") or ref.get("kind"))
    spec = obj.get("input")
    example = spec_example(spec) if spec else None
    return LoadedModel(model.eval(), "ddtool-bundle", path, digest, arch_ref=ref, preprocess=obj.get("preprocess"),
                       provenance=obj.get("provenance"), example=example, input_spec=spec, classes=obj.get("classes"))


def save_bundle(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    arch_ref: dict,
    preprocess: dict | None = None,
    input_spec: dict | None = None,
    classes: list[str] | None = None,
    provenance: dict | None = None,
    force: bool = False,
) -> Path:
    """Write ``model`` as a ddtool bundle, atomically. ``input_spec`` is {"shape", "dtype"} of
    the model's input without the batch axis (see ``ddtool.data.input_spec``)."""
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
    with atomic_output(path, force) as tmp:
        torch.save(bundle, tmp)
    return Path(path)
