"""ONNX, TorchScript and torch.export exports, each ending in a parity check before it is kept.

An export is serialized in memory (TorchScript's and torch.export's writers abort the process on
a full disk), checked, written to a staging folder beside the destination and only then moved
onto it; a failed check raises :class:`ExportError` (with the largest difference seen) and leaves
nothing behind. Parity compares the exported model, run in its own runtime (onnxruntime for ONNX,
a reloaded archive for the others), with the PyTorch model on the same seeded inputs at batch 1
and at a larger batch, so a batch axis that was accidentally frozen is caught too.

ONNX uses torch's default (dynamo) exporter with a dynamic batch axis and, by default, the
weights inside the one file; ``onnx.checker`` runs with the full check. The file carries
``metadata_props``: the preprocessing, the class names and the provenance, as JSON, so that a
server (or ``ddtool predict``) needs nothing else. TorchScript (deprecated in torch 2.13 but
still loadable from C++) and torch.export (.pt2) archives carry the same JSON as an extra file.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .errors import ExportError, UsageError, first_line
from .files import Outputs, to_bytes
from .mihead import MI_OUTPUT, with_mi
from .model import probe
from .outputs import check_classes, select_output

FORMATS = ("onnx", "torchscript", "pt2")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts", "pt2": ".pt2"}
#: Batch sizes the parity check runs at: one, and a larger one to exercise the dynamic axis.
PARITY_BATCHES = (1, 64)
#: Text models' ONNX parity: these batch sizes, each at these sequence lengths (capped at --max-length).
TEXT_PARITY_BATCHES, TEXT_PARITY_LENGTHS = (1, 7), (5, 23)
#: Name of the JSON metadata inside TorchScript and .pt2 archives.
METADATA_FILE = "ddtool.json"


@dataclass
class ExportResult:
    """Where the export went and how closely it matched PyTorch."""

    path: str
    format: str
    input_shape: list[int]
    parity_batches: list[int]
    max_abs_diff: float
    atol: float
    outputs: list[str] = field(default_factory=list)
    parity_lengths: list[int] = field(default_factory=list)  # text: the sequence lengths checked

    def as_dict(self) -> dict:
        return asdict(self)


class Servable(nn.Module):
    """The model as it is served: one tensor in, its prediction out, and optionally the
    class probabilities (softmax along ``class_dim``) as a second output, and the MI head's
    value (``mi_head``, a bundle's field: see ddtool.mihead) as the last."""

    def __init__(self, model: nn.Module, select=None, probabilities: bool = False, class_dim: int = 1,
                 mi_head: dict | None = None):
        super().__init__()
        self.model, self.select, self.probabilities, self.class_dim = model, select, probabilities, class_dim
        self.mi = with_mi(model, mi_head, select) if mi_head else None

    def forward(self, x):
        if self.mi is not None:
            logits, mi = self.mi(x)
        else:
            logits, mi = select_output(self.model(x), self.select), None
        out = (logits, F.softmax(logits, dim=self.class_dim)) if self.probabilities else (logits,)
        out = out if mi is None else (*out, mi)
        return out if len(out) > 1 else out[0]

    @property
    def names(self) -> list[str]:
        """The outputs' names, in order (ONNX's output names)."""
        return ["logits"] + ["probabilities"] * self.probabilities + [MI_OUTPUT] * (self.mi is not None)


class TextServable(nn.Module):
    """A text model as it is served: its named inputs (input_ids, attention_mask, token_type_ids)
    in, as a tokenizer gives them, stacked into the one tensor the model takes (ddtool.hf)."""

    def __init__(self, servable: Servable, names):
        super().__init__()
        self.servable, self.names = servable, tuple(names)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        given = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.servable(torch.stack([given[n] for n in self.names], dim=1))


@contextlib.contextmanager
def quiet_fds() -> Iterator[None]:
    """Silence stdout and stderr, Python's streams and the file descriptors under them alike.

    The exporter prints progress lines from Python and warnings from C++; none may reach a
    ``--json`` document on stdout.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings(), \
            contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)  # torch's loggers hold their own stream objects
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            logging.disable(logging.NOTSET)


def parity_inputs(input_shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Seeded inputs at each parity batch size: normal floats, or small non-negative integers."""
    gen = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return [torch.randn((b, *input_shape), generator=gen).to(dtype) for b in PARITY_BATCHES]
    return [torch.randint(0, 2, (b, *input_shape), generator=gen).to(dtype) for b in PARITY_BATCHES]


def _check_parity(reference: nn.Module, run, inputs: list[torch.Tensor], atol: float, what: str) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in inputs:
            expected = reference(x)
            expected = [e.float().numpy() for e in (expected if isinstance(expected, tuple) else (expected,))]
            try:
                got = run(x)
            except Exception as err:  # noqa: BLE001 - the exported model failing is the export's failure
                raise ExportError(f"{what} fails at batch {x.shape[0]}: {first_line(err)[:300]}; nothing written") from None
            got = [np.asarray(g, dtype=np.float32) for g in (got if isinstance(got, (tuple, list)) else (got,))]
            if [g.shape for g in got] != [e.shape for e in expected]:
                raise ExportError(f"{what} returned shapes {[g.shape for g in got]} at batch {x.shape[0]}, "
                                  f"PyTorch {[e.shape for e in expected]}; nothing written")
            for g, e in zip(got, expected):
                diff = float(np.max(np.abs(g - e))) if g.size else 0.0
                if not np.isfinite(diff) or diff > atol:
                    raise ExportError(f"{what} does not match PyTorch at batch {x.shape[0]}: largest difference "
                                      f"{diff:.3g} > atol {atol:g}; nothing written")
                worst = max(worst, diff)
    return worst


def _export_onnx(model: nn.Module, out: Path, outputs: Outputs, example, inputs, atol: float, opts: dict) -> float:
    import onnx
    import onnxruntime as ort

    names = model.names
    try:
        with quiet_fds():
            program = torch.onnx.export(
                model, (example,), input_names=["input"], output_names=names,
                dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
                opset_version=opts.get("opset"),
            )
            proto = program.model_proto
        for key, value in (opts.get("metadata") or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        if opts.get("data_file"):  # weights beside the graph, under the names they will keep
            staged = outputs.path(out)
            outputs.path(opts["data_file"])  # (the same staging folder: the graph finds its data there)
            onnx.save(proto, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=opts["data_file"].name)
            onnx.checker.check_model(str(staged), full_check=True)
            session = ort.InferenceSession(str(staged), providers=["CPUExecutionProvider"])
        else:
            data = proto.SerializeToString()
            onnx.checker.check_model(proto, full_check=True)
            session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except OSError:
        raise
    except Exception as err:  # noqa: BLE001 - exporter failures come in many types
        raise ExportError(f"ONNX export failed: {first_line(err)}") from None
    name = session.get_inputs()[0].name
    diff = _check_parity(model, lambda x: session.run(None, {name: x.numpy()}), inputs, atol, "onnxruntime")
    if not opts.get("data_file"):
        outputs.write(out, data)
    return diff


def _export_onnx_text(model: Servable, out: Path, outputs: Outputs, text: dict, atol: float, opts: dict) -> tuple[float, list]:
    """ONNX of a text model: named inputs with dynamic batch and sequence axes, checked at two
    batch sizes and two sequence lengths (padded inputs included) in onnxruntime."""
    import onnx
    import onnxruntime as ort

    from .text import parity_batches

    names = list(text["names"])
    served = TextServable(model, names).eval()
    example = parity_batches(text, [(2, 8)], seed=1)[0]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", min=2, max=max(text["max_length"], 3))
    output = [{"logits": "logits", "embedding": "sentence_embedding"}.get(text.get("kind"), "token_embeddings")]
    try:
        with quiet_fds():
            program = torch.onnx.export(
                served, tuple(example[:, i] for i in range(len(names))), input_names=names, output_names=output,
                dynamic_shapes=tuple({0: batch, 1: seq} for _ in names), external_data=False,
                opset_version=opts.get("opset"))
            proto = program.model_proto
        for key, value in (opts.get("metadata") or {}).items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        data = proto.SerializeToString()
        onnx.checker.check_model(proto, full_check=True)
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001 - exporter failures come in many types
        raise ExportError(f"ONNX export failed: {first_line(err)}") from None
    shapes = [(b, min(text["max_length"], n)) for b in TEXT_PARITY_BATCHES for n in TEXT_PARITY_LENGTHS]
    inputs = parity_batches(text, shapes, seed=2)
    diff = _check_parity(model, lambda x: session.run(None, {n: x[:, i].numpy() for i, n in enumerate(names)}), inputs,
                         atol, "onnxruntime")
    outputs.write(out, data)
    return diff, output


def _torchscript(model: nn.Module, example, opts: dict, script: bool) -> tuple[bytes, nn.Module]:
    """The TorchScript archive of ``model`` (traced on ``example``, or scripted), and it reloaded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
            if script:
                if model.probabilities or model.select is not None or model.mi is not None:
                    raise ExportError("--script exports the model as it is: drop --probabilities and --output "
                                      "(a bundle with an MI head is traced, not scripted)")
                compiled = torch.jit.script(model.model)
            else:
                compiled = torch.jit.trace(model, example, check_trace=False)
            extra = {METADATA_FILE: json.dumps(opts.get("metadata") or {})}
            data = to_bytes(lambda buffer: torch.jit.save(compiled, buffer, _extra_files=extra))
            return data, torch.jit.load(io.BytesIO(data), map_location="cpu").eval()
    except ExportError:
        raise
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"TorchScript {'scripting' if script else 'export'} failed: {first_line(err)}") from None


@torch.no_grad()
def _fixed_batch(traced: nn.Module, model: nn.Module, example, inputs) -> str | None:
    """Why the traced module works only at the batch size it was traced at (a graph that
    hard-codes ``x.shape[0]``, as ``int(B)`` or a reshape to (2, ...) does), or None."""
    try:
        traced(example)
    except Exception:  # noqa: BLE001 - it fails at its own batch: not this problem
        return None
    for x in inputs:
        try:
            got, expected = traced(x), model(x)
        except Exception as err:  # noqa: BLE001
            return f"it fails at batch {x.shape[0]} ({first_line(err)[:160]})"
        shapes = [tuple(t.shape) for t in (got if isinstance(got, tuple) else (got,))]
        if shapes != [tuple(t.shape) for t in (expected if isinstance(expected, tuple) else (expected,))]:
            return f"it returns shapes {shapes} at batch {x.shape[0]}"
    return None


def _export_torchscript(model: nn.Module, out: Path, outputs: Outputs, example, inputs, atol: float, opts: dict) -> float:
    """Traced (or, with ``script``, scripted). A trace that fixed the batch size of its example
    is replaced by the scripted model when the model scripts and that is all it is asked to
    export (no --probabilities, no --output), and refused (exit 7) with the reason otherwise."""
    data, reloaded = _torchscript(model, example, opts, bool(opts.get("script")))
    try:
        diff = _check_parity(model, reloaded, inputs, atol, "the reloaded TorchScript model")
    except ExportError:
        fixed = None if opts.get("script") else _fixed_batch(reloaded, model, example, inputs)
        if not fixed:
            raise
        why = f"tracing fixed the batch size at {example.shape[0]}: {fixed}"
        if model.probabilities or model.select is not None or model.mi is not None:
            raise ExportError(f"TorchScript export failed: {why}; export without --probabilities and --output (it is then "
                              "scripted), or to onnx or pt2; nothing written") from None
        try:
            data, reloaded = _torchscript(model, example, opts, True)
        except ExportError as err:
            raise ExportError(f"TorchScript export failed: {why}, and scripting failed too ({err}); export to onnx "
                              "or pt2, which keep the batch axis dynamic; nothing written") from None
        print(f"note: {why}; the model was scripted instead", file=sys.stderr)
        diff = _check_parity(model, reloaded, inputs, atol, "the scripted TorchScript model")
    outputs.write(out, data)
    return diff


def _export_pt2(model: nn.Module, out: Path, outputs: Outputs, example, inputs, atol: float, opts: dict) -> float:
    try:
        with quiet_fds():
            dynamic = opts.get("dynamic") or {0: torch.export.Dim("batch")}
            program = torch.export.export(model, (example,), dynamic_shapes=(dynamic,))
            extra = {METADATA_FILE: json.dumps(opts.get("metadata") or {})}
            data = to_bytes(lambda buffer: torch.export.save(program, buffer, extra_files=extra))
            reloaded = torch.export.load(io.BytesIO(data)).module()  # our own archive, just written
    except Exception as err:  # noqa: BLE001
        raise ExportError(f"torch.export failed: {first_line(err)}") from None
    diff = _check_parity(model, reloaded, inputs, atol, "the reloaded torch.export program")
    outputs.write(out, data)
    return diff


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    input_shape: tuple[int, ...] = (1, 28, 28),
    atol: float = 1e-4,
    force: bool = False,
    *,
    input_dtype: str = "float32",
    select=None,
    probabilities: bool = False,
    class_dim: int = 1,
    opset: int | None = None,
    external_data: bool = False,
    script: bool = False,
    metadata: dict | None = None,
    outputs: Outputs | None = None,
    text: dict | None = None, mi_head: dict | None = None,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ``out`` and verify it; ``input_shape`` excludes the batch.

    ``metadata`` (JSON-able values under string keys) goes into the file: ONNX metadata_props,
    or an extra file ``ddtool.json`` of TorchScript and .pt2 archives. With ``outputs`` the file
    is staged there, to be moved into place with the rest of a set of outputs. ``text`` (a text
    model's settings, :func:`ddtool.text.text_settings`): ONNX gets the named inputs
    input_ids, attention_mask (and token_type_ids), batch and sequence axes dynamic; the other
    formats take the stacked (N, K, L) tensor. ``mi_head`` (a bundle's MI head) adds the output mutual_information.
    """
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    if not (math.isfinite(atol) and atol >= 0):
        raise ExportError(f"atol must be a finite number >= 0, not {atol}")
    servable = Servable(model.eval(), select, probabilities, class_dim, mi_head).eval()
    dtype = getattr(torch, input_dtype)
    inputs = parity_inputs(tuple(input_shape), dtype)
    example = inputs[1][:2]  # batch 2: a batch of 1 could be specialised away
    write = {"onnx": _export_onnx, "torchscript": _export_torchscript, "pt2": _export_pt2}[format]
    data_file = Path(str(out) + ".data") if external_data and format == "onnx" else None
    opts = {"opset": opset, "data_file": data_file, "script": script, "metadata": metadata}
    names = servable.names
    if text and format == "onnx" and (probabilities or external_data):
        raise UsageError("a text model's ONNX export takes neither --probabilities nor --external-data")
    if text:  # token ids within the vocabulary, with padding, rather than 0/1 values
        from .text import parity_batches

        lengths = [min(text["max_length"], n) for n in TEXT_PARITY_LENGTHS]  # two lengths: a frozen one is caught
        inputs = parity_batches(text, [(1, lengths[0]), (PARITY_BATCHES[1], lengths[1])], seed=0)
        example = parity_batches(text, [(2, min(text["max_length"], 8))], seed=1)[0]
        opts["dynamic"] = {0: torch.export.Dim("batch"), 2: torch.export.Dim("sequence", min=2, max=max(text["max_length"], 3))}
    with contextlib.nullcontext(outputs) if outputs is not None else Outputs(force) as staged:
        staged.path(out)  # checked before the work: an input, or an existing file without --force
        if data_file is not None:
            staged.path(data_file)
        if text and format == "onnx":
            diff, names = _export_onnx_text(servable, Path(out), staged, text, atol, opts)
            return ExportResult(str(out), format, list(input_shape), list(TEXT_PARITY_BATCHES), diff, atol, names,
                                [min(text["max_length"], n) for n in TEXT_PARITY_LENGTHS])
        diff = write(servable, Path(out), staged, example, inputs, atol, opts)
    checked = [x.shape[-1] for x in inputs] if text else []
    return ExportResult(str(out), format, list(input_shape), list(PARITY_BATCHES), diff, atol, names, checked)


def read_metadata(path: str | os.PathLike) -> dict:
    """The ddtool metadata of an exported file (ONNX metadata_props, or the archive's ddtool.json),
    read without loading the model: nothing in the file runs."""
    path = Path(path)
    try:
        import onnx

        proto = onnx.load(str(path), load_external_data=False)
        return {p.key: json.loads(p.value) for p in proto.metadata_props if p.key.startswith("ddtool")}
    except Exception:  # noqa: BLE001 - not ONNX: try the archives
        pass
    try:
        with zipfile.ZipFile(path) as zf:
            name = next((n for n in zf.namelist() if n.endswith(f"extra/{METADATA_FILE}")), None)
            doc = json.loads(zf.read(name)) if name else {}
        return doc if isinstance(doc, dict) else {}
    except (zipfile.BadZipFile, OSError, ValueError, RecursionError):
        return {}


def export_loaded(
    loaded, out: str | os.PathLike, format: str = "onnx", *, input_shape: tuple[int, ...] | None = None,
    classes: list[str] | None = None, **options,
) -> ExportResult:
    """:func:`export` for a :class:`ddtool.checkpoint.LoadedModel`: the input shape, dtype and
    the metadata (preprocessing, class names, provenance) come from what the checkpoint records."""
    spec = loaded.input_spec or {}
    shape = tuple(input_shape) if input_shape else tuple(spec.get("shape") or ())
    if not shape:
        raise UsageError("this checkpoint records no input shape; pass --input-shape C,H,W")
    metadata = {
        "ddtool.preprocess": loaded.preprocess,
        "ddtool.classes": classes or loaded.classes,
        "ddtool.input": {"shape": list(shape), "dtype": spec.get("dtype", "float32")},
        "ddtool.provenance": {"source": loaded.path.name, "source_sha256": loaded.sha256, "format": loaded.format,
                              **(loaded.provenance or {})},
    }
    ref = loaded.arch_ref or {}
    if ref.get("kind") == "hf":  # how the output is made from the tokens: the pooling of a sentence model
        metadata["ddtool.head"] = {k: ref.get(k) for k in ("class", "output", "pooling", "normalize")}
    if loaded.mi_head:  # which output is the MI head's, for a reader of the archive (ddtool predict)
        metadata["ddtool.mi_head"] = {"output": MI_OUTPUT, "feature": loaded.mi_head["feature"], **loaded.mi_head.get("fit", {})}
    metadata = {k: v for k, v in metadata.items() if v is not None}
    if metadata.get("ddtool.classes"):
        example = parity_inputs(shape, getattr(torch, spec.get("dtype", "float32")))[0]
        check_classes(metadata["ddtool.classes"], probe(loaded.model, example, options.get("select")).shape[1])
    text = (loaded.preprocess or {}).get("text")
    return export(loaded.model, out, format, shape, input_dtype=spec.get("dtype", "float32"),
                  metadata=metadata, text=text, mi_head=loaded.mi_head, **options)
