"""The state of an interrupted distillation, and what ``--resume`` checks before continuing it.

A run writes its state after every epoch and when SIGINT/SIGTERM asks it to stop (between two
steps): the student's weights, the optimizer's state, every rank's random state (torch's, which
draws the teacher's masks, the accelerator's (on CUDA the masks come from its generator, not the
CPU's), and the generator of the perturbations), the history so far, the best
epoch with early stopping, the settings, and the run's fingerprint (the teacher's hash, the
inputs' names, sizes and count, the architecture and preprocessing), so that ``--resume`` of
another run is refused instead of mixing two runs. The data order of an epoch is a function of
(seed, epoch) only, so nothing else is needed to continue to the same weights an uninterrupted
run reaches. Only rank 0 writes; the state is serialized in memory (``torch.save`` raises
``RuntimeError``, not ``OSError``, on a full disk) and replaced atomically, so a run killed
half-way through a write leaves the previous state intact.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import EXIT_INTERRUPTED, CheckpointError, DDToolError, UsageError, first_line
from .files import to_bytes, write_bytes

#: Marks a file as ddtool's resumable state (and its layout's version).
RESUME_KEY = "ddtool_resume"
#: Settings that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = {"epochs", "lr", "lr_drop_epoch", "schedule", "patience", "device", "compile",
                     "mi_head"}  # (the MI head is fitted after the run: it changes nothing the state holds)
#: Settings added after the first resumable states were written, and the value a state without them had.
ADDED_SETTINGS = {"schedule": "step", "lr_find": False, "mi_head": False}


class Interrupted(DDToolError):
    """The run was stopped by a signal after writing a resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum if signum else EXIT_INTERRUPTED


@dataclass
class RunState:
    """Where a run stands: the epoch and the step within it to continue after, the history, the
    best epoch's weights (with early stopping) and torch's random state to continue from."""

    epoch: int = 0
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best: dict | None = None  # {"epoch", "fidelity", "student": state dict}
    rng: torch.Tensor | None = None  # this rank's torch random state; None for a fresh run
    device_rng: torch.Tensor | None = None  # this rank's CUDA generator state, if the run was on CUDA
    lr: float | None = None  # the base rate the range test chose (--lr-find); None = the configured one
    lr_search: list[dict] = field(default_factory=list)  # what the range test measured

    def skip(self, epoch: int) -> int:
        """Steps of ``epoch`` already done (only the epoch a run was interrupted in has any)."""
        return self.step if epoch == self.epoch else 0


@contextlib.contextmanager
def stop_requests():
    """Turn SIGINT/SIGTERM into a flag the loop checks between steps (main thread only)."""
    state = {"signum": 0}
    if threading.current_thread() is not threading.main_thread():
        yield state
        return

    def handler(signum, _frame):
        state["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield state
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def device_rng_state(device: torch.device) -> torch.Tensor | None:
    """The state of ``device``'s default generator (what draws the masks of tensors on it), or
    None for the CPU, whose generator is :func:`torch.get_rng_state`."""
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    if device.type == "mps":
        return torch.mps.get_rng_state()
    return None


def set_device_rng_state(device: torch.device, state: torch.Tensor | None) -> None:
    """Restore what :func:`device_rng_state` returned (nothing for the CPU, or for a state saved on
    another kind of device: ``--device`` may change on ``--resume``, its masks then differ)."""
    if state is None or device.type not in ("cuda", "mps"):
        return
    if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.dim() == 1):
        raise ValueError("the saved device random state is not a byte tensor")
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.mps.set_rng_state(state)


def save_state(path: Path, **state) -> None:
    """Write the resumable state (plain tensors, numbers and strings) to ``path``, atomically."""
    write_bytes(path, to_bytes(lambda buffer: torch.save({RESUME_KEY: 1, **state}, buffer)), force=True)


def load_state(path: Path, config: dict, world_size: int, fingerprint: dict | None = None) -> dict:
    """The state of an interrupted run, checked against this run's ``fingerprint`` (the teacher's
    hash, the inputs, the architecture: what makes it the same run), its settings ``config``
    (only :data:`RESUMABLE_CHANGES` may differ) and its process count."""
    if not path.is_file():
        raise UsageError(f"--resume: no resumable checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint (unreadable: {first_line(err)})") from None
    if not isinstance(state, dict) or state.get(RESUME_KEY) != 1 or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint")
    saved_fingerprint = state.get("fingerprint") if isinstance(state.get("fingerprint"), dict) else {}
    for key, value in (fingerprint or {}).items():
        if key in saved_fingerprint and saved_fingerprint[key] != value:
            verb = "differ" if key.endswith("s") else "differs"
            raise UsageError(f"--resume: the {key} {verb} from the interrupted run's ({str(saved_fingerprint[key])[:40]} "
                             f"then, {str(value)[:40]} now); continue with the same ones, or start over with --force")
    saved = {**ADDED_SETTINGS, **state["config"]}
    changed = [name for name in config if name not in RESUMABLE_CHANGES and saved.get(name) != config[name]]
    if changed:
        name = changed[0]
        raise UsageError(f"--resume: {name} was {saved.get(name)!r} in the interrupted run, now {config[name]!r}; "
                         "only " + ", ".join(sorted(RESUMABLE_CHANGES)) + " may change")
    if state.get("world_size", 1) != world_size:
        raise UsageError(f"--resume: the interrupted run had {state.get('world_size', 1)} process(es), this one {world_size}")
    return state


def restore(saved: dict, path: Path, student: nn.Module, opt: torch.optim.Optimizer, generator: torch.Generator,
            rank: int, steps_per_epoch: int) -> RunState:
    """Load the interrupted run's state (from :func:`load_state`) into the student, the optimizer
    and this rank's generator. A state of other shapes or types (another model, a damaged or
    hand-made file) is a :class:`CheckpointError`, never a half-restored run."""
    try:
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["optimizer"])
        if saved["generator"][rank].shape == generator.get_state().shape:  # (else saved on another kind of device)
            generator.set_state(saved["generator"][rank])
        device_rng = saved.get("device_rng") or [None] * (rank + 1)  # (absent from states of older versions)
        found = saved.get("lr")  # absent in states written before --lr-find
        state = RunState(int(saved["epoch"]), int(saved["step"]), list(saved["history"]), saved.get("best"),
                         saved["rng"][rank], device_rng[rank], float(found) if found is not None else None,
                         list(saved.get("lr_search") or []))
        if not (state.device_rng is None or (isinstance(state.device_rng, torch.Tensor)
                                             and state.device_rng.dtype == torch.uint8 and state.device_rng.dim() == 1)):
            raise ValueError("the saved device random state has another type")
        if not (isinstance(state.rng, torch.Tensor) and state.rng.dtype == torch.uint8
                and state.rng.shape == torch.get_rng_state().shape):
            raise ValueError("the saved random state has another type or size")
        if not (0 <= state.epoch and 0 <= state.step <= steps_per_epoch):
            raise ValueError(f"epoch {state.epoch}, step {state.step} out of range")
        if state.best is not None:
            shapes = {k: tuple(v.shape) for k, v in student.state_dict().items()}
            if {k: tuple(v.shape) for k, v in state.best["student"].items()} != shapes:
                raise ValueError("the best epoch's weights have other shapes")
            state.best = {"epoch": int(state.best["epoch"]), "fidelity": float(state.best["fidelity"]),
                          "student": state.best["student"]}
    except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise CheckpointError(f"{path} does not fit this run (another model or settings?): {first_line(err)[:200]}") from None
    return state


def interrupted(signum: int, epoch: int, step: int, checkpoint: Path | None) -> Interrupted:
    """The error a stop request ends the run with, once its state is written."""
    where = f" (state in {checkpoint})" if checkpoint else ""
    return Interrupted(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {step}; "
                       f"continue with --resume{where}", signum)
