"""What fits: the memory a run will need, estimated before it is spent.

An option value that cannot fit (``--size 60000,60000``, a ``--teacher-samples`` whose stacked
teacher batch exceeds the memory, ``--input-shape`` of a billion values) is refused up front with
one line (exit 2), instead of an allocation failure, or the kernel's OOM killer, half-way through.

The estimates are lower bounds of what must be held at once:

* a folder read into memory: its decoded inputs;
* a module that an ``--arch`` factory or a bundle's recorded arguments build: its weights,
  measured by building it on the meta device first (:func:`require_fits`);
* distillation: the teacher's K*B stacked rows through its widest layer (twice: that layer's
  input and output, no gradients kept) plus the student's B rows through all of its layers (kept
  for the backward pass), the per-input sizes measured by running both models once on two inputs;
* predict and evaluate: the widest layer of each model, input and output at once, for the rows
  one pass holds (``--batch-size``; MC_ROWS when evaluate samples masks).

The layer sizes come from a pass on fake tensors at the real input shape (shapes only, nothing
allocated), so measuring a pass that cannot fit never allocates it.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .errors import DDToolError, UsageError


def available_bytes(device: torch.device | str = "cpu") -> int:
    """Memory this process may still take: the smallest of the system's available memory and the
    container's (cgroup) limit; on CUDA, the device's free memory."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info(device)[0])
    limits = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limits.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            if limit.isdigit() and int(limit) < 1 << 60:
                limits.append(int(limit) - int(Path(usage_file).read_text().strip()))
        except (OSError, ValueError):
            continue
    if not limits:
        try:
            limits.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            return 1 << 62  # unknown: refuse nothing
    return max(0, min(limits))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation that failed (host or device memory)."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def human(nbytes: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if abs(nbytes) < 1024 or unit == "PB":
            return f"{nbytes:,.0f} {unit}" if unit == "bytes" else f"{nbytes:,.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} PB"


def require(nbytes: float, what: str, advice: str, device: torch.device | str = "cpu") -> None:
    """Refuse (exit 2) when ``what`` needs more than the memory available."""
    available = available_bytes(device)
    if not math.isfinite(nbytes) or nbytes > available:
        raise UsageError(f"{what} needs at least {human(nbytes)} of memory, more than the {human(available)} "
                         f"available; {advice}")


def require_fits(build: Callable[[], nn.Module], what: str) -> None:
    """Build the module on the meta device (no memory) and refuse it if its weights cannot fit;
    a builder that cannot run on the meta device is left to build for real (and report its own
    failure). ddtool's own errors from ``build`` pass through."""
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build()
        size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    except DDToolError:
        raise
    except Exception:  # noqa: BLE001 - the real build reports its own failure
        return
    require(size, what, "check its arguments")


def tensor_bytes(shape, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a tensor of ``shape``, without making it."""
    return math.prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()


@torch.no_grad()
def layer_bytes(model: nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """(widest layer, all layers) output bytes per input row, measured on ``example``: the peak a
    forward pass without gradients holds, and what one with gradients keeps.

    The pass runs on fake tensors (shapes and dtypes only, no memory: an input of --size
    20000,20000 is measured, not allocated); a model that cannot run so (a TorchScript archive,
    an operator without a shape rule) is run for real on ``example``, which the caller keeps
    small."""
    sizes: list[int] = []
    try:
        return _layer_bytes_fake(model, example, sizes)
    except Exception:  # noqa: BLE001 - measured for real below
        if sizes:  # it failed part way: what came before is held by the real pass too, before it fails
            rows = max(1, example.shape[0])
            return max(sizes) / rows, sum(sizes) / rows
        return _layer_bytes(model, example, [])


def _layer_bytes_fake(model: nn.Module, example: torch.Tensor, sizes: list[int]) -> tuple[float, float]:
    import logging

    from torch._subclasses.fake_tensor import FakeTensorMode

    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError("a TorchScript module does not run on fake tensors")
    log = logging.getLogger("torch._subclasses.fake_tensor")
    level = log.level
    log.setLevel(logging.CRITICAL + 1)  # a model failing on fake inputs logs a traceback there
    try:
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            return _layer_bytes(model, mode.from_tensor(example), sizes)
    finally:
        log.setLevel(level)


def _layer_bytes(model: nn.Module, example: torch.Tensor, sizes: list[int]) -> tuple[float, float]:
    """Appends every module output's bytes to ``sizes`` as the pass goes."""

    def hook(_module, _args, out):
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                sizes.append(t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not isinstance(m, torch.jit.ScriptModule)]
    try:
        out = model(example)
    finally:
        for h in handles:
            h.remove()
    for t in out if isinstance(out, (tuple, list)) else (out,):
        if isinstance(t, torch.Tensor):
            sizes.append(t.numel() * t.element_size())
    rows = max(1, example.shape[0])
    sizes.append(example.numel() * example.element_size())
    return max(sizes) / rows, sum(sizes) / rows


def check_forward(model: nn.Module, example: torch.Tensor, rows: int, what: str, advice: str,
                  device: torch.device | str = "cpu") -> None:
    """Refuse passes of ``rows`` inputs like ``example`` (one prepared input, batch axis kept)
    whose widest layer, input and output at once (2 x its bytes per row), cannot fit; the input
    itself counts as a layer, and the callers have checked the inputs' own bytes already. A model
    that fails on ``example`` is left to fail in the real pass, with its own message."""
    from .dropout import deterministic

    try:
        with deterministic(model):
            widest, _ = layer_bytes(model, example)
    except Exception:  # noqa: BLE001 - the model's own failure is reported by the real pass
        return
    require(rows * 2 * widest, what, advice, device)


def check_distill(teacher: nn.Module, student: nn.Module, example: torch.Tensor, batch_size: int,
                  teacher_samples: int, device: torch.device | str = "cpu") -> None:
    """Refuse a distillation whose stacked teacher batch and student batch cannot fit."""
    rows = batch_size * teacher_samples
    require(rows * tensor_bytes(example.shape[1:], example.dtype), f"--batch-size {batch_size} x --teacher-samples "
            f"{teacher_samples} stacked inputs", "lower them (or --size)", device)
    from .dropout import deterministic

    try:
        with deterministic(teacher), deterministic(student):
            widest, _ = layer_bytes(teacher, example)
            _, kept = layer_bytes(student, example)
    except Exception:  # noqa: BLE001 - the model's own failure is reported by the run itself
        return
    need = rows * 2 * widest + batch_size * 2 * kept
    require(need, f"distilling with --batch-size {batch_size} and --teacher-samples {teacher_samples}",
            "lower --batch-size or --teacher-samples", device)
