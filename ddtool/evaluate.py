"""Standard dropout vs MC dropout vs distilled models: predictions, metrics and their cost.

For every method the predictive distribution on each input is computed, then compared with
the labels when the folder has them and always with the MC average p_mc (Eq. 4 with m
samples), the reference a distilled model is trained to approach:

    error      = mean_i [argmax q(x_i) != y_i]
    KL to MC   = mean_i sum_c p_mc,c(x_i) (log p_mc,c(x_i) - log q_c(x_i))
    agreement  = mean_i [argmax q(x_i) == argmax p_mc(x_i)]

Time is the wall-clock time of the whole pass divided by the number of inputs, at the same
batch size for every method; MC dropout pays m forward passes per input.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Inputs, Preprocess
from .distill import probe
from .dropout import deterministic, mc_average, require_dropout
from .outputs import select_output


@dataclass
class MethodResult:
    """The metrics of one inference method on one folder."""

    method: str
    error: float | None  # share of wrong top-1 predictions; None without labels
    kl_to_mc: float | None  # mean KL(p_mc || q) in nats; None for the MC reference itself
    agreement: float | None  # share of inputs whose top-1 class equals the MC average's
    ms_per_input: float
    forward_passes: int  # per input


@dataclass
class EvalReport:
    """All methods on one folder."""

    inputs: int
    labelled: bool
    mc_samples: int
    results: list[MethodResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def predict_probs(
    model: nn.Module, x: torch.Tensor, batch_size: int, mc_samples: int = 0, select=None, sample_drop_path: bool = False,
) -> tuple[torch.Tensor, float]:
    """Class probabilities of ``model`` on normalised inputs, and the seconds the pass took.

    ``mc_samples=0`` runs the model deterministically (standard dropout); ``m > 0`` averages the
    softmax of ``m`` masked passes (MC dropout).
    """
    def softmax(out):
        return F.softmax(select_output(out, select).float(), dim=1)

    probs = []
    start = time.perf_counter()
    with deterministic(model):
        for chunk in x.split(batch_size):
            if mc_samples:
                probs.append(mc_average(model, chunk, mc_samples, softmax, sample_drop_path))
            else:
                probs.append(softmax(model(chunk)))
    return torch.cat(probs), time.perf_counter() - start


def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-row KL(p || q) of two (N, C) probability tables, in nats."""
    p = p.clamp_min(0)
    return (p * (p.clamp_min(eps).log() - q.clamp_min(eps).log())).sum(dim=1)


def _result(method, probs, ref, labels, seconds, n, passes) -> MethodResult:
    pred = probs.argmax(dim=1)
    return MethodResult(
        method=method,
        error=None if labels is None else (pred != labels).float().mean().item(),
        kl_to_mc=None if ref is None else kl_divergence(ref, probs).mean().item(),
        agreement=None if ref is None else (pred == ref.argmax(dim=1)).float().mean().item(),
        ms_per_input=1000 * seconds / n,
        forward_passes=passes,
    )


def evaluate(
    teacher: nn.Module,
    inputs: Inputs,
    preprocess: Preprocess,
    distilled: dict[str, nn.Module] | None = None,
    mc_samples: int = 100,
    batch_size: int = 256,
    seed: int = 0,
    select: str | int | None = None,
    sample_drop_path: bool = False,
) -> EvalReport:
    """Compare the teacher's standard and MC dropout with each model of ``distilled`` on ``inputs``.

    ``select`` picks the prediction among the models' outputs (default: logits / first tensor).
    """
    x = preprocess.prepare(inputs.x)
    for model in [teacher, *(distilled or {}).values()]:
        probe(model, x[:2], select)
    require_dropout(teacher, x[:2], sample_drop_path, select)
    n, labels = len(inputs), inputs.labels
    report = EvalReport(inputs=n, labelled=labels is not None, mc_samples=mc_samples)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mc, mc_seconds = predict_probs(teacher, x, batch_size, mc_samples, select, sample_drop_path)
    for name, model in {"standard": teacher, **(distilled or {})}.items():
        probs, seconds = predict_probs(model, x, batch_size, select=select)
        report.results.append(_result(name, probs, mc, labels, seconds, n, 1))
    # The reference row goes second: standard, MC, then the distilled models.
    report.results.insert(1, _result(f"mc-{mc_samples}", mc, None, labels, mc_seconds, n, mc_samples))
    return report
