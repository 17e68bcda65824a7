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
statistics. The schedule scales Sec. 5.1's (SGD with momentum 0.9, the base rate for 20 epochs,
then a tenth of it for 10 more) to any ``epochs``: the rate drops tenfold after two thirds of
them, or follows a cosine (``schedule="cosine"``). ``lr_find`` picks the base rate without labels,
by a short range test on the fidelity to the MC average (:func:`find_lr`).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .data import Preprocess, UnlabelledSet, perturbation, split_positions
from .dropout import check_dropout, deterministic
from . import parallel
from .errors import DDToolError, ModelError, UsageError, first_line
from .mc import MCSampler
from .mihead import MI_INPUTS, HeadFit, feature_point, fit_head, head_data
from .model import clone_model, freeze, nonfinite_weights, probe, uses_channels_last
from .outputs import check_class_dim, select_output
from .parallel import SINGLE, World
from .resume import (RunState, device_rng_state, interrupted, load_state, restore, save_state, set_device_rng_state,
                     stop_requests)

LOSSES = ("kl", "mse")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("step", "cosine")
FLIPS = ("", "h", "v", "hv")


@dataclass
class DistillConfig:
    """Settings of one distillation run. The defaults follow the paper's Sec. 5.1 where the panel of
    teachers in BENCHMARKS.md ("Defaults") agreed with it: SGD, momentum 0.9, lr 0.01, 30 epochs,
    the tenfold drop after two thirds of them; unlike the paper, S is not perturbed."""

    epochs: int = 30  # paper: 20 epochs at the base rate, then 10 at a tenth of it
    lr: float = 0.01  # the paper uses the last rate of the teacher's own training
    lr_drop_epoch: int | None = None  # "step": epochs 1..N (as reported) use lr, later ones lr / 10; None = 2/3 of epochs
    schedule: str = "step"  # "step" (the paper's tenfold drop) or "cosine" (per epoch, from lr to near 0)
    lr_find: bool = False  # replace lr by a label-free range test's choice (find_lr)
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 64
    teacher_samples: int = 4  # K masked teacher outputs averaged into one target (Thm. 1(ii))
    loss: str = "kl"  # "kl" for classifiers, "mse" for regression outputs
    class_dim: int = 1  # the class axis of the output; KL is taken per position along it
    perturb: float = 0.0  # probability of zeroing each input pixel (the paper's S: 0.2); off: it hurt (BENCHMARKS.md)
    flip: str = ""  # random flips of input images: "", "h", "v" or "hv"
    perturb_tokens: float = 0.0  # text: probability of replacing each real, non-special token with [MASK]/[UNK]
    val_fraction: float = 0.0  # share of inputs held out to measure fidelity after each epoch
    val_mc_samples: int = 32  # masks averaged into the validation reference
    patience: int = 0  # stop after this many epochs without better fidelity; 0 = never
    seed: int = 0
    output: str | int | None = None  # which output is the prediction; None = logits / the first tensor
    sample_drop_path: bool = False  # also sample DropPath / stochastic depth in the teacher
    share_prefix: bool = True  # run the teacher's deterministic prefix once for all K samples
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1", "mps"
    compile: bool = False  # torch.compile the student (the teacher samples under a TorchFunctionMode: eager)
    mi_head: bool = False  # also fit a head predicting the MC mutual information (ddtool.mihead), after the run

    def __post_init__(self):
        checks = {
            "epochs": self.epochs >= 1, "lr": self.lr > 0, "batch_size": self.batch_size >= 1,
            "teacher_samples": self.teacher_samples >= 1, "perturb": 0 <= self.perturb < 1,
            "perturb_tokens": 0 <= self.perturb_tokens < 1,
            "momentum": 0 <= self.momentum < 1, "weight_decay": self.weight_decay >= 0,
            "loss": self.loss in LOSSES, "optimizer": self.optimizer in OPTIMIZERS, "flip": self.flip in FLIPS,
            "val_fraction": 0 <= self.val_fraction < 1, "val_mc_samples": self.val_mc_samples >= 1,
            "patience": self.patience >= 0, "schedule": self.schedule in SCHEDULES,
            "lr_drop_epoch": self.lr_drop_epoch is None or self.lr_drop_epoch >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise UsageError(f"invalid distillation setting: {bad[0]}={getattr(self, bad[0])!r}")
        if self.mi_head and self.loss != "kl":
            raise UsageError("--mi-head applies to classifiers (--loss kl): the mutual information is a split of class entropy")
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
    lr: float | None = None  # the base rate used (the range test's choice with lr_find)
    lr_search: list[dict] = field(default_factory=list)  # with lr_find: each rate tried and its probe fidelity
    mi_head: HeadFit | None = None  # with config.mi_head: the fitted MI head (ddtool.mihead)


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


def drop_epoch(config: DistillConfig) -> int:
    """Epochs at the base rate of the "step" schedule: ``lr_drop_epoch``, or two thirds of the
    epochs (the paper's 20 of 20 + 10), rounded, so the drop happens at any ``epochs`` > 1."""
    return config.lr_drop_epoch if config.lr_drop_epoch is not None else max(1, round(2 * config.epochs / 3))


def scheduled_lr(config: DistillConfig, epoch: int, base: float | None = None) -> float:
    """The rate of epoch ``epoch`` (from 0) for base rate ``base`` (default ``config.lr``):

        step:    eta_e = base for e < drop_epoch, base / 10 after (Sec. 5.1, scaled to ``epochs``)
        cosine:  eta_e = base * (1 + cos(pi * e / epochs)) / 2
    """
    base = config.lr if base is None else base
    if config.schedule == "cosine":
        return base * (1 + math.cos(math.pi * epoch / config.epochs)) / 2
    return base if epoch < drop_epoch(config) else base / 10


def _learning_rate(opt: torch.optim.Optimizer, config: DistillConfig, epoch: int, base: float | None = None) -> float:
    """Set the rate of epoch ``epoch`` (from 0 here; reports count from 1), see :func:`scheduled_lr`."""
    lr = scheduled_lr(config, epoch, base)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of epoch ``epoch``: a function of (seed, epoch) only, so resuming needs no state."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


#: glibc's malloc settings for a distillation on the CPU (see :func:`steady_heap`).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
HEAP_MMAP_BYTES, HEAP_TRIM_BYTES = 64 << 20, 128 << 20


def steady_heap() -> bool:
    """Keep the memory of freed activations in the process (glibc's malloc, Linux) instead of
    handing it back to the kernel at every step and faulting it in again at the next.

    By default glibc serves a large block (a batch's activations, MBs) from a fresh mmap and
    returns it when freed, or trims the heap's top once it is free; the thresholds for both move
    with the sizes seen so far, so a process settles into a mode that holds until it ends. Each
    fresh page then costs a page fault when first written: measured on Quick at batch 64 on the
    CPU, about 12,900 minor faults a distillation step (6,600 a step of the student alone), and
    about 5 with fixed thresholds (BENCHMARKS.md, "Distillation speed"). Fixed here:
    blocks under 64 MiB come from the heap, and up to 128 MiB of its free top is kept. Returns
    whether the settings were applied (not on other C libraries or systems)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_BYTES))


# --------------------------------------------------------------------------- set-up
@dataclass
class _Run:
    """Everything the loop uses, set up once by :func:`_set_up`."""

    config: DistillConfig
    world: World
    device: torch.device
    data: UnlabelledSet  # S, this process's view of it
    preprocess: Preprocess
    student: nn.Module  # the weights being trained
    trained: nn.Module  # what a step runs: the student, DDP-wrapped and compiled as asked
    sampler: MCSampler  # the frozen teacher's masked passes
    opt: torch.optim.Optimizer
    generator: torch.Generator  # the perturbations of S, drawn in this process (on the GPU on CUDA)
    perturb: Callable[[torch.Tensor], torch.Tensor] | None  # pixels zeroed and flips, from that generator
    channels_last: bool
    batch: int  # this rank's share of the global batch
    example: torch.Tensor  # two prepared inputs of S, to check the student on at the end
    val: torch.Tensor | None = None  # held-out raw inputs
    val_ref: torch.Tensor | None = None  # their MC reference, in target space

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(parallel.shard(self.world, torch.arange(len(self.data)))) / self.batch)

    def batches(self, epoch: int, skip: int):
        """(step, raw batch) of ``epoch`` from step ``skip + 1`` on: this rank's share, in the epoch's order."""
        order = parallel.shard(self.world, _epoch_order(len(self.data), self.config.seed, epoch))
        return enumerate(self.data.batches(order[skip * self.batch:], self.batch, self.device), start=skip + 1)

    def inputs(self, raw: torch.Tensor) -> torch.Tensor:
        """A raw batch of S (on the device already) as model input, scaled, perturbed (the paper's
        S: pixels zeroed, flips) and normalised there."""
        x = self.preprocess.prepare(raw.to(self.device, non_blocking=True), self.perturb)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of K masked teacher passes, in the space the loss compares (Thm. 1(ii))."""
        return self.sampler.mean(x, self.config.teacher_samples, lambda out: to_target(out, self.config))

    def loss(self, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.config)(out, target)

    def autocast(self):
        """bf16 on CUDA; full precision elsewhere."""
        on_cuda = self.device.type == "cuda"
        return torch.autocast("cuda", dtype=torch.bfloat16) if on_cuda else contextlib.nullcontext()


def _held_out(data, preprocess: Preprocess, config: DistillConfig, val):
    """S as an :class:`UnlabelledSet`, and the held-out raw inputs: ``val``, or a share of a tensor."""
    if isinstance(data, torch.Tensor):
        train_pos, val_pos = split_positions(data.shape[0], config.val_fraction if val is None else 0.0, config.seed)
        if val_pos:
            val = data[val_pos]
        data = UnlabelledSet.from_tensor(data[train_pos] if val_pos else data, preprocess)
    if len(data) == 0:
        raise DDToolError("no inputs to distill on")
    return data, val


def _compiled(model: nn.Module) -> nn.Module:
    """``torch.compile(model)``, refused up front when inductor has no C++ compiler to build its
    kernels with (as in the slim Docker image): compilation is lazy, and would otherwise fail as
    an internal error at the first step."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:  # another torch layout: let torch.compile say it
        return torch.compile(model)
    try:
        get_cpp_compiler()
    except Exception as err:  # noqa: BLE001 (InvalidCxxCompiler, or whatever the search raises)
        raise UsageError(f"--compile needs a C++ compiler for torch's inductor backend ({first_line(err)}); "
                         "install one (e.g. g++) or run without --compile") from None
    return torch.compile(model)


def _models(model: nn.Module, student: nn.Module | None, example, device, config: DistillConfig):
    """The frozen teacher and the student (a copy of the teacher unless given), on ``device``
    and in channels_last for conv nets on images."""
    teacher = freeze(clone_model(model)).to(device)
    if student is None:  # a copy of the teacher, trainable even if the teacher was saved frozen (a bundle's program)
        student = clone_model(model)
        for param in student.parameters():
            param.requires_grad_(param.is_floating_point())
    student = student.eval().to(device)
    probe(student, example.to(device), config.output)
    channels_last = uses_channels_last(student, example)
    if channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    if not any(p.requires_grad for p in student.parameters()):
        raise ModelError("the model has no trainable parameters to distill")
    return teacher, student, channels_last


def _set_up(model, data, preprocess, config: DistillConfig, val, student, world: World, device) -> _Run:
    """Check the model and the data, and build everything the loop needs."""
    batch = parallel.local_batch(world, config.batch_size)
    data, val = _held_out(data, preprocess, config, val)
    example = preprocess.prepare(data.sample(2))
    preprocess.prepare(data.sample(2).to(device))  # the normalisation's values copied to the device now, not in a step
    out = probe(model, example, config.output)
    if config.loss == "kl":
        check_class_dim(out, config.class_dim)
    plan = check_dropout(model, example, config.sample_drop_path, config.output)
    teacher, student, channels_last = _models(model, student, example, device, config)
    sampler = MCSampler(teacher, example.to(device), select=config.output, sample_drop_path=config.sample_drop_path,
                        share_prefix=config.share_prefix, own=True, plan=plan)
    trained = student
    if world.distributed:  # gradients all-reduced across ranks at every backward pass
        trained = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    if config.compile:  # the student only: under the sampling mode, the teacher recompiles at every op
        trained = _compiled(trained)
    opt = _optimizer([p for p in student.parameters() if p.requires_grad], config)
    # on CUDA the perturbations are drawn on the GPU: no mask crosses from the host
    generator = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(_rank_seed(config, world))
    perturb = perturbation(config.perturb, config.flip, generator, preprocess.text, config.perturb_tokens)
    run = _Run(config, world, device, data, preprocess, student, trained, sampler, opt, generator, perturb,
               channels_last, batch, example, val)
    if val is not None:
        run.val_ref = _val_reference(sampler, val, preprocess, config, device)
    return run


def _rank_seed(config: DistillConfig, world: World) -> int:
    """Each rank its own masks and perturbations."""
    return config.seed + 1_000_003 * world.rank


# --------------------------------------------------------------------------- fidelity
def _fidelity(run: _Run, val: torch.Tensor | None = None, val_ref: torch.Tensor | None = None) -> float:
    """Mean loss of the student against the MC reference on held-out raw inputs (no labels):
    ``val`` and its reference ``val_ref``, by default the run's held-out set."""
    val, val_ref = (run.val, run.val_ref) if val is None else (val, val_ref)
    total, loss_of = 0.0, loss_fn(run.config)
    with torch.no_grad(), deterministic(run.student):
        for raw, ref in zip(val.split(256), val_ref.split(256)):
            out = select_output(run.student(run.preprocess.prepare(raw.to(run.device))), run.config.output)
            total += loss_of(out, ref.to(run.device)).item() * raw.shape[0]
    return total / val.shape[0]


def _val_reference(sampler: MCSampler, val_x, preprocess, config, device) -> torch.Tensor:
    """The MC average of ``config.val_mc_samples`` masks on each held-out input, in target space."""
    refs = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        for raw in val_x.split(64):
            x = preprocess.prepare(raw.to(device))
            refs.append(sampler.mean(x, config.val_mc_samples, lambda out: to_target(out, config)).cpu())
    return torch.cat(refs)


# --------------------------------------------------------------------------- the label-free range test
#: Base rates the range test tries (a factor ~3 apart), the SGD steps it gives each from the
#: student's starting weights, and how many inputs of S it holds out of those steps to measure on.
LR_CANDIDATES = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3)
LR_FIND_STEPS = 60
LR_FIND_PROBE = 512


def find_lr(run: _Run) -> tuple[float, list[dict]]:
    """The base rate for ``run`` chosen without labels, and what the test measured.

    For each rate eta of :data:`LR_CANDIDATES`, the student is trained from its starting weights
    for :data:`LR_FIND_STEPS` steps of Algorithm 2 (a fresh optimizer, the run's settings and
    batches of S), and its fidelity is measured on :data:`LR_FIND_PROBE` inputs of S that those
    steps never saw:

        F(eta) = mean_i KL(p_mc(x_i) || q_eta(x_i))     (MSE for regression outputs)

    with p_mc the average of ``val_mc_samples`` masks. The rate of lowest F wins; a rate whose
    loss turns NaN or infinite scores infinity. Every candidate sees the same batches and masks
    (one seed, the same on every process, so every rank picks the same rate), and the student's
    weights are put back afterwards: the run itself starts exactly as without the test.
    """
    config, start = run.config, _weights(run.student)
    order = _epoch_order(len(run.data), config.seed, -1)
    probe_pos, train_pos = order[:LR_FIND_PROBE], order[LR_FIND_PROBE:]
    if len(train_pos) == 0:  # S smaller than the probe: the test measures on inputs it trained on
        train_pos = order
    probe_x = torch.cat(list(run.data.batches(probe_pos, 256)))
    ref = _val_reference(run.sampler, probe_x, run.preprocess, config, run.device)
    steps = [train_pos[(i * config.batch_size + torch.arange(config.batch_size)) % len(train_pos)]
             for i in range(LR_FIND_STEPS)]
    tried, perturbations = [], run.generator.get_state()
    for lr in LR_CANDIDATES:
        fidelity = _try_lr(run, lr, steps, probe_x, ref)
        run.student.load_state_dict(start)
        run.generator.set_state(perturbations)
        tried.append({"lr": lr, "fidelity": fidelity})
    best = min(tried, key=lambda t: t["fidelity"])
    if not math.isfinite(best["fidelity"]):
        raise ModelError("every learning rate of the range test gave NaN or infinite losses; set --lr without --lr-find")
    return best["lr"], tried


def _try_lr(run: _Run, lr: float, steps: list[torch.Tensor], probe_x: torch.Tensor, ref: torch.Tensor) -> float:
    """The probe fidelity after ``steps`` SGD steps at rate ``lr`` from the current weights (see :func:`find_lr`)."""
    config = run.config
    opt = _optimizer([p for p in run.student.parameters() if p.requires_grad], config)
    for group in opt.param_groups:
        group["lr"] = lr
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []  # (on CUDA the masks come from its generator)
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed + 2)  # the same masks for every candidate, and the run's stream untouched
        for idx in steps:  # (the plain student: no DDP all-reduce; a NaN step is undone by find_lr's restore)
            if not torch.isfinite(_step(run, torch.cat(list(run.data.batches(idx, len(idx)))), run.student, opt)):
                return math.inf
    fidelity = _fidelity(run, probe_x, ref)
    return fidelity if math.isfinite(fidelity) else math.inf


# --------------------------------------------------------------------------- resume state
def _start(run: _Run, checkpoint: Path | None, resume: bool, fingerprint: dict) -> RunState:
    """A fresh state, or the interrupted run's from ``checkpoint`` (loaded into the run) if it
    is the same run: same ``fingerprint``, settings and process count."""
    if not resume:
        return RunState()
    saved = load_state(checkpoint, run.config.as_dict(), run.world.size, fingerprint)
    return restore(saved, checkpoint, run.student, run.opt, run.generator, run.world.rank, run.steps_per_epoch)


def _save(run: _Run, state: RunState, checkpoint: Path | None, fingerprint: dict, epoch: int, step: int) -> None:
    """Write the resumable state after ``step`` of ``epoch`` (rank 0 writes every rank's random
    states: torch's CPU generator, the device's, which draws the masks on CUDA, and the
    perturbations' generator)."""
    if checkpoint is None:
        return
    states = parallel.gather(run.world, (torch.get_rng_state(), run.generator.get_state(), device_rng_state(run.device)))
    if run.world.main:
        save_state(checkpoint, config=run.config.as_dict(), epoch=epoch, step=step,
                   teacher_sha256=fingerprint.get("teacher"), fingerprint=fingerprint,
                   student=_weights(run.student), optimizer=run.opt.state_dict(),
                   generator=[g for _, g, _ in states], rng=[r for r, _, _ in states],
                   device_rng=[d for _, _, d in states], history=state.history, best=state.best,
                   world_size=run.world.size, lr=state.lr, lr_search=state.lr_search)
    parallel.barrier(run.world)


# --------------------------------------------------------------------------- check points
#: Steps between two check points. A step never waits for the device: its loss is summed where
#: it was computed, and only a check point reads anything back (one host synchronisation, and
#: under torchrun one all-reduce): whether the losses and weights are finite, whether a rank was
#: asked to stop, and the loss the progress shows. A NaN is found at most this many steps late,
#: and the run falls back to the state of the last check point.
CHECK_EVERY = 50


@dataclass
class _Good:
    """The last state a check point found finite, kept on the device, to fall back to."""

    epoch: int  # where a resumed run would continue: after ``step`` of ``epoch``
    step: int
    student: dict[str, torch.Tensor]
    optimizer: dict
    rng: torch.Tensor
    generator: torch.Tensor
    device_rng: torch.Tensor | None

    @classmethod
    def of(cls, run: _Run, epoch: int, step: int) -> "_Good":
        """Copies on the device: nothing is read back to the host."""
        return cls(epoch, step, {k: v.detach().clone() for k, v in run.student.state_dict().items()},
                   copy.deepcopy(run.opt.state_dict()), torch.get_rng_state(), run.generator.get_state(),
                   device_rng_state(run.device))

    def restore(self, run: _Run) -> None:
        run.student.load_state_dict(self.student)
        run.opt.load_state_dict(self.optimizer)
        torch.set_rng_state(self.rng)
        run.generator.set_state(self.generator)
        set_device_rng_state(run.device, self.device_rng)


class _Meter:
    """Inputs seen and the summed loss of one epoch. The sum stays on the device (a step adds
    to it and reads nothing); :meth:`read` brings it to the host, at check points only."""

    def __init__(self, run: _Run, epoch: int, lr: float, progress):
        self.run, self.epoch, self.lr, self.progress = run, epoch, lr, progress
        self.start, self.seen = time.perf_counter(), 0
        self.loss_sum = torch.zeros((), device=run.device)
        self.shown: float | None = None  # the mean loss as the last check point read it

    def add(self, loss: torch.Tensor, rows: int) -> None:
        """Add a step's batch-mean ``loss`` (a device tensor) for ``rows`` inputs."""
        self.seen += rows
        self.loss_sum += loss.float() * rows

    def report(self, step: int) -> None:
        """Progress after ``step``, with the epoch's mean loss as the last check point read it."""
        if self.progress:
            steps = self.run.steps_per_epoch
            rate = self.seen * self.run.world.size / max(time.perf_counter() - self.start, 1e-9)  # all ranks
            event = {"event": "step", "done": self.epoch * steps + step, "total": steps * self.run.config.epochs,
                     "epoch": self.epoch + 1, "lr": self.lr, "samples_per_s": rate}
            self.progress({**event, "loss": self.shown} if self.shown is not None else event)

    def read(self) -> float:
        """This rank's mean loss so far in the epoch (a host synchronisation)."""
        return self.loss_sum.item() / max(self.seen, 1)


def _all_finite(run: _Run, meter: _Meter) -> torch.Tensor:
    """Whether every loss summed so far in the epoch and every weight is finite, as a device
    tensor (a NaN or infinite loss leaves the sum so)."""
    weights = [torch.isfinite(p).all() for p in run.student.parameters()]
    return torch.stack([torch.isfinite(meter.loss_sum), *weights]).all()


def _check_point(run: _Run, meter: _Meter, stop: dict, good: _Good, save, epoch: int, step: int,
                 checkpoint: Path | None) -> _Good:
    """Read the flags back once: a non-finite loss or weight on any rank restores every rank to
    ``good`` (at most :data:`CHECK_EVERY` steps back), writes that state and stops; a stop
    request (SIGINT/SIGTERM) on any rank writes the state and stops. Otherwise this is the new
    last good state."""
    flags = torch.stack([(~_all_finite(run, meter)).to(torch.int64),
                         torch.tensor(stop["signum"], dtype=torch.int64, device=run.device)])
    bad, signum = parallel.max_over_ranks(run.world, flags)
    if bad:
        good.restore(run)
        save(good.epoch, good.step)
        where = f"; the last good checkpoint is {checkpoint} (epoch {good.epoch + 1}, after step {good.step})" \
            if checkpoint and checkpoint.exists() else ""
        raise ModelError(f"the distillation loss became NaN or infinite at epoch {epoch + 1}, between step "
                         f"{good.step if good.epoch == epoch else 0} and step {step}{where}; lower --lr")
    if signum:
        save(epoch, step)
        raise interrupted(signum, epoch, step, checkpoint)
    return _Good.of(run, epoch, step) if step < run.steps_per_epoch else _Good.of(run, epoch + 1, 0)


def _end_epoch(run: _Run, state: RunState, meter: _Meter, save) -> bool:
    """Record the epoch (loss, speed, held-out fidelity), keep the best weights, write the
    resumable state, report; True when early stopping ends the run."""
    seconds, epoch = time.perf_counter() - meter.start, meter.epoch
    record = {"epoch": epoch + 1, "lr": meter.lr, "loss": meter.read(), "seconds": round(seconds, 3),
              "samples_per_s": round(meter.seen * run.world.size / max(seconds, 1e-9), 1)}  # all ranks together
    if run.data.skipped:
        record["skipped_files"] = run.data.skipped
    if run.val_ref is not None:
        record["fidelity"] = _fidelity(run)
        if state.best is None or record["fidelity"] < state.best["fidelity"]:
            state.best = {"epoch": epoch + 1, "fidelity": record["fidelity"], "student": _weights(run.student)}
    state.history.append(record)
    save(epoch + 1, 0)
    if meter.progress:
        meter.progress({"event": "epoch", **record, "epochs": run.config.epochs})
    patience = run.config.patience
    return bool(patience and state.best and epoch + 1 - state.best["epoch"] >= patience)


@torch.no_grad()
def _require_finite_student(run: _Run) -> None:
    """A student with NaN or infinite weights, or outputs, is never returned (nor saved)."""
    bad = nonfinite_weights(run.student)
    if bad:
        raise ModelError(f"the distilled student holds {bad}; lower --lr or --weight-decay")
    if not torch.isfinite(probe(run.student, run.example.to(run.device), run.config.output)).all():
        raise ModelError("the distilled student gives NaN or infinite outputs; lower --lr or --weight-decay")


def _finish(run: _Run, state: RunState, checkpoint: Path | None, keep_checkpoint: bool) -> DistillResult:
    """The best (or last) student, checked finite, in eval mode and contiguous on the CPU; the
    finished run's resumable state is removed unless the caller keeps it (until its results
    are safely written)."""
    if state.best is not None:
        run.student.load_state_dict(state.best["student"])
    _require_finite_student(run)
    if checkpoint is not None and run.world.main and not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # finished: nothing left to resume
    student = run.student.to(memory_format=torch.contiguous_format) if run.channels_last else run.student
    return DistillResult(freeze(student.eval().cpu()), state.history, state.best["epoch"] if state.best else None,
                         run.sampler.shared_prefix and run.config.teacher_samples > 1,
                         state.lr if state.lr is not None else run.config.lr, state.lr_search)


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
    fingerprint: dict | None = None,
    keep_checkpoint: bool = False,
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

    The resumable state records what makes a run the same run: ``teacher_sha256``, the inputs
    (names, sizes, count) and ``fingerprint`` (say, the architecture and preprocessing); a
    ``resume`` that differs in any of them is refused. ``keep_checkpoint`` leaves the finished
    run's state in place, for a caller that deletes it only once the results are safely written.
    """
    config = config or DistillConfig()
    device = parallel.local_device(world, resolve_device(config.device))
    steady_heap()
    checkpoint = Path(checkpoint) if checkpoint else None
    with parallel.process_group(world, device):
        run = _set_up(model, data, preprocess, config, val, student, world, device)
        if config.mi_head:  # refused now, not after the run
            _mi_head_applies(run)
        if checkpoint is not None:  # what makes a resumed run the same run
            fingerprint = {"teacher": teacher_sha256, "inputs": run.data.fingerprint(), **(fingerprint or {})}
        state = _start(run, checkpoint, resume, fingerprint or {})
        if config.lr_find and state.lr is None:  # a resumed run keeps the rate its test chose
            state.lr, state.lr_search = find_lr(run)
            if progress:
                progress({"event": "lr_find", "lr": state.lr, "tried": state.lr_search})
        state = _loop(run, state, progress, checkpoint, fingerprint or {})
        result = _finish(run, state, checkpoint, keep_checkpoint)
        if config.mi_head:
            result.mi_head = _fit_mi_head(run, result.student, progress)
        return result


# --------------------------------------------------------------------------- the MI head
def _mi_head_applies(run: _Run) -> None:
    """Refuse ``mi_head`` where it does not apply: text models, several processes, or a student
    whose prediction is not an nn.Linear's output (:func:`ddtool.mihead.feature_point`)."""
    if run.preprocess.text:
        raise UsageError("--mi-head applies to image and tensor classifiers; text models are not supported")
    if run.world.distributed:
        raise UsageError("--mi-head runs in a single process; distill without torchrun to fit it")
    feature_point(run.student, run.example.to(run.device), run.config.output)


def _fit_mi_head(run: _Run, student: nn.Module, progress) -> HeadFit:
    """Fit the MI head of ``ddtool.mihead`` on the finished ``student``: its features and the
    teacher's bias-corrected MC mutual information on at most ``MI_INPUTS`` unperturbed inputs
    of S, in a random stream of its own (the student is not changed)."""
    start, config = time.perf_counter(), run.config
    student = student.to(run.device)
    feature = feature_point(student, run.example.to(run.device), config.output)
    positions = _epoch_order(len(run.data), config.seed, -2)[:MI_INPUTS]
    batches = (run.preprocess.prepare(raw) for raw in run.data.batches(positions, 256, run.device))
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(config.seed + 3)
        features, logits, targets = head_data(student, run.sampler, batches, feature, config.output)
    student.cpu()
    fit = fit_head(features, logits, targets, feature, config.seed)
    fit.seconds = time.perf_counter() - start
    if progress:
        progress({"event": "mi_head", **fit.as_dict()})
    return fit


def _loop(run: _Run, state: RunState, progress, checkpoint: Path | None, fingerprint: dict) -> RunState:
    """Algorithm 2: epochs of SGD steps, each on a batch from S, the frozen teacher's target under
    fresh masks, and the deterministic student's output. A step reads nothing back from the
    device; every :data:`CHECK_EVERY` steps and at the end of each epoch a check point does
    (and in a single process, as soon as a stop is asked for)."""
    def save(epoch, step):
        _save(run, state, checkpoint, fingerprint, epoch, step)

    with _random_streams(run, state), stop_requests() as stop:
        good = _Good.of(run, state.epoch, state.step)
        for epoch in range(state.epoch, run.config.epochs):
            lr = _learning_rate(run.opt, run.config, epoch, state.lr)  # Alg. 2, line 8: eta_t (per epoch, Sec. 5.1)
            meter = _Meter(run, epoch, lr, progress)
            step = checked = state.skip(epoch)
            for step, raw in run.batches(epoch, state.skip(epoch)):
                meter.add(_step(run, raw), raw.shape[0])
                meter.report(step)
                if step % CHECK_EVERY == 0 or step == run.steps_per_epoch or (stop["signum"] and not run.world.distributed):
                    good, checked = _check_point(run, meter, stop, good, save, epoch, step, checkpoint), step
                    meter.shown = meter.read() if progress else None
            if checked != step:  # the epoch ended early (a streamed file that became unreadable): check it all the same
                good = _check_point(run, meter, stop, good, save, epoch, run.steps_per_epoch, checkpoint)
            if _end_epoch(run, state, meter, save):
                break
    return state


def _step(run: _Run, raw: torch.Tensor, student: nn.Module | None = None, opt=None) -> torch.Tensor:
    """One SGD step of Algorithm 2 on a raw batch; its batch-mean loss, left on the device.
    ``student``/``opt`` default to the run's (the range test passes its own)."""
    student = run.trained if student is None else student
    opt = run.opt if opt is None else opt
    x = run.inputs(raw)  # line 6: a batch x_pi from S, perturbed
    with run.autocast():
        target = run.target(x)  # line 7: fresh gates sigma for the frozen teacher, K per input
        out = select_output(student(x), run.config.output)  # the deterministic student q(x)
    loss = run.loss(out, target)  # line 9: l(f_sigma(x), q(x)), the batch mean
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()  # line 9: Omega <- Omega - eta_t * gradient
    return loss.detach()


@contextlib.contextmanager
def _random_streams(run: _Run, state: RunState):
    """torch's generators (the CPU's, and the device's, which draws the masks on CUDA) seeded for
    this rank, or continued from an interrupted run, for the loop only."""
    cuda = [run.device.index or 0] if run.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(_rank_seed(run.config, run.world))  # the teacher's dropout masks
        if state.rng is not None:
            torch.set_rng_state(state.rng)
            set_device_rng_state(run.device, state.device_rng)
        yield
