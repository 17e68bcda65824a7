"""ONNX and TorchScript export, each ending in a parity check before the file is kept.

An export is written to a temporary file beside the destination, checked, and only then moved
onto it; a failed check raises :class:`ExportError` (with the largest difference seen) and leaves
nothing behind. Parity compares the exported model with the PyTorch model on the same random
inputs at two batch sizes, so a batch axis that was accidentally frozen is caught too.

ONNX uses torch's default (dynamo) exporter with a dynamic batch axis and the weights inside the
one file. TorchScript is deprecated in torch 2.13 but still loads in C++ and in older stacks.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import ExportError
from .files import atomic_output

FORMATS = ("onnx", "torchscript")
#: Batch sizes the parity check runs at: one, and a larger one to exercise the dynamic axis.
PARITY_BATCHES = (1, 64)


@dataclass
class ExportResult:
    """Where the export went and how closely it matched PyTorch."""

    path: str
    format: str
    input_shape: list[int]
    parity_batches: list[int]
    max_abs_diff: float
    atol: float

    def as_dict(self) -> dict:
        return asdict(self)


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


def _parity_inputs(input_shape: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((b, *input_shape), generator=gen) for b in PARITY_BATCHES]


def _check_parity(reference: nn.Module, run, input_shape, atol: float, what: str) -> float:
    worst = 0.0
    with torch.no_grad():
        for x in _parity_inputs(input_shape):
            expected = reference(x).float().numpy()
            got = np.asarray(run(x), dtype=np.float32)
            if got.shape != expected.shape:
                raise ExportError(f"{what} returned shape {got.shape} at batch {x.shape[0]}, PyTorch {expected.shape}")
            diff = float(np.max(np.abs(got - expected))) if got.size else 0.0
            if not np.isfinite(diff) or diff > atol:
                raise ExportError(f"{what} does not match PyTorch at batch {x.shape[0]}: largest difference {diff:.3g} > atol {atol:g}; nothing written")
            worst = max(worst, diff)
    return worst


def _export_onnx(model: nn.Module, tmp: Path, input_shape: tuple[int, ...], atol: float) -> float:
    import onnx
    import onnxruntime as ort

    example = torch.zeros((2, *input_shape))  # batch 2: a batch of 1 could be specialised away
    try:
        with quiet_fds():
            torch.onnx.export(
                model, (example,), str(tmp), input_names=["input"], output_names=["logits"],
                dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=False,
            )
        onnx.checker.check_model(str(tmp), full_check=True)
    except Exception as err:  # noqa: BLE001 - exporter failures come in many types
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"ONNX export failed: {first}") from None
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return _check_parity(model, lambda x: session.run(None, {name: x.numpy()})[0], input_shape, atol, "onnxruntime")


def _export_torchscript(model: nn.Module, tmp: Path, input_shape: tuple[int, ...], atol: float) -> float:
    example = torch.zeros((2, *input_shape))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings
            traced = torch.jit.trace(model, example, check_trace=False)
            torch.jit.save(traced, str(tmp))
            reloaded = torch.jit.load(str(tmp), map_location="cpu").eval()
    except Exception as err:  # noqa: BLE001
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ExportError(f"TorchScript export failed: {first}") from None
    return _check_parity(model, lambda x: reloaded(x).float().numpy(), input_shape, atol, "the reloaded TorchScript model")


def export(
    model: nn.Module,
    out: str | os.PathLike,
    format: str = "onnx",
    input_shape: tuple[int, ...] = (1, 28, 28),
    atol: float = 1e-4,
    force: bool = False,
) -> ExportResult:
    """Export ``model`` (in eval mode) to ``out`` and verify it; ``input_shape`` excludes the batch."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    model = model.eval()
    write = _export_onnx if format == "onnx" else _export_torchscript
    with atomic_output(out, force) as tmp:
        diff = write(model, tmp, tuple(input_shape), atol)
    return ExportResult(str(out), format, list(input_shape), list(PARITY_BATCHES), diff, atol)
