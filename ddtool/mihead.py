"""The MI head: MC dropout's epistemic uncertainty from one deterministic forward pass.

The distilled student q reproduces the MC-dropout mean p_bar(x) = E_sigma[p_sigma(x)] (Eq. 3),
hence the total predictive entropy H(p_bar). MC dropout splits that entropy into an aleatoric
and an epistemic part (the mutual information between the prediction and the masks):

    H(p_bar(x)) = E_sigma[H(p_sigma(x))] + MI(x),    MI(x) = H(E_sigma p_sigma) - E_sigma H(p_sigma) >= 0.

The split is not a function of p_bar alone, so the student cannot give it. The MI head is a tiny
regressor g on the student's own features that is distilled to predict MI(x):

    mi_hat(x) = s * softplus(W2 relu(W1 [z(x); q(x); H(q(x))] + b1) + b2)

with z(x) the standardised input of the student's output layer (the nn.Linear whose output is
the prediction, found by running the student once: :func:`feature_point`), q(x) the student's
class probabilities and s the mean training target (so the net regresses values near 1).

**Target.** With K masked passes p_1..p_K the plug-in estimate

    MI_K(x) = H(1/K sum_k p_k) - 1/K sum_k H(p_k)

is biased low: H is concave, so E[H(p_bar_K)] < H(p_bar). To second order around
mu = E[p_sigma] (H(p) ~ H(mu) + g'(p - mu) - 1/2 (p - mu)' A (p - mu), A = diag(1/mu)),
E[H(p_k)] ~ H(mu) - tr(A Sigma)/2 and E[H(p_bar_K)] ~ H(mu) - tr(A Sigma)/(2K), so

    E[MI_K] ~ (1 - 1/K) MI,    and    K/(K-1) MI_K is unbiased for MI to second order.

The head's target is that corrected estimate from :data:`MI_SAMPLES` = 16 masks per input: drawn
once per input, so it is cheap (16 teacher passes per input against the 120 of 30 epochs at
K = 4), and its noise does not matter to the minimiser: the loss is the squared error, a Bregman
divergence, so (as Theorem 1(ii) argues for the distillation target) an unbiased noisy target
has the same minimiser, the conditional mean E[MI | x]. A log or rank transform would change
that minimiser, so the squared error is taken on MI itself.

**The student is untouched.** The head is fitted after Algorithm 2 has finished, on the frozen
student's features (the features are computed without gradient), with its own random stream:
the student of a run with the head is bit-identical to the one without it. The head sees at
most :data:`MI_INPUTS` inputs of S, unperturbed; a tenth of them is held out and the epoch of
lowest held-out squared error is kept (:data:`HEAD_EPOCHS` of Adam). The head starts as the
constant predictor of the mean target (last layer zero), and that start counts as an epoch: the
kept head is never worse on the held-out inputs than a constant.

Scope: classifiers with (N, C) outputs whose prediction is an nn.Linear's output (conv nets,
MLPs, ViT-like image models ending in a linear head). Segmentation maps, regression outputs and
text models are refused (:class:`UsageError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import deterministic
from .errors import UsageError
from .mc import MCSampler
from .outputs import select_output

MI_SAMPLES = 16  # masks per input for the head's target (bias-corrected, see the module docstring)
MI_INPUTS = 20_000  # at most this many inputs of S train the head
HEAD_HIDDEN = 64  # hidden units of the head
HEAD_EPOCHS = 60  # Adam epochs over the cached features; the best held-out epoch is kept
HEAD_BATCH = 256
HEAD_LR = 1e-3
MI_OUTPUT = "mutual_information"  # the head's output name in exports and predictions
MI_ROWS = 4096  # stacked rows per pass when MC's mutual information is measured (evaluate)


def mutual_information(probs: torch.Tensor, corrected: bool = False) -> torch.Tensor:
    """MI_K per input from K sampled distributions ``probs`` of shape (K, N, C) (class axis last):
    H(mean_k p_k) - mean_k H(p_k); with ``corrected`` times K / (K - 1) (second-order unbiased)."""
    k = probs.shape[0]
    mean = probs.mean(0)
    mi = _entropy(mean) - _entropy(probs).mean(0)
    mi = mi.clamp_min(0)  # >= 0 by Jensen; rounding can leave -1e-8
    return mi * (k / (k - 1)) if corrected and k > 1 else mi


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -torch.xlogy(p, p).sum(-1)


class MIHead(nn.Module):
    """mi_hat = s * softplus(MLP([standardised features; probabilities; entropy])) (module docstring)."""

    def __init__(self, in_features: int, classes: int, hidden: int = HEAD_HIDDEN):
        super().__init__()
        self.in_features, self.classes, self.hidden = in_features, classes, hidden
        self.register_buffer("feature_mean", torch.zeros(in_features))
        self.register_buffer("feature_scale", torch.ones(in_features))
        self.register_buffer("target_scale", torch.ones(()))
        self.net = nn.Sequential(nn.Linear(in_features + classes + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        z = (features.flatten(1).float() - self.feature_mean) / self.feature_scale
        log_q = F.log_softmax(logits.float(), dim=1)
        q = log_q.exp()
        h = -(q * log_q).sum(1, keepdim=True)
        return F.softplus(self.net(torch.cat([z, q, h], dim=1))).squeeze(1) * self.target_scale

    def spec(self) -> dict:
        return {"in_features": self.in_features, "classes": self.classes, "hidden": self.hidden}


@torch.no_grad()
def feature_point(model: nn.Module, example: torch.Tensor, select=None) -> str:
    """The name of the nn.Linear submodule of ``model`` whose output is its prediction (the last
    one called that returns exactly the prediction); a :class:`UsageError` if there is none."""
    calls: list[tuple[str, torch.Tensor]] = []
    hooks = [m.register_forward_hook(lambda _m, _i, out, name=name: calls.append((name, out)))
             for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    try:
        with deterministic(model):
            out = select_output(model(example), select)
    finally:
        for h in hooks:
            h.remove()
    if out.dim() != 2:
        raise UsageError(f"--mi-head needs a classifier with (N, C) outputs; this model returns shape {tuple(out.shape)}")
    for name, value in reversed(calls):
        if isinstance(value, torch.Tensor) and value.shape == out.shape and torch.equal(value, out):
            return name
    raise UsageError("--mi-head needs the model's prediction to be the output of an nn.Linear layer (the head reads "
                     "that layer's input); none of this model's modules produces it")


class WithMI(nn.Module):
    """``student`` and its MI head as one module: x -> (prediction, mi_hat), for prediction and
    export. A forward pre-hook, present during the call only, keeps the input of the feature layer
    ``feature``."""

    def __init__(self, student: nn.Module, head: MIHead, feature: str, select=None):
        super().__init__()
        self.student, self.head, self.feature, self.select = student, head, feature, select
        try:
            layer = student.get_submodule(feature)
        except AttributeError:
            layer = None
        if not isinstance(layer, nn.Linear):
            raise UsageError(f"the MI head reads the input of the student's layer {feature!r}, which this model does not "
                             "have as an nn.Linear: load the bundle with the --arch it was distilled with")

    def forward(self, x):
        kept = []
        handle = self.student.get_submodule(self.feature).register_forward_pre_hook(lambda _m, args: kept.append(args[0]))
        try:
            out = select_output(self.student(x), self.select)
        finally:
            handle.remove()
        return out, self.head(kept[-1], out)


@dataclass
class HeadFit:
    """A fitted head, where it reads, and how well it fits its held-out inputs."""

    head: MIHead
    feature: str
    held_out_mse: float
    constant_mse: float  # the held-out squared error of predicting the mean training target
    inputs: int
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"feature": self.feature, "held_out_mse": self.held_out_mse, "constant_mse": self.constant_mse,
                "inputs": self.inputs, "mi_samples": MI_SAMPLES, "seconds": round(self.seconds, 3), **self.head.spec()}


@torch.no_grad()
def head_data(student: nn.Module, sampler, batches, feature: str, select=None):
    """Per input: the student's features at ``feature`` and its prediction, and the corrected
    MI_K target from ``MI_SAMPLES`` masked teacher passes (``sampler``, a :class:`ddtool.mc.MCSampler`)."""
    kept: dict[str, torch.Tensor] = {}
    layer = student.get_submodule(feature)
    handle = layer.register_forward_pre_hook(lambda _m, args: kept.__setitem__("z", args[0]))
    feats, logits, targets = [], [], []
    try:
        with deterministic(student):
            for x in batches:
                out = select_output(student(x), select)
                feats.append(kept["z"].flatten(1).float().cpu())
                logits.append(out.float().cpu())
                probs = F.softmax(sampler.outputs(x, MI_SAMPLES).float(), dim=-1)
                targets.append(mutual_information(probs, corrected=True).cpu())
    finally:
        handle.remove()
    return torch.cat(feats), torch.cat(logits), torch.cat(targets)


def fit_head(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor, feature: str, seed: int) -> HeadFit:
    """Fit an :class:`MIHead` by squared error on (features, logits) -> targets; a tenth held
    out, the best held-out epoch kept (see the module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    n = targets.shape[0]
    order = torch.randperm(n, generator=gen)
    n_val = max(1, n // 10) if n > 1 else 0
    val, train = order[:n_val], order[n_val:] if n > 1 else order
    head = MIHead(features.shape[1], logits.shape[1])
    head.feature_mean.copy_(features[train].mean(0))
    head.feature_scale.copy_(features[train].std(0, unbiased=False).clamp_min(1e-6))
    head.target_scale.copy_(targets[train].mean().clamp_min(1e-8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head.net.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    with torch.no_grad():  # start as the constant predictor s * softplus(log(e - 1)) = s, the mean target
        head.net[2].weight.zero_()
        head.net[2].bias.fill_(math.log(math.expm1(1.0)))
    opt = torch.optim.Adam(head.net.parameters(), lr=HEAD_LR)
    best = _mse(head, features[val], logits[val], targets[val]) if n_val else math.inf
    best_state = {k: v.clone() for k, v in head.state_dict().items()}
    for _ in range(HEAD_EPOCHS):
        for idx in train[torch.randperm(len(train), generator=gen)].split(HEAD_BATCH):
            loss = F.mse_loss(head(features[idx], logits[idx]), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        mse = _mse(head, features[val], logits[val], targets[val]) if n_val else 0.0
        if mse < best:
            best, best_state = mse, {k: v.clone() for k, v in head.state_dict().items()}
    head.load_state_dict(best_state)
    constant = F.mse_loss(torch.full_like(targets[val], float(targets[train].mean())), targets[val]).item() if n_val else 0.0
    return HeadFit(head.eval().requires_grad_(False), feature, best, constant, n)


@torch.no_grad()
def _mse(head: MIHead, features, logits, targets) -> float:
    return F.mse_loss(head(features, logits), targets).item()


# --------------------------------------------------------------------------- the bundle's field
def head_field(fit: HeadFit, output: str | int | None = None) -> dict:
    """The MI head as a bundle field: plain tensors, strings and numbers (see ddtool.checkpoint);
    ``output`` is the student's output the head reads (``--output``)."""
    return {**fit.head.spec(), "feature": fit.feature, "output": output,
            "state_dict": {k: v.detach().cpu().clone() for k, v in fit.head.state_dict().items()},
            "fit": {k: v for k, v in fit.as_dict().items() if k not in ("feature", *fit.head.spec())}}


def valid_head_field(field: object) -> bool:
    """Whether ``field`` has the types :func:`head_field` writes (a bundle is a file like any other)."""
    if not isinstance(field, dict) or not isinstance(field.get("feature"), str):
        return False
    sizes = [field.get(k) for k in ("in_features", "classes", "hidden")]
    state = field.get("state_dict")
    program = field.get("program")
    return (all(isinstance(n, int) and 0 < n <= 1 << 24 for n in sizes) and isinstance(state, dict)
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
            and (program is None or isinstance(program, torch.Tensor) and program.dtype == torch.uint8)
            and isinstance(field.get("output"), (str, int, type(None))))


def head_from_field(field: dict) -> MIHead:
    """The :class:`MIHead` a bundle field holds; a mismatch is a damaged bundle (ValueError)."""
    head = MIHead(field["in_features"], field["classes"], field["hidden"])
    try:
        head.load_state_dict(field["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"the bundle's MI head does not fit its sizes: {str(err).splitlines()[0]}") from None
    return head.eval().requires_grad_(False)


def with_mi(model: nn.Module, field: dict, select=None) -> nn.Module:
    """``model`` (a bundle's student) and the bundle's MI head as one module x -> (prediction, mi_hat):
    the code-free program of both that a bundle loaded without its architecture carries
    (``field["module"]``, see ddtool.checkpoint), or the head attached to ``model``."""
    if field.get("module") is not None:
        return field["module"].eval()
    output = select if select is not None else field.get("output")
    return WithMI(model, head_from_field(field), field["feature"], output).eval()


# --------------------------------------------------------------------------- measuring
@torch.no_grad()
def mc_mutual_information(model: nn.Module, x: torch.Tensor, samples: int, select=None, plan=None,
                          sample_drop_path: bool = False) -> torch.Tensor:
    """MC dropout's MI_m per input of ``x`` from ``samples`` masks: the plug-in estimate (not
    corrected), the number MC dropout itself reports. Masks come from torch's generator."""
    sampler = MCSampler(model, x[:2], select=select, sample_drop_path=sample_drop_path, plan=plan)
    chunks = x.split(max(1, MI_ROWS // samples))
    return torch.cat([mutual_information(F.softmax(sampler.outputs(c, samples).float(), dim=-1)) for c in chunks])


@torch.no_grad()
def head_values(both: nn.Module, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The MI head's value per input of ``x``, from a module x -> (prediction, mi_hat) (:func:`with_mi`)."""
    return torch.cat([both(chunk)[1].float() for chunk in x.split(batch_size)])
