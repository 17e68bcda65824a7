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
forward pass in train mode under a ``TorchFunctionMode`` that records every such call together
with the module whose forward issued it (and counts the calls per pass). That pass runs on a
copy of the model that shares its parameters but not its buffers or Python state, so whatever
train mode does besides dropout (a spectral norm's power iteration, a user's counter) happens to
the copy only.

MC mode samples dropout and changes nothing else: every module computes as in eval mode, except
  * the dropout modules above, whose training flag switches only their dropout;
  * dropout *functions* (``F.dropout(x, p, self.training)`` in a module in eval mode, the
    attention dropout of ``multi_head_attention_forward``), which a ``TorchFunctionMode``
    (:class:`SampledDropout`) makes drop units whatever their training argument says (it also
    turns off fast paths that would skip dropout, such as ``nn.TransformerEncoderLayer``'s);
  * modules whose own forward decides *before* the call whether to drop
    (``dropout_p=self.p if self.training else 0.0``): they are found by comparing a discovery
    pass in MC mode with the one in train mode, and only they are put in train mode. This is the
    one limitation: anything else such a module's own forward does differently in training
    happens too (its children stay in eval mode).
TorchScript archives cannot be traced from Python: MC mode puts them in train mode except for
normalisation layers with running statistics, which stay in eval mode and are never updated.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .errors import DDToolError, ModelError, NoDropoutError, first_line
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

#: The fused multi-layer RNN ops, whose dropout argument drops units between layers.
_RNN_FUNCTIONS = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


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

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.kind


@dataclass(frozen=True)
class MCPlan:
    """What MC mode needs to know about a model, found by running it once (:func:`plan_mc`)."""

    sites: list[DropoutSite]
    owners: tuple[str, ...] = ()  # modules in train mode because their forward gates a dropout on it
    first: str | None = None  # the module owning the sampled site that runs first ("<root>": the model)


# --------------------------------------------------------------------------- masks
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


def _arg(args, kwargs, index: int, names: tuple[str, ...], default):
    for name in names:
        if name in kwargs:
            return kwargs[name]
    return args[index] if len(args) > index else default


def _with_arg(args, kwargs, index: int, names: tuple[str, ...], value):
    """``(args, kwargs)`` with the argument at ``index`` (or named ``names``) set to ``value``."""
    for name in names:
        if name in kwargs:
            return args, {**kwargs, name: value}
    if len(args) > index:
        return (*args[:index], value, *args[index + 1:]), kwargs
    return args, {**kwargs, names[0]: value}


class SampledDropout(TorchFunctionMode):
    """Inside it, dropout functions drop units whatever their training argument says.

    ``F.dropout(x, p, self.training)`` in a module in eval mode samples a mask, and so does the
    attention dropout of ``F.multi_head_attention_forward``; elementwise ``F.dropout`` /
    ``torch.dropout`` draw their masks with :func:`keep_mask` (the same distribution, faster)
    unless ``fast=False``. An active mode also turns off the eval-only fast paths of
    ``nn.MultiheadAttention`` and ``nn.TransformerEncoderLayer``, which would skip dropout.
    """

    def __init__(self, fast: bool = True):
        super().__init__()
        self.fast = fast

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FUNCTIONAL and float(_arg(args, kwargs, 1, ("p",), 0.5)) > 0:
            x, p = args[0], float(_arg(args, kwargs, 1, ("p",), 0.5))
            if self.fast and func in (F.dropout, torch.dropout) and p < 1 and x.is_floating_point():
                keep = keep_mask(x, p)
                if bool(_arg(args, kwargs, 3, ("inplace",), False)):
                    return x.mul_(keep).mul_(1.0 / (1.0 - p))
                return x * keep * (1.0 / (1.0 - p))
            args, kwargs = _with_arg(args, kwargs, 2, ("training", "train"), True)
        elif func is F.multi_head_attention_forward and float(_arg(args, kwargs, 13, ("dropout_p",), 0.0)) > 0:
            args, kwargs = _with_arg(args, kwargs, 14, ("training",), True)
        return func(*args, **kwargs)


# --------------------------------------------------------------------------- modes
def is_drop_path(module: nn.Module) -> bool:
    return type(module).__name__ in DROP_PATH_NAMES or getattr(module, "original_name", None) in DROP_PATH_NAMES


def _keeps_running_stats(module: nn.Module) -> bool:
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return bool(module.track_running_stats)
    original = getattr(module, "original_name", "") or ""
    return original.startswith(_NORM_NAMES)


def _as_list(site) -> list[DropoutSite]:
    return site if isinstance(site, list) else [site] if site else []


def _set_training(module: nn.Module, flag: bool) -> None:
    """Switch ``module`` alone (not its children). Modules that know their own sites (a
    torch.export program) switch them in their own ``train``."""
    if module.training != flag:
        if hasattr(module, "ddtool_dropout_sites"):
            module.train(flag)
        else:
            module.training = flag


def _train_mode_in_mc(name: str, module: nn.Module, sample_drop_path: bool, owners) -> bool:
    if isinstance(module, torch.jit.ScriptModule):  # not traceable: all but running-stat norms
        return not _keeps_running_stats(module) and not (is_drop_path(module) and not sample_drop_path)
    if (name or "<root>") in owners:
        return True
    return any(s.sampled and s.p > 0 for s in _as_list(_module_site(name, module, sample_drop_path)))


def set_mc(model: nn.Module, sample_drop_path: bool = False, owners=()) -> nn.Module:
    """The training flags of MC mode (see the module docstring): dropout modules and the modules
    named in ``owners`` in train mode, every other module in eval mode. Sampling also needs
    :class:`SampledDropout` around the forward pass; :func:`mc_mode` does both."""
    for name, module in model.named_modules():
        _set_training(module, _train_mode_in_mc(name, module, sample_drop_path, owners))
    return model


@contextlib.contextmanager
def _restoring_modes(model: nn.Module) -> Iterator[None]:
    flags = {m: m.training for m in model.modules()}
    try:
        yield
    finally:
        for module, flag in flags.items():
            _set_training(module, flag)


@contextlib.contextmanager
def mc_mode(model: nn.Module, sample_drop_path: bool = False, owners=(), fast: bool = True) -> Iterator[nn.Module]:
    """Sample dropout, and only dropout, inside the block; restore every training flag after it.

    ``owners`` names the modules whose forward gates a dropout on their own training flag
    (:func:`plan_mc` finds them); ``fast=False`` draws masks with torch's own functions.
    """
    with _restoring_modes(model):
        set_mc(model, sample_drop_path, owners)
        with SampledDropout(fast):
            yield model


@contextlib.contextmanager
def deterministic(model: nn.Module) -> Iterator[nn.Module]:
    """Standard-dropout (eval) mode inside the block; restore every training flag after it."""
    with _restoring_modes(model):
        yield model.eval()


@contextlib.contextmanager
def _train_mode(model: nn.Module, sample_drop_path: bool) -> Iterator[nn.Module]:
    """Train mode but for running-stat norms (and DropPath unless sampled): what discovery runs in."""
    with _restoring_modes(model):
        model.train()
        for module in model.modules():
            if _keeps_running_stats(module) or (is_drop_path(module) and not sample_drop_path):
                module.eval()
        yield model


# --------------------------------------------------------------------------- discovery
def _module_site(name: str, module: nn.Module, sample_drop_path: bool) -> DropoutSite | list | None:
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
    return [s for name, module in model.named_modules()
            for s in _as_list(_module_site(name, module, sample_drop_path)) if s.p > 0]


def _dropout_call(func, args, kwargs) -> tuple[str, float, str] | None:
    """(kind, p, found_by) if this call of ``func`` drops units, else None."""
    if func in _FUNCTIONAL:
        p = float(_arg(args, kwargs, 1, ("p",), 0.5))
        training = bool(_arg(args, kwargs, 2, ("training", "train"), True))
        return (_FUNCTIONAL[func], p, "functional") if training and p > 0 else None
    if func is F.scaled_dot_product_attention:
        p = float(_arg(args, kwargs, 4, ("dropout_p",), 0.0))
        return ("scaled_dot_product_attention", p, "attention") if p > 0 else None
    if func is F.multi_head_attention_forward:
        p = float(_arg(args, kwargs, 13, ("dropout_p",), 0.0))
        training = bool(_arg(args, kwargs, 14, ("training",), True))
        return ("multi_head_attention_forward", p, "attention") if training and p > 0 else None
    if func is torch.Tensor.bernoulli_:
        keep = _arg(args, kwargs, 1, ("p",), 0.5)
        return ("bernoulli_", 1.0 - keep, "functional") if isinstance(keep, float) and keep < 1 else None
    if func in _RNN_FUNCTIONS and len(args) > 6:  # the multi-layer RNN ops of nn.RNNBase
        at = 5 if isinstance(args[2], list) else 6  # (input, hx, weights, ...) or (input, batch_sizes, hx, weights, ...)
        p = float(args[at])
        return (func.__name__, p, "module") if p > 0 and bool(args[at + 1]) else None
    return None


class _Recorder(TorchFunctionMode):
    """Records dropout-like calls, the innermost module running when each was made, and the
    shape of the tensor each one drops units of. Entered outside :class:`SampledDropout`, it
    sees the calls as that mode passes them on."""

    def __init__(self, stack: list[str] | None = None, events: list[str] | None = None):
        super().__init__()
        self.stack = [] if stack is None else stack
        self.events = [] if events is None else events  # owners in call order (shared with module hooks)
        self.calls: list[tuple[str, str, float, str]] = []  # (module name, kind, p, found_by)
        self.shapes: list[tuple[int, ...]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = _dropout_call(func, args, kwargs)
        if call is not None:
            owner = self.stack[-1] if self.stack else "<root>"
            self.calls.append((owner, *call))
            self.events.append(owner)
            self.shapes.append(tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else ())
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
        shape = tuple(example.shape) if isinstance(example, torch.Tensor) else type(example).__name__
        raise ModelError(f"the model failed on inputs of shape {shape}: {first_line(err)}") from None


def _sandbox(model: nn.Module) -> nn.Module:
    """A copy of ``model`` sharing its parameters but not its buffers or Python state, to run in
    train mode without touching ``model`` (a model that cannot be copied is used as it is)."""
    try:
        return copy.deepcopy(model, {id(p): p for p in model.parameters()})
    except Exception:  # noqa: BLE001 - deepcopy fails on some exotic attributes
        return model


@dataclass
class _Trace:
    """One forward pass, watched: the sites that dropped units, their order and their gates."""

    sites: list[DropoutSite]
    order: list[str]  # sampled sites by first call
    gates: dict[tuple[str, str], str]  # site -> the module whose forward decided to call it


@torch.no_grad()
def _trace(model: nn.Module, example, sample_drop_path: bool, mode) -> _Trace:
    """Run ``model`` on ``example`` in ``mode`` (a context manager on the model) and record its
    sites. Module sites get the number of times their module ran; functional and attention calls
    made inside other modules' forwards become sites of those modules, counted per call."""
    static = {s.name: s for s in module_sites(model, sample_drop_path)}
    names = {id(m): (n or "<root>") for n, m in model.named_modules()}
    stack: list[str] = []
    counts: dict[str, int] = {}
    events: list[str] = []  # module sites as they are entered, owners of dropout calls as they call
    gates: dict[tuple[str, str], str] = {}

    def enter(module, _args):
        name = names.get(id(module))
        if name is not None:
            if name in static:
                gates.setdefault(static[name].key, stack[-1] if stack else "<root>")  # its caller
                if static[name].sampled:
                    events.append(name)
            stack.append(name)
            counts[name] = counts.get(name, 0) + 1

    def leave(module, _args, _out):
        if id(module) in names and stack:
            stack.pop()

    recorder = _Recorder(stack, events)
    hooks = [register_module_forward_pre_hook(enter), register_module_forward_hook(leave)]
    try:
        with recorder, mode(model), torch.random.fork_rng(devices=[]):
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
        gates[(owner, kind)] = owner
    sampled = {s.name for s in static.values() if s.sampled} | {owner for owner, _ in functional}
    order = list(dict.fromkeys(e for e in events if e in sampled))
    return _Trace(list(sites.values()) + list(functional.values()), order, gates)


def plan_mc(model: nn.Module, example, sample_drop_path: bool = False) -> MCPlan:
    """The sites of ``model`` and what MC mode must switch to sample them, from two passes on
    ``example``: one in train mode (on a sandbox copy) finds every site, one in MC mode finds
    those that do not drop units there; the modules gating those on their training flag are the
    plan's ``owners``. Sites that drop units only in MC mode (a dropout function called with
    ``training=False``) are sites too."""
    if example is None or isinstance(model, torch.jit.ScriptModule):
        return MCPlan(module_sites(model, sample_drop_path))
    trained = _trace(_sandbox(model), example, sample_drop_path, lambda m: _train_mode(m, sample_drop_path))
    sampled = _trace(model, example, sample_drop_path, lambda m: mc_mode(m, sample_drop_path, fast=False))
    calls = {s.key: s.calls for s in sampled.sites}
    missing = [s for s in trained.sites if s.sampled and s.calls and calls.get(s.key, 0) < s.calls]
    owners = tuple(sorted({trained.gates[s.key] for s in missing}))
    known = {s.key for s in trained.sites}
    extra = [s for s in sampled.sites if s.key not in known and s.calls]
    return MCPlan(trained.sites + extra, owners, trained.order[0] if trained.order else None)


@torch.no_grad()
def dropout_shapes(run) -> tuple[object, list[tuple[int, ...]]]:
    """``run()``'s result, and the shape of the tensor of every dropout-like call it made, in order."""
    recorder = _Recorder()
    with recorder:
        out = run()
    return out, recorder.shapes


def find_dropout(model: nn.Module, example=None, sample_drop_path: bool = False) -> list[DropoutSite]:
    """Every dropout site of ``model``; with an ``example`` input, functional ones and call counts too.

    Scripted (TorchScript) models cannot be traced from Python, so only their modules are found.
    """
    return plan_mc(model, example, sample_drop_path).sites


def check_dropout(model: nn.Module, example=None, sample_drop_path: bool = False, select=None) -> MCPlan:
    """:func:`plan_mc`, raising :class:`NoDropoutError` when nothing would be sampled.

    With an ``example``, also checks that two MC passes give different outputs: the one test
    that no way of writing dropout can escape.
    """
    plan = plan_mc(model, example, sample_drop_path)
    if not any(s.sampled for s in plan.sites):
        hint = "" if example is not None else " (functional dropout is found only by running the model on an input)"
        skipped = " (DropPath sites are not sampled unless asked for)" if plan.sites else ""
        if any("traced" in s.kind for s in plan.sites):
            raise NoDropoutError("no active dropout found: this traced TorchScript model has its dropout fixed off as it "
                                 "was traced; export it with --script, or give its state dict and --arch")
        raise NoDropoutError(f"no active dropout found: no dropout layer with p > 0{skipped}{hint}")
    if example is not None:
        with torch.no_grad(), mc_mode(model, sample_drop_path, plan.owners), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            a = select_output(_call_model(model, example), select)
            b = select_output(_call_model(model, example), select)
        if torch.equal(a, b):
            raise NoDropoutError("no active dropout found: the outputs do not vary when dropout is sampled")
    return plan


def require_dropout(model: nn.Module, example=None, sample_drop_path: bool = False, select=None) -> list[DropoutSite]:
    """The sites of :func:`check_dropout`."""
    return check_dropout(model, example, sample_drop_path, select).sites
