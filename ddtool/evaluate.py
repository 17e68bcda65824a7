"""Standard dropout vs MC dropout vs distilled models: predictions, metrics and their cost.

For every method the predictive distribution q(x) on each input is computed, then compared with
the labels y when the folder has them, and always with the MC average p_mc (Eq. 4 with m
samples), the reference a distilled model is trained to approach:

    error      = mean_i [argmax q(x_i) != y_i]
    NLL        = -mean_i log q_{y_i}(x_i)
    ECE        = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|      (15 equal-width confidence bins)
    KL to MC   = mean_i sum_c p_mc,c(x_i) (log p_mc,c(x_i) - log q_c(x_i))
    agreement  = mean_i [argmax q(x_i) == argmax p_mc(x_i)]

Cost is measured, not estimated: latency is the median wall time of one input (batch 1; for MC
dropout, its m masked passes stacked in one batch), throughput is inputs per second over the
whole folder at batch 256, and parameters are counted. With ``repeats`` > 1 the MC reference is
drawn again with a new seed each time and every number is reported as mean and standard
deviation over the repeats.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .data import Inputs, Preprocess, class_labels
from .distill import probe
from .dropout import deterministic, mc_mode, require_dropout
from .errors import ModelError
from .outputs import select_output

ECE_BINS = 15
#: Rows per stacked MC forward pass: bigger batches only cost memory traffic on the CPU (measured
#: on the sample net: 2,300 masked passes/s at 256 rows, 1,600 at 4,096).
MC_ROWS = 256


@dataclass
class MethodResult:
    """The metrics of one inference method on one folder (means over repeats)."""

    method: str
    error: float | None = None  # share of wrong top-1 predictions; None without labels
    nll: float | None = None  # nats
    ece: float | None = None
    kl_to_mc: float | None = None  # mean KL(p_mc || q) in nats; None for the MC reference itself
    agreement: float | None = None  # share of inputs whose top-1 class equals the MC average's
    latency_ms: float = 0.0  # one input at batch 1, median
    throughput: float = 0.0  # inputs per second at batch 256
    parameters: int = 0
    forward_passes: int = 1  # per input
    std: dict = field(default_factory=dict)  # standard deviation over repeats, per metric
    reliability: list = field(default_factory=list)  # (confidence, accuracy, count) per bin


@dataclass
class EvalReport:
    """All methods on one folder."""

    inputs: int
    labelled: bool
    mc_samples: int
    repeats: int = 1
    results: list[MethodResult] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# --------------------------------------------------------------------------- predictions
def mc_sampler(model: nn.Module, example: torch.Tensor, select=None, sample_drop_path: bool = False):
    """The distillation engine's teacher sampler, reused for MC dropout: m masks per input in
    stacked batches, the deterministic prefix before the first dropout site computed once."""
    from .distill import DistillConfig, TeacherSampler

    with mc_mode(model, sample_drop_path):
        return TeacherSampler(model, DistillConfig(teacher_samples=2, output=select, sample_drop_path=sample_drop_path), example)


@torch.no_grad()
def mc_probs(model: nn.Module, x: torch.Tensor, samples: int, select=None, sample_drop_path: bool = False,
             sampler=None) -> torch.Tensor:
    """MC dropout: the mean softmax of ``samples`` masked passes, copies stacked into big batches."""
    sampler = sampler or mc_sampler(model, x[:2], select, sample_drop_path)
    per_pass = max(1, MC_ROWS // max(1, x.shape[0]))
    total, left = 0.0, samples
    with mc_mode(model, sample_drop_path):
        while left:
            k = min(per_pass, left)
            total = total + sampler.target(x, k) * k
            left -= k
    return total / samples


@torch.no_grad()
def predict_probs(
    model: nn.Module, x: torch.Tensor, batch_size: int, mc_samples: int = 0, select=None, sample_drop_path: bool = False,
) -> tuple[torch.Tensor, float]:
    """Class probabilities of ``model`` on prepared inputs, and the seconds the pass took.

    ``mc_samples=0`` runs the model deterministically (standard dropout); ``m > 0`` averages the
    softmax of ``m`` masked passes (MC dropout).
    """
    probs = []
    sampler = mc_sampler(model, x[:2], select, sample_drop_path) if mc_samples else None
    start = time.perf_counter()
    with deterministic(model):
        for chunk in x.split(batch_size):
            if mc_samples:
                probs.append(mc_probs(model, chunk, mc_samples, select, sample_drop_path, sampler))
            else:
                probs.append(F.softmax(select_output(model(chunk), select).float(), dim=1))
    return torch.cat(probs), time.perf_counter() - start


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, mc_samples: int = 0, select=None, runs: int = 30) -> float:
    """Median milliseconds to predict one input (after a warm-up), over ``runs`` inputs."""
    singles = [x[i % x.shape[0]: i % x.shape[0] + 1] for i in range(runs + 3)]
    sampler = mc_sampler(model, x[:2], select) if mc_samples else None
    times = []
    with deterministic(model):
        for i, one in enumerate(singles):
            start = time.perf_counter()
            if mc_samples:
                mc_probs(model, one, mc_samples, select, sampler=sampler)
            else:
                select_output(model(one), select)
            if i >= 3:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


# --------------------------------------------------------------------------- metrics
def kl_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-row KL(p || q) of two (N, C) probability tables, in nats."""
    p = p.clamp_min(0)
    return (torch.xlogy(p, p) - p * q.clamp_min(eps).log()).sum(dim=1)


def calibration(probs: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> tuple[float, list]:
    """Expected calibration error and the reliability diagram's (confidence, accuracy, count) bins."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    ece, table = 0.0, []
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi) if lo > 0 else (conf >= lo) & (conf <= hi)
        count = int(inside.sum())
        if count:
            acc, mean_conf = correct[inside].mean().item(), conf[inside].mean().item()
            ece += count / len(conf) * abs(acc - mean_conf)
            table.append((round(mean_conf, 4), round(acc, 4), count))
    return ece, table


def metrics(probs: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None) -> dict:
    """The quality metrics of one method's probabilities (see the module docstring)."""
    out: dict = {}
    if labels is not None:
        out["error"] = (probs.argmax(1) != labels).float().mean().item()
        out["nll"] = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
        out["ece"], out["reliability"] = calibration(probs, labels)
    if ref is not None:
        out["kl_to_mc"] = kl_divergence(ref, probs).mean().item()
        out["agreement"] = (probs.argmax(1) == ref.argmax(1)).float().mean().item()
    return out


def _summarise(method: str, runs: list[dict], params: int, passes: int) -> MethodResult:
    result = MethodResult(method=method, parameters=params, forward_passes=passes)
    for key in ("error", "nll", "ece", "kl_to_mc", "agreement", "latency_ms", "throughput"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            setattr(result, key, statistics.fmean(values))
            result.std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    result.reliability = runs[0].get("reliability", [])
    return result


@contextlib.contextmanager
def fast_layout(models: list[nn.Module], x: torch.Tensor):
    """channels_last for conv models on image batches (see ``distill.uses_channels_last``), for
    the duration of the block; the models get their usual layout back afterwards."""
    from .distill import uses_channels_last

    if not all(uses_channels_last(m, x) for m in models):
        yield x
        return
    for m in models:
        m.to(memory_format=torch.channels_last)
    try:
        yield x.contiguous(memory_format=torch.channels_last)
    finally:
        for m in models:
            m.to(memory_format=torch.contiguous_format)


def _require_finite(probs: torch.Tensor, method: str) -> None:
    """A method whose predictions hold NaN has no metrics: say so instead of a table of NaN."""
    bad = int((~torch.isfinite(probs)).any(dim=1).sum())
    if bad:
        raise ModelError(f"{method} gives NaN or infinite outputs on {bad} of {probs.shape[0]} inputs; "
                         "its weights or the inputs hold values out of range")


# --------------------------------------------------------------------------- the comparison
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
    repeats: int = 1,
    timing: bool = True,
    classes: list[str] | None = None,
) -> EvalReport:
    """Compare the teacher's standard and MC dropout with each model of ``distilled`` on ``inputs``.

    ``select`` picks the prediction among the models' outputs (default: logits / first tensor).
    ``timing=False`` skips the batch-1 latency runs (for quick checks). ``classes`` are the
    models' class names in output order: class subfolders are matched to them by name (see
    ``ddtool.data.class_labels``).
    """
    from .limits import require

    require(inputs.x.numel() * 4, f"the {len(inputs):,} inputs as floats", "evaluate on fewer inputs or a smaller --size")
    x = preprocess.prepare(inputs.x)
    models = {"standard": teacher, **(distilled or {})}
    outputs = {name: probe(model, x[:2], select) for name, model in models.items()}
    require_dropout(teacher, x[:2], sample_drop_path, select)
    widths = {tuple(o.shape[1:]) for o in outputs.values()}
    if len(widths) > 1:
        raise ModelError(f"the models give outputs of different shapes ({', '.join(str(list(w)) for w in sorted(widths))})")
    labels = class_labels(inputs, classes, outputs["standard"].shape[1]) if outputs["standard"].dim() > 1 else inputs.labels
    runs: dict[str, list[dict]] = {name: [] for name in [*models, "mc"]}
    deterministic_probs = {}
    with fast_layout(list(models.values()), x) as x:
        for name, model in models.items():
            probs, seconds = predict_probs(model, x, batch_size, select=select)
            _require_finite(probs, name)
            deterministic_probs[name] = probs
            runs[name].append({"throughput": len(x) / seconds,
                               "latency_ms": latency_ms(model, x, select=select) if timing else None})
        for r in range(repeats):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + r)
                mc, seconds = predict_probs(teacher, x, batch_size, mc_samples, select, sample_drop_path)
                _require_finite(mc, f"mc-{mc_samples}")
                mc_latency = latency_ms(teacher, x, mc_samples, select, runs=10) if timing and r == 0 else None
            runs["mc"].append({**metrics(mc, None, labels), "throughput": len(x) / seconds, "latency_ms": mc_latency})
            for name, probs in deterministic_probs.items():
                entry = metrics(probs, mc, labels)
                if r == 0:
                    runs[name][0].update(entry)
                else:
                    runs[name].append(entry)
    report = EvalReport(inputs=len(x), labelled=labels is not None, mc_samples=mc_samples, repeats=repeats)
    count = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    report.results.append(_summarise("standard", runs["standard"], count["standard"], 1))
    report.results.append(_summarise(f"mc-{mc_samples}", runs["mc"], count["standard"], mc_samples))
    for name in distilled or {}:
        report.results.append(_summarise(name, runs[name], count[name], 1))
    return report


def plot(report: EvalReport, path, force: bool = False) -> None:
    """A PNG: each method's error (or KL to MC, without labels) with its std over repeats as
    error bars, and the reliability diagram of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import to_bytes, write_bytes

    key, label = ("error", "test error (%)") if report.labelled else ("kl_to_mc", "KL to MC average (nats)")
    scale = 100 if key == "error" else 1
    rows = [r for r in report.results if getattr(r, key) is not None]
    fig, axes = plt.subplots(1, 2 if report.labelled else 1, figsize=(11 if report.labelled else 6, 4.2), squeeze=False)
    ax = axes[0][0]
    ax.bar([r.method for r in rows], [scale * getattr(r, key) for r in rows],
           yerr=[scale * r.std.get(key, 0.0) for r in rows], capsize=6, color="#4C72B0")
    ax.set_ylabel(label)
    low = min(scale * getattr(r, key) for r in rows)
    ax.set_ylim(bottom=max(0.0, 0.9 * low))
    ax.set_title(f"{report.inputs} inputs, MC m={report.mc_samples}, {report.repeats} repeat(s)")
    if report.labelled:
        ax = axes[0][1]
        ax.plot([0, 1], [0, 1], "k:", lw=1, label="perfect calibration")
        for r in report.results:
            if r.reliability:
                conf, acc, _ = zip(*r.reliability)
                ax.plot(conf, acc, "o-", ms=3, label=f"{r.method} (ECE {100 * r.ece:.2f}%)")
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.set_title("reliability diagram")
        ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        data = to_bytes(lambda buffer: fig.savefig(buffer, format="png", dpi=110))
    finally:
        plt.close(fig)
    write_bytes(path, data, force)
