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
so E[grad] is unchanged while its variance falls (``teacher_samples``). When K > 1 the part of
the teacher before its first dropout site is deterministic; :class:`TeacherSampler` computes it
once and repeats only its output K times.

The student q starts from the teacher's weights (standard dropout is in Q, Fig. 1) or from a
smaller network (Sec. 5.3) and runs deterministically: dropout off, BatchNorm on its running
statistics. The schedule follows Sec. 5.1: SGD with momentum 0.9, the base rate for 20 epochs,
then a tenth of it for 10 more.
"""

from __future__ import annotations

import contextlib
import copy
import io
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
from .dropout import FastMasks, deterministic, find_dropout, require_dropout, set_mc
from .errors import EXIT_INTERRUPTED, CheckpointError, DDToolError, ModelError, UsageError
from .files import to_bytes, write_bytes
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


# --------------------------------------------------------------------------- the teacher
class TeacherSampler:
    """K masked teacher outputs per input, averaged into the distillation target.

    The K copies of a batch are stacked into one batch of K*B rows, so each row gets its own
    dropout masks. With ``share_prefix`` the stacking happens at the first dropout site instead
    of at the input: a forward pre-hook on the module that owns that site repeats its inputs K
    times, so everything before it runs once. Whether this is valid for the model (no skip
    connection around the site carrying the unrepeated batch, say) is checked once, in eval
    mode, against the plain K-fold stack; if the two differ, the plain stack is used.
    """

    def __init__(self, teacher: nn.Module, config: DistillConfig, example: torch.Tensor):
        self.teacher, self.config, self.k = teacher, config, config.teacher_samples
        self.hook_module: nn.Module | None = None
        if self.k > 1 and config.share_prefix and not isinstance(teacher, torch.jit.ScriptModule):
            self.hook_module = self._first_site_module(example)
            if self.hook_module is not None and not self._prefix_sharing_is_exact(example):
                self.hook_module = None

    def _first_site_module(self, example) -> nn.Module | None:
        sites = [s for s in find_dropout(self.teacher, example, self.config.sample_drop_path) if s.sampled and s.calls]
        if not sites or sites[0].name == "<root>":
            return None
        return dict(self.teacher.named_modules()).get(sites[0].name)

    @contextlib.contextmanager
    def _repeat_at_first_site(self, batch: int, k: int):
        fired = False

        def hook(_module, args, kwargs):
            nonlocal fired
            if fired:
                return None
            fired = True

            def rep(a):
                return a.repeat(k, *([1] * (a.dim() - 1))) if isinstance(a, torch.Tensor) and a.dim() and a.shape[0] == batch else a
            return tuple(rep(a) for a in args), {k: rep(v) for k, v in kwargs.items()}

        handle = self.hook_module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _raw(self, x: torch.Tensor, k: int) -> torch.Tensor:
        with FastMasks():
            if self.hook_module is not None and k > 1:
                with self._repeat_at_first_site(x.shape[0], k):
                    return select_output(self.teacher(x), self.config.output)
            stacked = x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x
            return select_output(self.teacher(stacked), self.config.output)

    @torch.no_grad()
    def _prefix_sharing_is_exact(self, example: torch.Tensor) -> bool:
        with deterministic(self.teacher):
            try:
                shared = self._raw(example, self.k)
            except Exception:  # noqa: BLE001 - a shape clash means sharing does not apply
                return False
            plain = select_output(self.teacher(example.repeat(self.k, *([1] * (example.dim() - 1)))), self.config.output)
        return shared.shape == plain.shape and torch.allclose(shared, plain, atol=1e-5, rtol=1e-4)

    @torch.no_grad()
    def target(self, x: torch.Tensor, k: int | None = None) -> torch.Tensor:
        """The mean over K (or ``k``) masked passes of the teacher's target-space output."""
        k = k or self.k
        out = to_target(self._raw(x, k), self.config)
        return out.view(k, x.shape[0], *out.shape[1:]).mean(0)


# --------------------------------------------------------------------------- helpers
def clone_model(model: nn.Module) -> nn.Module:
    """An independent copy of ``model`` with leaf parameters (deepcopy breaks ScriptModules' ones)."""
    if isinstance(model, torch.jit.ScriptModule):
        buffer = io.BytesIO()
        torch.jit.save(model, buffer)
        buffer.seek(0)
        return torch.jit.load(buffer, map_location="cpu")
    return copy.deepcopy(model)


def _frozen(model: nn.Module) -> nn.Module:
    for param in model.parameters():  # not requires_grad_(): ScriptModules refuse it
        param.requires_grad_(False)
    return model


@torch.no_grad()
def probe(model: nn.Module, x, select=None) -> torch.Tensor:
    """Run ``model`` once on ``x`` (in eval mode) and return its prediction tensor."""
    try:
        with deterministic(model):
            out = select_output(model(x), select)
    except (ModelError, DDToolError):
        raise
    except Exception as err:  # noqa: BLE001 - a model failing on the data is a user error
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelError(f"the model failed on inputs of shape {shape}: {first}") from None
    if out.dim() == 0 or out.shape[0] != (x.shape[0] if isinstance(x, torch.Tensor) else out.shape[0]):
        raise ModelError(f"the model must return one output row per input; it returned shape {tuple(out.shape)}")
    return out


def uses_channels_last(model: nn.Module, example) -> bool:
    """channels_last helps 2-D convolutions on CPU (oneDNN: about 1.5-1.9x for our nets, forward
    and backward) and on CUDA (tensor cores); it is used for conv models on image batches."""
    return (isinstance(example, torch.Tensor) and example.dim() == 4 and example.is_floating_point()
            and not isinstance(model, torch.jit.ScriptModule) and any(isinstance(m, nn.Conv2d) for m in model.modules()))


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


def _val_reference(teacher, val_x, preprocess, config, device) -> torch.Tensor:
    refs = []
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed + 1)
        sampler = TeacherSampler(teacher, replace_k(config, config.val_mc_samples), preprocess.prepare(val_x[:2].to(device)))
        for raw in val_x.split(64):
            refs.append(sampler.target(preprocess.prepare(raw.to(device))).cpu())
    return torch.cat(refs)


def replace_k(config: DistillConfig, k: int) -> DistillConfig:
    return DistillConfig(**{**config.as_dict(), "teacher_samples": k})


def _save_state(path: Path, **state) -> None:
    # in memory first: torch.save raises RuntimeError, not OSError, on a full disk
    write_bytes(path, to_bytes(lambda buffer: torch.save({"ddtool_resume": 1, **state}, buffer)), force=True)


@torch.no_grad()
def _require_finite_student(student: nn.Module, example: torch.Tensor, config: DistillConfig) -> None:
    """A student with NaN or infinite weights, or outputs, is never returned (nor saved)."""
    from .checkpoint import check_finite

    try:
        check_finite(student, "the distilled student")
    except CheckpointError as err:
        raise ModelError(f"{err}; lower --lr or --weight-decay") from None
    if not torch.isfinite(probe(student, example, config.output)).all():
        raise ModelError("the distilled student gives NaN or infinite outputs; lower --lr or --weight-decay")


def load_resume_state(path: Path, config: DistillConfig, fingerprint: dict | None = None) -> dict:
    """The state of an interrupted run, checked against ``config`` and against ``fingerprint``
    (the teacher's hash, the inputs, the architecture: what makes it the same run)."""
    if not path.is_file():
        raise UsageError(f"--resume: no resumable checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint (unreadable: {first})") from None
    if not isinstance(state, dict) or state.get("ddtool_resume") != 1 or not isinstance(state.get("config"), dict):
        raise CheckpointError(f"{path} is not a ddtool resumable checkpoint")
    for key, value in (fingerprint or {}).items():
        if key in state.get("fingerprint", {}) and state["fingerprint"][key] != value:
            verb = "differ" if key.endswith("s") else "differs"
            raise UsageError(f"--resume: the {key} {verb} from the interrupted run's ({str(state['fingerprint'][key])[:40]} "
                             f"then, {str(value)[:40]} now); continue with the same ones, or start over with --force")
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

    ``fingerprint`` (teacher hash, inputs, architecture) is saved with the resumable state and a
    ``resume`` whose fingerprint differs is refused. ``keep_checkpoint`` leaves the state of the
    finished run in place, for a caller that deletes it only once the results are safely written.
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
    example = preprocess.prepare(data.sample(2))
    out = probe(model, example, config.output)
    if config.loss == "kl" and not (-out.dim() <= config.class_dim < out.dim() and config.class_dim % out.dim()):
        raise UsageError(f"--class-dim {config.class_dim}: the model's output has shape {tuple(out.shape)}, "
                         "so the class axis is one of 1.." + str(out.dim() - 1) + " (axis 0 is the batch)")
    require_dropout(model, example, config.sample_drop_path, config.output)

    teacher = _frozen(set_mc(clone_model(model), config.sample_drop_path)).to(device)
    if student is None:  # a copy of the teacher, trainable even if the teacher was saved frozen
        student = clone_model(model)
        for param in student.parameters():
            param.requires_grad_(param.is_floating_point())
    student = student.eval().to(device)
    probe(student, example.to(device), config.output)
    channels_last = uses_channels_last(student, example)
    if channels_last:
        teacher, student = teacher.to(memory_format=torch.channels_last), student.to(memory_format=torch.channels_last)
    params = [p for p in student.parameters() if p.requires_grad]
    if not params:
        raise ModelError("the model has no trainable parameters to distill")
    opt = _optimizer(params, config)
    sampler = TeacherSampler(teacher, config, example.to(device))
    loss_of = loss_fn(config)
    trained = student
    if world.distributed:  # gradients all-reduced across ranks at every backward pass
        trained = nn.parallel.DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    run_teacher, run_student = (torch.compile(teacher), torch.compile(trained)) if config.compile else (teacher, trained)
    if config.compile:
        sampler.teacher = run_teacher
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext

    rank_seed = config.seed + 1_000_003 * world.rank  # each rank its own masks and perturbations
    gen = torch.Generator().manual_seed(rank_seed)  # perturbations, drawn in this process
    perturb = perturbation(config.perturb, config.flip, gen)
    val_ref = _val_reference(teacher, val, preprocess, config, device) if val is not None else None
    steps_per_epoch = math.ceil(len(parallel.shard(world, torch.arange(n))) / batch)
    history: list[dict] = []
    start_epoch, start_step, best = 0, 0, None
    checkpoint = Path(checkpoint) if checkpoint else None
    rng_state = None
    if checkpoint is not None:  # what makes a resumed run the same run
        fingerprint = {"teacher": teacher_sha256, "inputs": data.fingerprint(), **(fingerprint or {})}
    if resume:
        state = load_resume_state(checkpoint, config, fingerprint)
        if state.get("world_size", 1) != world.size:
            raise UsageError(f"--resume: the interrupted run had {state.get('world_size', 1)} process(es), this one {world.size}")
        try:
            student.load_state_dict(state["student"])
            opt.load_state_dict(state["optimizer"])
            gen.set_state(state["generator"][world.rank])
            rng_state, history, best = state["rng"][world.rank], list(state["history"]), state.get("best")
            start_epoch, start_step = int(state["epoch"]), int(state["step"])
            if not (isinstance(rng_state, torch.Tensor) and rng_state.dtype == torch.uint8
                    and rng_state.shape == torch.get_rng_state().shape):
                raise ValueError("the saved random state has another type or size")
            if not (0 <= start_epoch and 0 <= start_step <= steps_per_epoch):
                raise ValueError(f"epoch {start_epoch}, step {start_step} out of range")
            if best is not None:
                own = student.state_dict()
                if {k: tuple(v.shape) for k, v in best["student"].items()} != {k: tuple(v.shape) for k, v in own.items()}:
                    raise ValueError("the best epoch's weights have other shapes")
                best = {"epoch": int(best["epoch"]), "fidelity": float(best["fidelity"]), "student": best["student"]}
        except (RuntimeError, KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
            raise CheckpointError(f"{checkpoint} does not fit this run (another model or settings?): {first}") from None

    def save(epoch: int, step: int) -> None:
        if checkpoint is None:
            return
        states = parallel.gather(world, (torch.get_rng_state(), gen.get_state()))  # every rank's, for --resume
        if world.main:
            _save_state(checkpoint, config=config.as_dict(), epoch=epoch, step=step, teacher_sha256=teacher_sha256,
                        fingerprint=fingerprint,
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
                    target = sampler.target(x)
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
    _require_finite_student(student, example.to(device), config)
    if checkpoint is not None and world.main and not keep_checkpoint:
        checkpoint.unlink(missing_ok=True)  # finished: nothing left to resume
    if channels_last:
        student = student.to(memory_format=torch.contiguous_format)
    return DistillResult(_frozen(student.eval().cpu()), history, best["epoch"] if best else None,
                         sampler.hook_module is not None)
