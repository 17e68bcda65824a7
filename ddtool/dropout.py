"""Finding dropout sites, and switching a model between MC and deterministic mode.

*Standard dropout* inference runs the network with every dropout layer in eval mode, which (with
PyTorch's inverted dropout) is the weight-scaling rule of Hinton et al.: each unit contributes
its expectation. *MC dropout* (Bulo et al. 2016, Eq. 4) keeps the gates random at test time and
averages m sampled networks,

    f_hat(x) = 1/m * sum_i f_{Theta, sigma_i}(x),    sigma_i ~ Bernoulli(1 - p) per unit,

which converges to the ideal ensemble predictor f_dropout(x) = E_sigma[f_{Theta,sigma}(x)]
(Eq. 3) as m grows.

Dropout is written in many ways, and a type check finds only some of them. A *site* is found
  * by module: ``nn.Dropout`` and its 1d/2d/3d/alpha variants, multi-layer RNNs with
    ``dropout``, DropPath / stochastic-depth modules (reported; sampled only on request);
  * by attention: ``nn.MultiheadAttention`` (and so ``nn.TransformerEncoderLayer``), and any
    call of ``scaled_dot_product_attention`` with a positive ``dropout_p``;
  * functionally: ``F.dropout(x, p, self.training)`` and friends, ``torch.dropout``, and the
    ``bernoulli_`` masks of hand-written drop-path code, called inside some module's forward.
The functional and attention kinds are visible only while the model runs, so discovery runs one
forward pass in MC mode under a ``TorchFunctionMode`` that records every such call together with
the module whose forward issued it (and counts the calls per pass).

MC mode is the model's train mode, except for normalisation layers that keep running statistics
(BatchNorm, tracked InstanceNorm): they stay in eval mode, so sampling uses, and never updates,
their statistics. Train mode is what makes ``self.training``-gated code drop units, and what turns
off the eval-only fast path of ``nn.TransformerEncoderLayer``, which would skip dropout entirely.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .errors import DDToolError, ModelError, NoDropoutError
from .outputs import select_output

#: Module types whose training flag switches random masking on.
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)
_DROPOUT_NAMES = {t.__name__ for t in DROPOUT_TYPES}
#: Stochastic-depth modules (timm's DropPath, torchvision's StochasticDepth) are recognised by name.
DROP_PATH_NAMES = {"DropPath", "StochasticDepth", "DropBlock2d"}
_NORM_NAMES = ("BatchNorm", "InstanceNorm")

#: Functions that drop units when called with training=True (p is argument 1, training argument 2).
_FUNCTIONAL = {
    F.dropout: "F.dropout", F.dropout1d: "F.dropout1d", F.dropout2d: "F.dropout2d", F.dropout3d: "F.dropout3d",
    F.alpha_dropout: "F.alpha_dropout", F.feature_alpha_dropout: "F.feature_alpha_dropout",
    torch.dropout: "torch.dropout", torch.feature_dropout: "torch.feature_dropout",
    torch.alpha_dropout: "torch.alpha_dropout", torch.feature_alpha_dropout: "torch.feature_alpha_dropout",
}


@dataclass(frozen=True)
class DropoutSite:
    """One place where the model drops units."""

    name: str  # qualified name of the module that owns the site ("<root>" for the model itself)
    kind: str  # module class (Dropout, MultiheadAttention, ...) or function (F.dropout, ...)
    p: float  # drop rate
    found_by: str  # "module", "attention" or "functional"
    calls: int | None = None  # calls per forward pass; None when the model was not run
    sampled: bool = True  # False for DropPath sites unless sampling them was asked for

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- modes
def is_drop_path(module: nn.Module) -> bool:
    return type(module).__name__ in DROP_PATH_NAMES or getattr(module, "original_name", None) in DROP_PATH_NAMES


def _keeps_running_stats(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return bool(module.track_running_stats)
    original = getattr(module, "original_name", "") or ""
    return original.startswith(_NORM_NAMES)


def set_mc(model: nn.Module, sample_drop_path: bool = False) -> nn.Module:
    """Put ``model`` in MC mode (see the module docstring). Returns ``model``."""
    model.train()
    for module in model.modules():
        if _keeps_running_stats(module) or (is_drop_path(module) and not sample_drop_path):
            module.eval()
    return model


@contextlib.contextmanager
def _restoring_modes(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, flag in flags.items():
            if module.training != flag:
                module.train(flag)


@contextlib.contextmanager
def mc_mode(model: nn.Module, sample_drop_path: bool = False) -> Iterator[nn.Module]:
    """Sample dropout masks inside the block; restore every module's training flag after it."""
    with _restoring_modes(model):
        yield set_mc(model, sample_drop_path)


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Standard-dropout (eval) mode inside the block; restore every module's training flag after it."""
    with _restoring_modes(model):
        yield model.eval()


@torch.no_grad()
def mc_average(model: nn.Module, x, samples: int, transform=None, sample_drop_path: bool = False) -> torch.Tensor:
    """Average ``transform(model(x))`` over ``samples`` fresh dropout masks (Eq. 4).

    ``transform`` maps outputs to the space the ensemble is averaged in: probabilities
    (softmax) for classifiers, identity for regression. The masks are drawn from torch's
    global generator, so ``torch.manual_seed`` makes the average reproducible.
    """
    transform = transform or select_output
    with mc_mode(model, sample_drop_path):
        total = transform(model(x)).clone()
        for _ in range(samples - 1):
            total += transform(model(x))
    return total / samples


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A Bernoulli(1 - p) keep mask with the shape and strides of ``x``, from 16 random bits each.

    ``bernoulli_`` (what ``F.dropout`` uses) draws about 65 M elements/s on one of our cores and
    ``rand_like(x) >= p`` about 340 M/s; on the CPU one 64-bit draw here gives four 16-bit
    uniforms u, and an element is kept when u >= round(65536 p) (u taken from -32768), so
    P(keep) = 1 - p', with p' = round(65536 p) / 65536 within 7.7e-6 of p (exact for p = k/2^16,
    e.g. 0.5 or 0.25; ``rand_like`` is itself quantised at 2^-24). Measured with the multiply
    by the mask: 340 M elements/s against 170 M/s for ``rand_like``. Other devices, and tensors
    that are not dense in a standard layout, use ``rand_like``.
    """
    n = x.numel()
    dense = x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last))
    if x.device.type != "cpu" or not dense or n == 0:
        return torch.rand_like(x) >= p
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-(2**63), 2**63 - 1)
    uniform = words.view(torch.int16)[:n].as_strided(x.size(), x.stride())
    return uniform >= round(p * 65536) - 32768


class FastMasks(TorchFunctionMode):
    """Elementwise dropout with the same distribution (see :func:`keep_mask`), drawn faster.

    With dropout on large activations (a conv layer's output), mask generation is a large part
    of an MC forward pass, so the teacher samples its masks this way. Only elementwise
    ``F.dropout`` / ``torch.dropout`` are replaced; the rest runs as written.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.dropout or func is torch.dropout:
            x = args[0]
            p = float(_arg(args, kwargs, 1, ("p",), 0.5))
            training = bool(_arg(args, kwargs, 2, ("training", "train"), True))
            inplace = bool(_arg(args, kwargs, 3, ("inplace",), False))
            if training and 0 < p < 1 and isinstance(x, torch.Tensor) and x.is_floating_point():
                keep = keep_mask(x, p)
                if inplace:
                    return x.mul_(keep).mul_(1.0 / (1.0 - p))
                return x * keep * (1.0 / (1.0 - p))
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- discovery
def _module_site(name: str, module: nn.Module, sample_drop_path: bool) -> DropoutSite | None:
    name = name or "<root>"
    cls = type(module).__name__
    original = getattr(module, "original_name", None)  # scripted modules keep their class name here
    if isinstance(module, DROPOUT_TYPES) or original in _DROPOUT_NAMES:
        kind = original if original in _DROPOUT_NAMES else cls
        if not hasattr(module, "p"):  # a traced TorchScript module keeps no attributes
            p, train = _traced_dropout(module)
            return DropoutSite(name, f"{kind} (traced: fixed off)" if train is False else kind, p, "module",
                               sampled=train is not False)
        return DropoutSite(name, kind, float(module.p), "module")
    if isinstance(module, nn.MultiheadAttention):
        return DropoutSite(name, cls, float(module.dropout), "attention")
    if isinstance(module, nn.RNNBase) and module.num_layers > 1:
        return DropoutSite(name, cls, float(module.dropout), "module")
    if is_drop_path(module):
        p = getattr(module, "drop_prob", getattr(module, "p", 0.0))
        return DropoutSite(name, original or cls, float(p or 0.0), "module", sampled=sample_drop_path)
    sites = getattr(module, "ddtool_dropout_sites", None)  # modules that know their own sites
    return sites() if callable(sites) else None


def _traced_dropout(module: nn.Module) -> tuple[float, bool | None]:
    """p and the train flag of the dropout op in a traced TorchScript module's graph. Tracing
    records the flag of the moment as a constant, so a model traced in eval mode never drops."""
    try:
        nodes = list(module.graph.nodes())
    except Exception:  # noqa: BLE001 - no graph to read
        return 0.0, None
    for node in nodes:
        if node.kind() in ("aten::dropout", "aten::feature_dropout", "aten::alpha_dropout", "aten::feature_alpha_dropout"):
            args = list(node.inputs())
            p, train = args[1].toIValue(), args[2].toIValue()
            return float(p) if isinstance(p, (int, float)) else 0.0, train if isinstance(train, bool) else None
    return 0.0, False  # the tracer left no dropout op at all


def module_sites(model: nn.Module, sample_drop_path: bool = False) -> list[DropoutSite]:
    """The sites visible without running the model: dropout-bearing modules with p > 0."""
    found = []
    for name, module in model.named_modules():
        site = _module_site(name, module, sample_drop_path)
        for s in site if isinstance(site, list) else [site] if site else []:
            if s.p > 0:
                found.append(s)
    return found


def _arg(args, kwargs, index: int, names: tuple[str, ...], default):
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else default


class _Recorder(TorchFunctionMode):
    """Records dropout-like calls and the innermost module running when each was made."""

    def __init__(self, stack: list[str]):
        super().__init__()
        self.stack = stack
        self.calls: list[tuple[str, str, float, str]] = []  # (module name, kind, p, found_by)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = self.stack[-1] if self.stack else "<root>"
        if func in _FUNCTIONAL:
            p = float(_arg(args, kwargs, 1, ("p",), 0.5))
            training = bool(_arg(args, kwargs, 2, ("training", "train"), True))
            if training and p > 0:
                self.calls.append((owner, _FUNCTIONAL[func], p, "functional"))
        elif func is F.scaled_dot_product_attention:
            p = float(_arg(args, kwargs, 4, ("dropout_p",), 0.0))
            if p > 0:
                self.calls.append((owner, "scaled_dot_product_attention", p, "attention"))
        elif func is F.multi_head_attention_forward:
            p = float(_arg(args, kwargs, 13, ("dropout_p",), 0.0))
            if p > 0 and bool(_arg(args, kwargs, 14, ("training",), True)):
                self.calls.append((owner, "multi_head_attention_forward", p, "attention"))
        elif func is torch.Tensor.bernoulli_:
            keep = _arg(args, kwargs, 1, ("p",), 0.5)
            if isinstance(keep, float) and keep < 1:
                self.calls.append((owner, "bernoulli_", 1.0 - keep, "functional"))
        return func(*args, **kwargs)


def _call_model(model: nn.Module, example):
    """Run ``model`` on ``example``; a model that fails on it is the user's error (exit 8), not ours."""
    try:
        if isinstance(example, dict):
            return model(**example)
        if isinstance(example, (tuple, list)):
            return model(*example)
        return model(example)
    except (DDToolError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - any failure of the model's own code
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ModelError(f"the model failed on inputs of shape {shape}: {first}") from None


@torch.no_grad()
def traced_sites(model: nn.Module, example, sample_drop_path: bool = False) -> list[DropoutSite]:
    """Every site, found by running one forward pass on ``example`` in MC mode.

    Module sites get the number of times their module ran; functional and attention calls made
    inside other modules' forwards become sites of those modules, counted per call.
    """
    static = {s.name: s for s in module_sites(model, sample_drop_path)}
    names = {id(m): (n or "<root>") for n, m in model.named_modules()}
    stack: list[str] = []
    counts: dict[str, int] = {}

    def enter(module, _args):
        name = names.get(id(module))
        if name is not None:
            stack.append(name)
            counts[name] = counts.get(name, 0) + 1

    def leave(module, _args, _out):
        if id(module) in names and stack:
            stack.pop()

    recorder = _Recorder(stack)
    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        with mc_mode(model, sample_drop_path), recorder, torch.random.fork_rng(devices=[]):
            _call_model(model, example)
    finally:
        for hook in hooks:
            hook.remove()

    sites = {n: replace(s, calls=counts.get(n, 0)) for n, s in static.items()}
    functional: dict[tuple[str, str], DropoutSite] = {}
    for owner, kind, p, found_by in recorder.calls:
        if owner in static:  # a dropout module's own F.dropout call: counted by its hook
            continue
        site = functional.get((owner, kind))
        functional[(owner, kind)] = replace(site, calls=site.calls + 1) if site else DropoutSite(owner, kind, p, found_by, 1)
    return list(sites.values()) + list(functional.values())


def find_dropout(model: nn.Module, example=None, sample_drop_path: bool = False) -> list[DropoutSite]:
    """Every dropout site of ``model``; with an ``example`` input, functional ones and call counts too.

    Scripted (TorchScript) models cannot be traced from Python, so only their modules are found.
    """
    if example is None or isinstance(model, torch.jit.ScriptModule):
        return module_sites(model, sample_drop_path)
    return traced_sites(model, example, sample_drop_path)


def require_dropout(model: nn.Module, example=None, sample_drop_path: bool = False, select=None) -> list[DropoutSite]:
    """:func:`find_dropout`, raising :class:`NoDropoutError` when nothing would be sampled.

    With an ``example``, also checks that two MC passes give different outputs: the one test
    that no way of writing dropout can escape.
    """
    sites = find_dropout(model, example, sample_drop_path)
    if not any(s.sampled for s in sites):
        hint = "" if example is not None else " (functional dropout is found only by running the model on an input)"
        skipped = " (DropPath sites are not sampled unless asked for)" if sites else ""
        if any("traced" in s.kind for s in sites):
            raise NoDropoutError("no active dropout found: this traced TorchScript model has its dropout fixed off as it "
                                 "was traced; export it with --script, or give its state dict and --arch")
        raise NoDropoutError(f"no active dropout found: no dropout layer with p > 0{skipped}{hint}")
    if example is not None:
        with torch.no_grad(), mc_mode(model, sample_drop_path), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a = select_output(_call_model(model, example), select)
            b = select_output(_call_model(model, example), select)
        if torch.equal(a, b):
            raise NoDropoutError("no active dropout found: the outputs do not vary when dropout is sampled")
    return sites
