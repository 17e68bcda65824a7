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
TorchScript archives cannot be traced from Python: their sites are read from their graph
(:func:`script_sites`), and MC mode puts them in train mode except for normalisation layers with
running statistics, which stay in eval mode and are never updated. torch.export programs switch
their random ops in their own graph (:func:`program_switches`).

Whether sampling does vary the outputs is checked statistically (:func:`outputs_vary`), so that
a drop path that happens not to drop in two passes over two inputs is not taken for no dropout.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.overrides import TorchFunctionMode

from .errors import CheckpointError, DDToolError, ModelError, NoDropoutError, first_line
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
    _tell_drop_path(model, sample_drop_path)
    for name, module in model.named_modules():
        _set_training(module, _train_mode_in_mc(name, module, sample_drop_path, owners))
    return model


def _tell_drop_path(model: nn.Module, sample_drop_path: bool) -> None:
    """Modules that switch their own sites (a torch.export program) sample their drop paths in
    train mode only if told so."""
    for module in model.modules():
        if hasattr(module, "ddtool_dropout_sites") and hasattr(module, "sample_drop_path"):
            module.sample_drop_path = sample_drop_path


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
        _tell_drop_path(model, sample_drop_path)
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
            fixed = " (traced: fixed off)" if train is False else " (traced: fixed on)" if train is True else ""
            return DropoutSite(name, kind + fixed, p, "module", sampled=train is not False)
        return DropoutSite(name, kind, float(module.p), "module")
    if isinstance(module, nn.MultiheadAttention):
        return DropoutSite(name, cls, float(module.dropout), "attention")
    if isinstance(module, nn.RNNBase) and module.num_layers > 1:
        return DropoutSite(name, cls, float(module.dropout), "module")
    if is_drop_path(module):
        p = getattr(module, "drop_prob", getattr(module, "p", 0.0))
        return DropoutSite(name, original or cls, float(p or 0.0), "module", sampled=sample_drop_path)
    sites = getattr(module, "ddtool_dropout_sites", None)  # modules that know their own sites
    return sites(sample_drop_path) if callable(sites) else None


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
    listed = module_sites(model, sample_drop_path)
    static = {s.name: s for s in listed}
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
    sites = [s if s.calls is not None else replace(s, calls=counts.get(s.name, 0)) for s in listed]  # (programs count their own)
    functional: dict[tuple[str, str], DropoutSite] = {}
    for owner, kind, p, found_by in recorder.calls:
        if owner in static:  # a dropout module's own F.dropout call: counted by its hook
            continue
        site = functional.get((owner, kind))
        functional[(owner, kind)] = replace(site, calls=site.calls + 1) if site else DropoutSite(owner, kind, p, found_by, 1)
        gates[(owner, kind)] = owner
    sampled = {s.name for s in static.values() if s.sampled} | {owner for owner, _ in functional}
    order = list(dict.fromkeys(e for e in events if e in sampled))
    return _Trace(sites + list(functional.values()), order, gates)


def plan_mc(model: nn.Module, example, sample_drop_path: bool = False) -> MCPlan:
    """The sites of ``model`` and what MC mode must switch to sample them, from two passes on
    ``example``: one in train mode (on a sandbox copy) finds every site, one in MC mode finds
    those that do not drop units there; the modules gating those on their training flag are the
    plan's ``owners``. Sites that drop units only in MC mode (a dropout function called with
    ``training=False``) are sites too."""
    if isinstance(model, torch.jit.ScriptModule):
        return MCPlan(module_sites(model, sample_drop_path) + script_sites(model, sample_drop_path))
    if example is None:
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


#: Row pairs (the same input in two sampled passes) compared before "the outputs do not vary
#: under sampling" is concluded. A site of drop rate p leaves a row unchanged between two passes
#: only if both keep or both drop its units, with probability q = (1 - p)^2 + p^2 per pair (for
#: a per-sample DropPath; an elementwise dropout of many units changes almost every row). So a
#: net whose only sampled site is a DropPath of rate 0.05 (q = 0.905) is wrongly refused with
#: probability 0.905^256 < 1e-11: the false-refusal probability of the check.
ACTIVITY_PAIRS = 256
#: Rows per pass in that check: passes of 1, 4, 16, ... copies of the example, up to this many rows.
ACTIVITY_ROWS = 64


def _repeat_example(example, copies: int):
    """``example`` with every tensor repeated ``copies`` times along the batch axis."""
    if isinstance(example, torch.Tensor):
        return example.repeat(copies, *([1] * (example.dim() - 1))) if copies > 1 and example.dim() else example
    if isinstance(example, dict):
        return {k: _repeat_example(v, copies) for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return type(example)(_repeat_example(v, copies) for v in example)
    return example


def _example_rows(example) -> int:
    tensors = [example] if isinstance(example, torch.Tensor) else \
        list(example.values()) if isinstance(example, dict) else list(example) if isinstance(example, (tuple, list)) else []
    return next((int(t.shape[0]) for t in tensors if isinstance(t, torch.Tensor) and t.dim()), 1)


@torch.no_grad()
def outputs_vary(model: nn.Module, example, plan: MCPlan, sample_drop_path: bool = False, select=None) -> bool:
    """Whether two sampled passes over ``example`` (repeated into growing batches) ever give
    different outputs, before :data:`ACTIVITY_PAIRS` row pairs have been compared."""
    rows, compared, copies = _example_rows(example), 0, 1
    with mc_mode(model, sample_drop_path, plan.owners), torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        while compared < ACTIVITY_PAIRS:
            x = _repeat_example(example, copies)
            if not torch.equal(select_output(_call_model(model, x), select), select_output(_call_model(model, x), select)):
                return True
            compared += copies * rows
            copies = max(1, min(copies * 4, ACTIVITY_ROWS // rows))
    return False


def _drop_path_hint(plan: MCPlan) -> str:
    """What to pass when drop-path sites exist but are not sampled."""
    if any(not s.sampled and "fixed off" not in s.kind for s in plan.sites):
        return "; its DropPath (stochastic depth) sites are sampled only with --sample-drop-path"
    return ""


def check_dropout(model: nn.Module, example=None, sample_drop_path: bool = False, select=None) -> MCPlan:
    """:func:`plan_mc`, raising :class:`NoDropoutError` when nothing would be sampled.

    With an ``example``, also checks that sampled passes give different outputs (the one test
    that no way of writing dropout can escape), statistically: see :data:`ACTIVITY_PAIRS`.
    """
    plan = plan_mc(model, example, sample_drop_path)
    fixed_on = [s for s in plan.sites if "fixed on" in s.kind]
    if fixed_on:
        raise CheckpointError(f"this TorchScript model's dropout ({fixed_on[0].name}: {fixed_on[0].kind}) always drops "
                              "units (it was traced in train mode, or called with training=True), so the model can never "
                              "run deterministically: trace it in eval mode or script it, or give its state dict and --arch")
    if not any(s.sampled for s in plan.sites):
        scripted = isinstance(model, torch.jit.ScriptModule)
        hint = " (functional dropout is found only by running the model on an input)" if example is None and not \
            scripted else ""
        if scripted and not plan.sites:
            hint = (" in its modules or its graph (a TorchScript archive is read, not run, to find dropout): if it drops "
                    "units in another way, give its state dict and --arch instead")
        if any("traced" in s.kind for s in plan.sites):
            raise NoDropoutError("no active dropout found: this traced TorchScript model has its dropout fixed off as it "
                                 "was traced; export it with --script, or give its state dict and --arch")
        raise NoDropoutError(f"no active dropout found: no dropout layer with p > 0{hint}{_drop_path_hint(plan)}")
    if example is not None and not outputs_vary(model, example, plan, sample_drop_path, select):
        raise NoDropoutError(f"no active dropout found: the outputs do not vary when dropout is sampled "
                             f"({ACTIVITY_PAIRS} inputs compared over pairs of passes){_drop_path_hint(plan)}")
    return plan


def require_dropout(model: nn.Module, example=None, sample_drop_path: bool = False, select=None) -> list[DropoutSite]:
    """The sites of :func:`check_dropout`."""
    return check_dropout(model, example, sample_drop_path, select).sites


# --------------------------------------------------------------------------- torch.export programs
# A torch.export program is a graph of ATen ops whose random ones were recorded as they ran at
# export. Each is switched in the graph itself (:class:`ProgramSwitch`), never by running Python:
#   aten.dropout / native_dropout / feature_dropout / alpha_dropout / feature_alpha_dropout
#       their ``train`` argument: True when sampling, False when deterministic;
#   scaled_dot_product_attention and its fused kernels (any op with a ``dropout_p`` argument)
#       ``dropout_p``: the recorded p when sampling, 0 when deterministic;
#   bernoulli(x, keep) / x.bernoulli_(keep), the masks of hand-written drop paths
#       replaced by their expectation when deterministic: full_like(x, keep) / x.fill_(keep),
#       so that ``x * mask / keep`` is ``x`` again, exactly as in eval mode;
#   bernoulli(probabilities), hand-written dropout
#       replaced by its expectation, the probabilities themselves;
#   floor(rand(...) + keep), the older timm drop path's mask
#       replaced by its expectation ``keep`` in the same way.
# Any other random op (randn noise, a rand mask of another form, ...) cannot be switched, and the
# program is refused naming it. Training-mode batch norm is turned to its eval form (running
# statistics, no update) once, at load, since ddtool never runs a model's normalisation in
# training mode (:func:`program_running_stats`).
_PROGRAM_DROPOUT = ("dropout", "native_dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")


@dataclass(frozen=True)
class ProgramSwitch:
    """How one node of a program's graph is switched between sampled and deterministic.

    ``how`` is "argument" (the argument ``at``, an index or a keyword, is ``on`` when sampling and
    ``off`` when not) or "target" (the node calls ``on`` with ``extra[0]`` after its first
    argument when sampling, ``off`` with ``extra[1]`` when not). Nodes are named, not held, so that a copy
    of the module (whose graph holds other node objects) switches its own graph.
    """

    node: str
    how: str
    at: int | str
    on: object
    off: object
    extra: tuple = ((), ())
    site: DropoutSite | None = None  # what inspect reports (None for a node that only helps another)
    drop_path: bool = False  # sampled only with --sample-drop-path

    def apply(self, node, sample: bool) -> None:
        """Switch ``node`` (the graph's node named ``self.node``)."""
        if self.how == "argument":
            value = self.on if sample else self.off
            node.update_arg(self.at, value) if isinstance(self.at, int) else node.update_kwarg(self.at, value)
        else:
            node.target = self.on if sample else self.off
            node.args = (node.args[0], *self.extra[0 if sample else 1])
            node.kwargs = {}


def _node_owner(node) -> tuple[str, str]:
    """The qualified name and the class name of the module whose forward made ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    path, cls = list(stack.values())[-1] if stack else ("", "")
    return path or "", str(cls).rpartition(".")[2]


def _schema_index(op, name: str) -> int | None:
    return next((i for i, a in enumerate(op._schema.arguments) if a.name == name), None)


def _node_arg(node, index: int, name: str, default=None):
    return node.kwargs[name] if name in node.kwargs else node.args[index] if len(node.args) > index else default


def _program_site(node, kind: str, p: float, found_by: str) -> tuple[DropoutSite, bool]:
    path, cls = _node_owner(node)
    drop_path = cls in DROP_PATH_NAMES
    name = f"program.{path}" if path else "program"
    return DropoutSite(name, cls if drop_path else kind, p, "module" if drop_path else found_by), drop_path


def _floor_of_rand(node) -> tuple[object, float] | None:
    """``(floor node, keep)`` when ``node`` (a rand) feeds only ``floor(rand + keep)``."""
    aten = torch.ops.aten
    users = list(node.users)
    if len(users) != 1 or users[0].target is not aten.add.Tensor or not isinstance(users[0].args[1], float):
        return None
    add = users[0]
    floors = list(add.users)
    if len(floors) == 1 and floors[0].target in (aten.floor.default, aten.floor_.default) and 0 < add.args[1] <= 1:
        return floors[0], float(add.args[1])
    return None


def _switch_of(node) -> ProgramSwitch | str | None:
    """The switch of one random node, None if it never draws, or why it cannot be switched."""
    aten, op = torch.ops.aten, node.target
    name = getattr(op, "_opname", "")
    if name in _PROGRAM_DROPOUT:
        p = float(_node_arg(node, 1, "p", 0.0))
        if p <= 0:
            return None
        site, drop_path = _program_site(node, name, p, "module")
        at = _schema_index(op, "train")
        return ProgramSwitch(node.name, "argument", at if len(node.args) > at else "train", True, False, site=site,
                             drop_path=drop_path)
    at = _schema_index(op, "dropout_p")
    if at is not None:
        p = float(_node_arg(node, at, "dropout_p", 0.0) or 0.0)
        if p <= 0:
            return None
        site, drop_path = _program_site(node, name, p, "attention")
        return ProgramSwitch(node.name, "argument", at if len(node.args) > at else "dropout_p", p, 0.0, site=site,
                             drop_path=drop_path)
    expectation = {aten.bernoulli.p: aten.full_like.default, aten.bernoulli_.float: aten.fill_.Scalar}
    if op in expectation and isinstance(_node_arg(node, 1, "p", 0.5), float):
        keep = float(_node_arg(node, 1, "p", 0.5))
        site, drop_path = _program_site(node, "bernoulli", round(1.0 - keep, 12), "functional")
        return ProgramSwitch(node.name, "target", 0, op, expectation[op], ((keep,), (keep,)), site=site,
                             drop_path=drop_path)
    if op is aten.bernoulli.default:  # bernoulli(probabilities): its expectation is its input
        probs = node.args[0]
        keep = probs.args[1] if getattr(probs, "target", None) in (aten.full_like.default, aten.full.default) else None
        p = round(1.0 - keep, 12) if isinstance(keep, float) else float("nan")
        site, drop_path = _program_site(node, "bernoulli", p, "functional")
        return ProgramSwitch(node.name, "target", 0, op, aten.clone.default, site=site, drop_path=drop_path)
    if op in (aten.rand.default, aten.rand_like.default) and _floor_of_rand(node) is not None:
        floor, keep = _floor_of_rand(node)
        site, drop_path = _program_site(node, "rand", round(1.0 - keep, 12), "functional")
        fixed = aten.fill_.Scalar if floor.target is aten.floor_.default else aten.full_like.default
        return ProgramSwitch(floor.name, "target", 0, floor.target, fixed, ((), (keep,)), site=site, drop_path=drop_path)
    path, _ = _node_owner(node)
    return f"{name or op} (in {path or 'the top-level module'})"


def program_switches(graph) -> tuple[list[ProgramSwitch], list[str]]:
    """Every random op of a torch.export graph as a switch, and those that cannot be switched
    (ops tagged ``nondeterministic_seeded`` that draw and are not of the kinds above)."""
    switches, refused = [], []
    for node in graph.nodes:
        tags = getattr(node.target, "tags", ()) if node.op == "call_function" else ()
        if torch.Tag.nondeterministic_seeded not in tags:
            continue
        switch = _switch_of(node)
        if isinstance(switch, ProgramSwitch):
            switches.append(switch)
        elif switch is not None:
            refused.append(switch)
    return switches, refused


def program_sites(switches: list[ProgramSwitch], sample_drop_path: bool = False) -> list[DropoutSite]:
    """The sites of a program's switches, one per (module, kind), with the number of its ops."""
    sites: dict[tuple[str, str], DropoutSite] = {}
    for switch in switches:
        site = replace(switch.site, sampled=sample_drop_path or not switch.drop_path, calls=1)
        old = sites.get(site.key)
        sites[site.key] = replace(old, calls=old.calls + 1) if old else site
    return list(sites.values())


def program_running_stats(graph) -> int:
    """Turn every training-mode batch norm with running statistics of a torch.export graph into
    its eval form, which normalises with the running statistics and updates nothing; drop the
    updates of ``num_batches_tracked``. Returns the number of batch norms turned."""
    aten = torch.ops.aten
    turned = 0
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or "batch_norm" not in getattr(op, "_opname", "") or len(node.args) < 5 \
                or node.args[3] is None:
            continue
        if op in (aten.batch_norm.default, aten.native_batch_norm.default) and node.args[5] is True:
            node.update_arg(5, False)
        elif op in (aten._native_batch_norm_legit.default, aten._native_batch_norm_legit_functional.default) \
                and node.args[5] is True:
            _rewire_running_stats(node, 3)
            node.target, node.args = aten._native_batch_norm_legit_no_training.default, (*node.args[:5], *node.args[6:])
        elif op in (aten._batch_norm_with_update.default, aten._batch_norm_with_update_functional.default):
            _rewire_running_stats(node, 4)
            node.target = aten._batch_norm_no_update.default
        else:
            continue
        turned += 1
    for node in list(graph.nodes):  # updates of num_batches_tracked, and stats copied onto themselves
        if node.target in (aten.add_.Tensor, aten.copy_.default) and not node.users and (
                str(getattr(node.args[0], "target", "")).endswith("num_batches_tracked") or node.args[0] is node.args[1]):
            graph.erase_node(node)
    return turned


def _rewire_running_stats(node, first: int) -> None:
    """Uses of the updated running statistics (outputs ``first`` and ``first + 1`` of a
    functional batch norm) read the running statistics themselves."""
    import operator

    for user in list(node.users):
        if user.target is operator.getitem and user.args[1] in (first, first + 1):
            user.replace_all_uses_with(node.args[3 + user.args[1] - first])
            user.graph.erase_node(user)


# --------------------------------------------------------------------------- TorchScript graphs
# A TorchScript archive cannot be run under a TorchFunctionMode, but its graph can be read: the
# model's inlined graph holds every aten::dropout, feature_dropout, alpha_dropout, bernoulli_ and
# scaled_dot_product_attention call, each with the module hierarchy it was called from. Sites
# of modules that are sites themselves (Dropout, DropPath, ...) are reported by module already.
_SCRIPT_OPS = {"aten::dropout": ("F.dropout", 1, 2), "aten::feature_dropout": ("F.dropout2d", 1, 2),
               "aten::alpha_dropout": ("F.alpha_dropout", 1, 2), "aten::feature_alpha_dropout": ("F.feature_alpha_dropout", 1, 2),
               "aten::native_dropout": ("native_dropout", 1, 2), "aten::bernoulli_": ("bernoulli_", 1, None),
               "aten::scaled_dot_product_attention": ("scaled_dot_product_attention", 4, None)}
_HIERARCHY = re.compile(r"([^.()]+)\(([^()]*)\)")


def _script_owner(node) -> str:
    """The qualified name of the module a node of an inlined graph was called from ("" for the root)."""
    try:
        hierarchy = node.getModuleHierarchy()
    except Exception:  # noqa: BLE001 - nodes without a call stack belong to the root
        return ""
    return ".".join(name for name, _ in _HIERARCHY.findall(hierarchy) if name != "UNKNOWN_INSTANCE")


def _submodule(model: nn.Module, path: str) -> nn.Module:
    """``model.get_submodule(path)``, which ScriptModules do not support; the model if there is none."""
    return dict(model.named_modules()).get(path, model)


def _script_number(model: nn.Module, path: str, value, depth: int = 3) -> float | None:
    """The number a graph value holds, when it is a constant, a module attribute, or their difference."""
    node = value.node()
    if node.kind() == "prim::Constant":
        got = value.toIValue()
    elif node.kind() == "prim::GetAttr":
        got = getattr(_submodule(model, path), node.s("name"), None)
    elif node.kind() == "prim::If" and depth:  # ``p if self.training else 0.``: the value when sampling
        at = list(node.outputs()).index(value)
        branches = [_script_number(model, path, list(b.outputs())[at], depth - 1) for b in node.blocks()]
        got = max((b for b in branches if b is not None), default=None) if None not in branches else None
    elif node.kind() in ("aten::sub", "aten::rsub") and depth:
        a, b = (_script_number(model, path, v, depth - 1) for v in list(node.inputs())[:2])
        got = None if a is None or b is None else (a - b if node.kind() == "aten::sub" else b - a)
    else:
        got = None
    return float(got) if isinstance(got, (int, float)) and not isinstance(got, bool) else None


def script_sites(model: nn.Module, sample_drop_path: bool = False) -> list[DropoutSite]:
    """The functional and attention sites of a TorchScript model, read from its inlined graph.

    p is read from a constant or a module attribute (``self.drop_rate``); when it is computed
    otherwise it is reported as NaN (unknown). Calls whose training argument is the constant
    False (a model traced in eval mode) never drop units and are not sites.
    """
    try:
        graph = model.inlined_graph  # (held: the nodes live as long as the graph)
    except Exception:  # noqa: BLE001 - a module without a forward graph
        return []
    sites: dict[tuple[str, str], DropoutSite] = {}
    for kind, (name, p_at, train_at) in _SCRIPT_OPS.items():
        for node in graph.findAllNodes(kind):
            path = _script_owner(node)
            owner = _submodule(model, path)
            inputs = list(node.inputs())
            if _module_site(path, owner, sample_drop_path) or len(inputs) <= p_at or (
                    train_at is not None and inputs[train_at].node().kind() == "prim::Constant"
                    and inputs[train_at].toIValue() is False):
                continue
            p = _script_number(model, path, inputs[p_at])
            p = (None if p is None else 1.0 - p) if name == "bernoulli_" else p
            if p is not None and p <= 0:
                continue
            fixed_on = train_at is not None and inputs[train_at].node().kind() == "prim::Constant"  # (True)
            key = (path or "<root>", name + (" (fixed on)" if fixed_on else ""))
            old = sites.get(key)
            found_by = "attention" if "attention" in name else "functional"
            sites[key] = replace(old, calls=old.calls + 1) if old else DropoutSite(
                key[0], key[1], float("nan") if p is None else round(p, 12), found_by, 1)
    return list(sites.values())
