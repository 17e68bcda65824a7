"""Dropout distillation: Algorithm 2 of Bulo, Porzi & Kontschieder (ICML 2016), and its losses.

The ideal dropout predictor is the ensemble average f_dropout(x) = E_sigma[f_{Theta*,sigma}(x)]
(Eq. 3). Distillation looks for the deterministic predictor q in a tractable family Q that is
closest to it over the data distribution,

    J(q) = E_x[ l(f_dropout(x), q(x)) ]                                             (Eq. 5)

without ever evaluating f_dropout: each SGD step samples inputs from the unlabelled set S and
fresh gating variables sigma for the frozen teacher, and descends l(f_{Theta*,sigma}(x), q(x))
(Alg. 2). That optimises J'(q) = E_{x,sigma}[l(f_sigma(x), q(x))] (Eq. 8), and Theorem 1(ii)
shows J = J' + const for every Bregman divergence l, so the minimisers coincide. The KL
divergence (classifiers) and the squared error (regression) are both Bregman divergences.

By the same theorem the one-sample target f_sigma(x) may be replaced by the mean of K
independent samples: l(y, q) = g1(y) + g2(q) + y^T g3(q) is linear in y up to a term free of q,
so E[grad] is unchanged while its variance falls (``teacher_samples``). The K masked passes
come from :class:`ddtool.mc.MCSampler`, which runs the teacher's deterministic prefix once.

The student q starts from the teacher's weights (standard dropout is in Q, Fig. 1) or from a
smaller network (Sec. 5.3) and runs deterministically: dropout off, BatchNorm on its running
statistics. The schedule follows Sec. 5.1: SGD with momentum 0.9, the base rate for 20 epochs,
then a tenth of it for 10 more.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Preprocess, UnlabelledSet, perturbation, split_positions
from .dropout import check_dropout, deterministic
from .errors import EXIT_INTERRUPTED, CheckpointError, DDToolError, ModelError, UsageError
from .files import atomic_output
from .mc import MCSampler
from .model import clone_model, freeze, probe, uses_channels_last
from .outputs import select_output
from . import parallel
from .parallel import SINGLE, World

LOSSES = ("kl", "mse")
OPTIMIZERS = ("sgd", "adam")
FLIPS = ("", "h", "v", "hv")
#: Settings that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = {"epochs", "lr", "lr_drop_epoch", "patience", "device", "compile"}


@dataclass
class DistillConfig:
    """Settings of one distillation run. The defaults follow the paper's Sec. 5.1."""

    epochs: int = 30  # paper: 20 epochs at the base rate, then 10 at a tenth of it
    lr: float = 0.01  # the paper uses the last rate of the teacher's own training
    lr_drop_epoch: int = 20  # from this epoch on the rate is lr / 10
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    teacher_samples: int = 4  # K masked teacher outputs averaged into one target (Thm. 1(ii))
    loss: str = "kl"  # "kl" for classifiers, "mse" for regression outputs
    class_dim: int = 1  # the class axis of the output; KL is taken per position along it
    perturb: float = 0.2  # probability of zeroing each input pixel (the paper's S); 0 = none
    flip: str = ""  # random flips of input images: "", "h", "v" or "hv"
    val_fraction: float = 0.0  # share of inputs held out to measure fidelity after each epoch
    val_mc_samples: int = 32  # masks averaged into the validation reference
    patience: int = 0  # stop after this many epochs without better fidelity; 0 = never
    seed: int = 0
    output: str | int | None = None  # which output is the prediction; None = logits / the first tensor
    sample_drop_path: bool = False  # also sample DropPath / stochastic depth in the teacher
    share_prefix: bool = True  # run the teacher's deterministic prefix once for all K samples
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    compile: bool = False  # torch.compile the teacher and the student

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "teacher_samples": self.teacher_samples >= 1, "perturb": 0 <= self.perturb < 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "loss": self.loss in LOSSES, "optimizer": self.optimizer in OPTIMIZERS, "flip": self.flip in FLIPS,
            "val_fraction": 0 <= self.val_fraction < 1, "val_mc_samples": self.val_mc_samples >= 1,
            "patience": self.patience >= 0, "lr_drop_epoch": self.lr_drop_epoch >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"invalid distillation setting: {bad[0]}={getattr(self, bad[0])!r}")
        if self.patience and not self.val_fraction:
            raise UsageError("--patience needs --val-fraction: early stopping watches the held-out fidelity")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class DistillResult:
    """The distilled student (in eval mode, on the CPU) and one record per epoch."""

    student: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None  # with early stopping: the epoch whose weights were kept
    shared_prefix: bool = False  # whether the teacher's deterministic prefix was computed once


class Interrupted(DDToolError):
    """The run was stopped by a signal after writing a resumable checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum if signum else EXIT_INTERRUPTED


# --------------------------------------------------------------------------- losses
def kl_loss(student_out: torch.Tensor, target_probs: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """KL(p || q) along the class axis ``dim``, averaged over every other position.

        l(p, q) = sum_c p_c (log p_c - log q_c),    q = softmax(student output),

    with p the (K-sample averaged) teacher distribution. It is the Bregman divergence of
    phi(p) = sum_c p_c log p_c, so Theorem 1(ii) applies: its gradient in the student is that of
    the cross-entropy -sum_c p_c log q_c, which is linear in p. For (N, C) logits this is the
    usual batch-mean KL; for (N, C, H, W) segmentation logits it is the per-pixel KL, averaged.
    """
    log_q = F.log_softmax(student_out.float(), dim=dim)
    pointwise = torch.xlogy(target_probs, target_probs) - target_probs * log_q
    return pointwise.sum(dim=dim).mean()


def mse_loss(student_out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error to the (K-sample averaged) teacher output: the Bregman divergence of
    phi(y) = ||y||^2, for regression outputs (Thm. 1(ii))."""
    return F.mse_loss(student_out.float(), target)


def loss_fn(config: DistillConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    return (lambda out, target: kl_loss(out, target, config.class_dim)) if config.loss == "kl" else mse_loss


def to_target(outputs: torch.Tensor, config: DistillConfig) -> torch.Tensor:
    """The space the ensemble is averaged in: probabilities for KL, raw outputs for MSE."""
    return F.softmax(outputs.float(), dim=config.class_dim) if config.loss == "kl" else outputs.float()


# --------------------------------------------------------------------------- helpers
def resolve_device(spec: str) -> torch.device:
    """``auto`` is CUDA when present, else the CPU; an unavailable device is a usage error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device {spec!r} is not a device (auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UsageError(f"--device {spec}: CUDA is not available on this machine")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"--device {spec}: MPS is not available on this machine")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {spec}: use auto, cpu, cuda[:N] or mps")
    return device


def _optimizer(params, config: DistillConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) only, so resuming needs no state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


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


def _fidelity(student, val_x, val_ref, preprocess, config, device) -> float:
    """Mean loss of the student against the MC reference on the held-out inputs (no labels)."""
    total = 0.0
    with torch.no_grad(), deterministic(student):
        for raw, ref in zip(val_x.split(256), val_ref.split(256)):
            out = select_output(student(preprocess.prepare(raw.to(device))), config.output)
            total += loss_fn(config)(out, ref.to(device)).item() * raw.shape[0]
    return total / val_x.shape[0]


def _val_reference(sampler: MCSampler, val_x, preprocess, config, device) -> torch.Tensor:
    """The MC average of ``config.val_mc_samples`` masks on each held-out input, in target space."""
    refs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        for raw in val_x.split(64):
            x = preprocess.prepare(raw.to(device))
            refs.append(sampler.mean(x, config.val_mc_samples, lambda out: to_target(out, config)).cpu())
    return torch.cat(refs)


def _save_state(path: Path, **state) -> None:
    with atomic_output(path, force=True) as tmp:
        torch.save({"ddtool_resume": 1, **state}, tmp)


def load_resume_state(path: Path, config: DistillConfig) -> dict:
    """The state of an interrupted run, checked against ``config``."""
    if not path.is_file():
        raise UsageError(f"--resume: no resumable checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint (unreadable: {str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("ddtool_resume") != 1:
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint")
    saved = state["config"]
    changed = [f.name for f in fields(DistillConfig)
               if f.name not in RESUMABLE_CHANGES and saved.get(f.name) != getattr(config, f.name)]
    if changed:
        name = changed[0]
        raise UsageError(f"--resume: {name} was {saved.get(name)!r} in the interrupted run, now {getattr(config, name)!r}; "
                         "only " + ", ".join(sorted(RESUMABLE_CHANGES)) + " may change")
    return state


# --------------------------------------------------------------------------- Algorithm 2
def distill(
    model: nn.Module,
    data: UnlabelledSet | torch.Tensor,
    preprocess: Preprocess,
    config: DistillConfig | None = None,
    progress: Callable[[dict], None] | None = None,
    *,
    val: torch.Tensor | None = None,
    student: nn.Module | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    teacher_sha256: str | None = None,
    world: World = SINGLE,
) -> DistillResult:
    """Distill ``model`` (trained with dropout) into a deterministic student on the inputs ``data``.

    ``data`` is the unlabelled set S: an :class:`UnlabelledSet` (see ``ddtool.data``) or a tensor
    of raw inputs (uint8 images are scaled and normalised by ``preprocess``, float arrays are
    used as they are). With ``config.val_fraction`` a share of a tensor is held out, unless
    ``val`` gives the held-out raw inputs. ``student`` replaces the default student (a copy of
    the teacher), for compression. ``checkpoint`` is where a resumable state is written after
    every epoch and on SIGINT/SIGTERM; ``resume`` continues from it. ``progress`` receives
    ``{"event": "step" | "epoch", ...}`` dicts. The input ``model`` is never modified.

    Under torchrun, ``world`` (see ``ddtool.parallel``) makes this one of N data-parallel
    processes: ``config.batch_size`` is the global batch, and only rank 0 writes ``checkpoint``.
    """
    config = config or DistillConfig()
    device = parallel.local_device(world, resolve_device(config.device))
    parallel.init(world, device)
    batch = parallel.local_batch(world, config.batch_size)
    if isinstance(data, torch.Tensor):
        train_pos, val_pos = split_positions(data.shape[0], config.val_fraction if val is None else 0.0, config.seed)
        if val_pos:
            val = data[val_pos]
        data = UnlabelledSet.from_tensor(data[train_pos] if val_pos else data, preprocess)
    n = len(data)
    if n == 0:
        raise DDToolError("no inputs to distill on")
    first = next(data.batches(torch.arange(min(n, 2)), 2))
    example = preprocess.prepare(first)
    probe(model, example, config.output)
    plan = check_dropout(model, example, config.sample_drop_path, config.output)

    teacher = freeze(clone_model(model)).to(device)
    student = (clone_model(model) if student is None else student).eval().to(device)
    probe(student, example.to(device), config.output)
    channels_last = uses_channels_last(student, example)
    if channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters to distill")
    opt = _optimizer(params, config)
    sampler = MCSampler(teacher, example.to(device), select=config.output, sample_drop_path=config.sample_drop_path,
                        share_prefix=config.share_prefix, own=True, plan=plan)
    loss_of = loss_fn(config)
    trained = student
    if world.distributed:  # gradients all-reduced across ranks at every backward pass
        trained = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    run_student = torch.compile(trained) if config.compile else trained
    if config.compile:
        sampler.model = torch.compile(teacher)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    rank_seed = config.seed + 1_000_003 * world.rank  # each rank its own masks and perturbations
    gen = torch.Generator().manual_seed(rank_seed)  # perturbations, drawn in this process
    perturb = perturbation(config.perturb, config.flip, gen)
    val_ref = _val_reference(sampler, val, preprocess, config, device) if val is not None else None
    steps_per_epoch = math.ceil(len(parallel.shard(world, torch.arange(n))) / batch)
    history: list[dict] = []
    start_epoch, start_step, best = 0, 0, None
    checkpoint = Path(checkpoint) if checkpoint else None
    rng_state = None
    if resume:
        state = load_resume_state(checkpoint, config)
        if state.get("world_size", 1) != world.size:
            raise UsageError(f"--resume: the interrupted run had {state.get('world_size', 1)} process(es), this one {world.size}")
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"][world.rank])
        rng_state, history, best = state["rng"][world.rank], state["history"], state.get("best")
        start_epoch, start_step = state["epoch"], state["step"]

    def save(epoch: int, step: int) -> None:
        if checkpoint is None:
            return
        states = parallel.gather(world, (torch.get_rng_state(), gen.get_state()))  # every rank's, for --resume
        if world.main:
            _save_state(checkpoint, config=config.as_dict(), epoch=epoch, step=step, teacher_sha256=teacher_sha256,
                        student={k: v.detach().cpu() for k, v in student.state_dict().items()},
                        optimizer=opt.state_dict(), generator=[g for _, g in states], rng=[r for r, _ in states],
                        history=history, best=best, world_size=world.size)
        parallel.barrier(world)

    total_steps = steps_per_epoch * config.epochs
    with torch.random.fork_rng(devices=[]), stop_requests() as stop:
        torch.manual_seed(rank_seed)  # the teacher's dropout masks
        if rng_state is not None:
            torch.set_rng_state(rng_state)
        for epoch in range(start_epoch, config.epochs):
            lr = config.lr if epoch < config.lr_drop_epoch else config.lr / 10
            for group in opt.param_groups:
                group["lr"] = lr
            skip = start_step if epoch == start_epoch else 0
            order = parallel.shard(world, _epoch_order(n, config.seed, epoch))[skip * batch:]
            t0, seen, loss_sum = time.perf_counter(), 0, 0.0
            for step, raw in enumerate(data.batches(order, batch), start=skip + 1):
                # Alg. 2, lines 6-9: inputs from S, fresh gates sigma, one SGD step on l(f_sigma(x), q(x)).
                x = preprocess.prepare(raw.to(device, non_blocking=True), perturb)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast():
                    target = sampler.mean(x, config.teacher_samples, lambda out: to_target(out, config))
                    out = select_output(run_student(x), config.output)
                loss = loss_of(out, target)
                if parallel.any_rank(world, int(not torch.isfinite(loss)), device):
                    where = f"; the last good checkpoint is {checkpoint}" if checkpoint and checkpoint.exists() else ""
                    raise ModelError(f"the distillation loss became {loss.item()} at epoch {epoch + 1}, step {step}{where}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                seen += raw.shape[0]
                loss_sum += loss.item() * raw.shape[0]
                if progress:
                    progress({"event": "step", "done": epoch * steps_per_epoch + step, "total": total_steps,
                              "epoch": epoch + 1, "loss": loss.item(), "lr": lr,
                              "samples_per_s": seen * world.size / max(time.perf_counter() - t0, 1e-9)})
                signum = parallel.any_rank(world, stop["signum"], device)  # a stop on any rank stops all
                if signum:
                    save(epoch, step)
                    name = signal.Signals(signum).name
                    raise Interrupted(f"stopped by {name} at epoch {epoch + 1}, step {step}; "
                                      f"continue with --resume" + (f" (state in {checkpoint})" if checkpoint else ""),
                                      signum)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "lr": lr, "loss": loss_sum / max(seen, 1), "seconds": round(seconds, 3),
                      "samples_per_s": round(seen * world.size / max(seconds, 1e-9), 1)}  # all ranks together
            if data.skipped:
                record["skipped_files"] = data.skipped
            if val_ref is not None:
                record["fidelity"] = _fidelity(student, val, val_ref, preprocess, config, device)
                if best is None or record["fidelity"] < best["fidelity"]:
                    best = {"epoch": epoch + 1, "fidelity": record["fidelity"],
                            "student": {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}}
            history.append(record)
            save(epoch + 1, 0)
            if progress:
                progress({"event": "epoch", **record, "epochs": config.epochs})
            if config.patience and best and epoch + 1 - best["epoch"] >= config.patience:
                break
    if best is not None:
        student.load_state_dict(best["student"])
    if checkpoint is not None and world.main:
        checkpoint.unlink(missing_ok=True)  # finished: nothing left to resume
    if channels_last:
        student = student.to(memory_format=torch.contiguous_format)
    return DistillResult(freeze(student.eval().cpu()), history, best["epoch"] if best else None,
                         sampler.shared_prefix and config.teacher_samples > 1)
