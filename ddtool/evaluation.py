"""Standard dropout vs MC dropout vs distilled models: predictions, metrics and their cost.

For every method the predictive distribution q(x) on each input is computed, then compared with
the labels y when the folder has them, and always with the MC average p_mc (Eq. 4 with m
samples), the reference a distilled model is trained to approach:

    error      = mean_i [argmax q(x_i) != y_i]
    NLL        = -mean_i log q_{y_i}(x_i)
    ECE        = sum_b |B_b|/n * |acc(B_b) - conf(B_b)|      (15 equal-width confidence bins)
    KL to MC   = mean_i sum_c p_mc,c(x_i) (log p_mc,c(x_i) - log q_c(x_i))
    agreement  = mean_i [argmax q(x_i) == argmax p_mc(x_i)]

and how well each method's uncertainty ranks inputs, by its predictive entropy
H(q(x)) = -sum_c q_c(x) log q_c(x) (for MC dropout, of the MC average):

    misclassification AUROC = P(H(q(x_wrong)) > H(q(x_right)))   (labels needed)
    OOD AUROC               = P(H(q(x_ood))   > H(q(x_in)))       (given a folder of other inputs)

the rank (Mann-Whitney) form of the area under the ROC curve, ties counted one half: 1 is a
perfect ranking, 0.5 chance. A distilled bundle with an MI head (``distill --mi-head``) is also
compared with MC dropout's epistemic part, its mutual information over the m masks,

    MI_m(x) = H(1/m sum_k p_k(x)) - 1/m sum_k H(p_k(x)),

by Pearson's and Spearman's correlation of the head's one-pass MI with MI_m over the inputs, and
by the OOD AUROC of each (see :func:`_mi_columns`).

A model whose output is not a distribution (an embedding: ``regression``) is compared with the
MC-average output f_mc instead, row by row (a row is an input's embedding, or one token's):

    MSE to MC     = mean_i mean_d (f_d(x_i) - f_mc,d(x_i))^2
    cosine to MC  = mean_i <f(x_i), f_mc(x_i)> / (|f(x_i)| |f_mc(x_i)|)   (rows with f_mc != 0)

The labelled check of ``ddtool distill --check DIR`` (:func:`check_labels`, :func:`check_student`)
compares two of these errors on a labelled folder, standard dropout's (the teacher run
deterministically) and the distilled student's, and keeps the student unless

    error(student) > error(standard)

(ties keep the student): on a teacher whose MC average is worse than standard dropout, the
student, which learns that average, is worse too, and no label-free rule can tell.

Cost is measured, not estimated: latency is the median wall time of one input (batch 1; for MC
dropout, its m masked passes stacked in one batch), throughput is inputs per second over the
whole folder at batch 256, and parameters are counted. With ``repeats`` > 1 the MC reference is
drawn again with a new seed each time and every number is reported as mean and standard
deviation over the repeats.
"""

from __future__ import annotations

import functools
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from .data import Inputs, Preprocess, class_labels
from .dropout import MCPlan, check_dropout, deterministic
from .errors import DataError, ModelError, UsageError
from .files import to_bytes, write_bytes
from .limits import check_forward, require
from .mc import MC_ROWS, MCSampler, probabilities
from .mihead import head_values, mc_mutual_information
from .model import count_parameters, fast_layout, probe
from .outputs import check_class_dim, select_output

ECE_BINS = 15


@dataclass
class MethodResult:
    """The metrics of one inference method on one folder (means over repeats)."""

    method: str
    error: float | None = None  # share of wrong top-1 predictions; None without labels
    nll: float | None = None  # nats
    ece: float | None = None
    kl_to_mc: float | None = None  # mean KL(p_mc || q) in nats; None for the MC reference itself
    auroc_error: float | None = None  # predictive entropy separating wrong from right predictions
    auroc_ood: float | None = None  # predictive entropy separating the OOD inputs from these
    agreement: float | None = None  # share of inputs whose top-1 class equals the MC average's
    mse_to_mc: float | None = None  # embeddings: mean squared difference to the MC-average output
    cosine_to_mc: float | None = None  # embeddings: mean cosine similarity to the MC-average output
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
    ood_inputs: int = 0  # inputs of the out-of-distribution folder (0: none given)
    positions: int = 1  # output positions per input compared (1 for a classifier)
    results: list[MethodResult] = field(default_factory=list)
    unused: list[dict] = field(default_factory=list)  # entries of the folder not used, with the reason
    notes: list[dict] = field(default_factory=list)  # inputs used only in part (an animation's first frame)
    mutual_information: dict = field(default_factory=dict)  # per distilled model with an MI head (see _mi_columns)

    def as_dict(self) -> dict:
        out = asdict(self)
        if not self.mutual_information:  # no MI head: the report as before
            del out["mutual_information"]
        return out


# --------------------------------------------------------------------------- predictions
def as_rows(probs: torch.Tensor, class_dim: int = 1) -> torch.Tensor:
    """(N, ..., C, ...) probabilities as (N * P, C): one row per input and output position
    (P = 1 for a classifier's (N, C) output), the rows of one input next to each other."""
    moved = probs.movedim(class_dim, -1)
    return moved.reshape(-1, moved.shape[-1])


@torch.no_grad()
def predict_probs(
    model: nn.Module, x: torch.Tensor, batch_size: int, mc_samples: int = 0, select=None, sample_drop_path: bool = False,
    plan: MCPlan | None = None, class_dim: int = 1, regression: bool = False,
) -> tuple[torch.Tensor, float]:
    """Class probabilities of ``model`` on prepared inputs, as rows (see :func:`as_rows`), and
    the seconds the pass took.

    ``mc_samples=0`` runs the model deterministically (standard dropout); ``m > 0`` averages the
    softmax of ``m`` masked passes (MC dropout), stacked into batches of about ``MC_ROWS`` rows.
    ``plan`` is the model's :class:`ddtool.dropout.MCPlan`, if it is known already. With
    ``regression`` the outputs themselves are averaged and returned, not probabilities.
    """
    probs, to_probs = [], (_as_float if regression else functools.partial(probabilities, dim=class_dim))
    sampler = MCSampler(model, x[:2], select=select, sample_drop_path=sample_drop_path, plan=plan) if mc_samples else None
    start = time.perf_counter()
    with deterministic(model):
        for chunk in x.split(batch_size):
            if sampler:
                probs.append(sampler.mean(chunk, mc_samples, to_probs, rows=MC_ROWS))
            else:
                probs.append(to_probs(select_output(model(chunk), select)))
    return as_rows(torch.cat(probs), class_dim), time.perf_counter() - start


def _as_float(out: torch.Tensor) -> torch.Tensor:
    return out.float()


@torch.no_grad()
def latency_ms(model: nn.Module, x: torch.Tensor, mc_samples: int = 0, select=None, runs: int = 30,
               sample_drop_path: bool = False, plan: MCPlan | None = None) -> float:
    """Median milliseconds to predict one input (after a warm-up), over ``runs`` inputs."""
    singles = [x[i % x.shape[0]: i % x.shape[0] + 1] for i in range(runs + 3)]
    sampler = MCSampler(model, x[:2], select=select, sample_drop_path=sample_drop_path, plan=plan) if mc_samples else None
    times = []
    with deterministic(model):
        for i, one in enumerate(singles):
            start = time.perf_counter()
            if sampler:
                sampler.mean(one, mc_samples, probabilities, rows=MC_ROWS)
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


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Per-row predictive entropy H(q) = -sum_c q_c log q_c of an (N, C) table, in nats."""
    p = probs.double().clamp_min(0)
    return -torch.xlogy(p, p).sum(dim=1)


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float | None:
    """Area under the ROC curve of ``scores`` for telling ``positive`` rows from the others,
    in its rank (Mann-Whitney U) form:

        AUROC = (sum_{i positive} r_i - n_pos (n_pos + 1) / 2) / (n_pos * n_neg)

    with r_i the rank of score i among all (1 = lowest), tied scores sharing their average
    rank (a tie between a positive and a negative counts one half). None when either side is
    empty."""
    positive = positive.bool().flatten()
    n_pos = int(positive.sum())
    n_neg = positive.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _ranks(scores)
    return ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` (1 = lowest), tied scores sharing their average rank."""
    _, inverse, counts = torch.unique(scores.double().flatten(), return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()  # rank of the last member of each group of equal scores
    return (last - (counts.double() - 1) / 2)[inverse]


def pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Pearson's correlation cov(a, b) / (sd(a) sd(b)) of two score vectors; None if one is constant."""
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    norm = a.norm() * b.norm()
    return (a @ b / norm).item() if norm > 0 else None


def spearman(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Spearman's rank correlation: Pearson's of the average ranks (ties share their rank)."""
    return pearson(_ranks(a), _ranks(b))


def metrics(probs: torch.Tensor, ref: torch.Tensor | None, labels: torch.Tensor | None, regression: bool = False,
            ood: torch.Tensor | None = None) -> dict:
    """The quality metrics of one method's probabilities, or of its outputs with ``regression``
    (see the module docstring); ``ood`` are the same method's probabilities on
    out-of-distribution inputs."""
    out: dict = {}
    if regression:
        if ref is not None:
            out["mse_to_mc"] = (probs - ref).pow(2).mean().item()
            real = ref.norm(dim=1) > 0  # (padded token positions are zero in both)
            out["cosine_to_mc"] = torch.nn.functional.cosine_similarity(probs[real], ref[real], dim=1).mean().item()
        return out
    if labels is not None:
        wrong = probs.argmax(1) != labels
        out["error"] = wrong.float().mean().item()
        out["nll"] = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
        out["ece"], out["reliability"] = calibration(probs, labels)
        out["auroc_error"] = auroc(entropy(probs), wrong)
    if ref is not None:
        out["kl_to_mc"] = kl_divergence(ref, probs).mean().item()
        out["agreement"] = (probs.argmax(1) == ref.argmax(1)).float().mean().item()
    if ood is not None:
        out["auroc_ood"] = auroc(torch.cat([entropy(probs), entropy(ood)]),
                                 torch.arange(len(probs) + len(ood)) >= len(probs))
    return out


def _summarise(method: str, runs: list[dict], params: int, passes: int) -> MethodResult:
    result = MethodResult(method=method, parameters=params, forward_passes=passes)
    for key in ("error", "nll", "ece", "kl_to_mc", "agreement", "mse_to_mc", "cosine_to_mc", "auroc_error", "auroc_ood",
                "latency_ms", "throughput"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            setattr(result, key, statistics.fmean(values))
            result.std[key] = statistics.stdev(values) if len(values) > 1 else 0.0
    result.reliability = runs[0].get("reliability", [])
    return result


def _require_finite(probs: torch.Tensor, method: str) -> None:
    """A method whose predictions hold NaN has no metrics: say so instead of a table of NaN."""
    bad = int((~torch.isfinite(probs)).any(dim=1).sum())
    if bad:
        raise ModelError(f"{method} gives NaN or infinite outputs on {bad} of {probs.shape[0]} rows; "
                         "its weights or the inputs hold values out of range")


# --------------------------------------------------------------------------- the comparison
def _positions_and_labels(inputs: Inputs, classes, outputs: dict[str, torch.Tensor], class_dim: int):
    """Output positions per input, and the labels as indices of the models' classes (matched
    by name, see :func:`ddtool.data.class_labels`); labels are per input, so an output with
    more than one position per input is compared with MC only."""
    widths = {tuple(o.shape[1:]) for o in outputs.values()}
    if len(widths) > 1:
        raise ModelError(f"the models give outputs of different shapes ({', '.join(str(list(w)) for w in sorted(widths))})")
    out = outputs["standard"]
    check_class_dim(out, class_dim)
    positions = out[0].numel() // out.shape[class_dim]
    return positions, class_labels(inputs, classes, out.shape[class_dim]) if positions == 1 else None


def _standard_runs(models: dict[str, nn.Module], x, batch_size, select, class_dim, timing,
                   regression: bool = False, ood_x=None) -> tuple[dict, dict, dict]:
    """Each deterministic model's probabilities (outputs, with ``regression``), its throughput
    and latency, and its probabilities on the OOD inputs ``ood_x`` (if any)."""
    probs, runs, ood = {}, {}, {}
    for name, model in models.items():
        probs[name], seconds = predict_probs(model, x, batch_size, select=select, class_dim=class_dim,
                                             regression=regression)
        _require_finite(probs[name], name)
        runs[name] = [{"throughput": len(x) / seconds, "latency_ms": latency_ms(model, x, select=select) if timing else None}]
        if ood_x is not None:
            ood[name] = predict_probs(model, ood_x, batch_size, select=select, class_dim=class_dim)[0]
    return probs, runs, ood


def _ood_inputs(ood: Inputs | None, preprocess: Preprocess, x: torch.Tensor, positions: int) -> torch.Tensor | None:
    """The prepared out-of-distribution inputs, checked to fit the models like ``x``."""
    if ood is None:
        return None
    if positions != 1:
        raise UsageError("--ood needs one prediction per input (a classifier); this output has several positions")
    require(ood.x.numel() * 4, f"the {len(ood):,} OOD inputs as floats", "use fewer OOD inputs or a smaller --size")
    ood_x = preprocess.prepare(ood.x)
    if ood_x.shape[1:] != x.shape[1:]:
        raise DataError(f"the OOD inputs have shape {list(ood_x.shape[1:])}, the inputs {list(x.shape[1:])}; "
                        "give both the same --size and channels")
    return ood_x


def _check_passes(models: dict, inputs: Inputs, preprocess: Preprocess, batch_size: int, mc_samples: int) -> torch.Tensor:
    """The inputs prepared, once it is known that they and the passes fit in memory: ``batch_size``
    rows at a time, MC_ROWS with MC sampling."""
    require(inputs.x.numel() * 4, f"the {len(inputs):,} inputs as floats", "evaluate on fewer inputs or a smaller --size")
    x = preprocess.prepare(inputs.x)
    rows = max(min(batch_size, len(x)), MC_ROWS if mc_samples else 0)  # MC stacks masked copies into MC_ROWS rows
    for model in models.values():
        check_forward(model, x[:1], rows, f"evaluating {rows} rows at a time", "lower --batch-size (or --size)")
    return x


def evaluate(
    teacher: nn.Module,
    inputs: Inputs,
    preprocess: Preprocess,
    distilled: dict[str, nn.Module] | None = None,
    mc_samples: int = 100, batch_size: int = 256, seed: int = 0,
    select: str | int | None = None, sample_drop_path: bool = False,
    repeats: int = 1, timing: bool = True,
    class_dim: int = 1, classes: list[str] | None = None,
    regression: bool = False, ood: Inputs | None = None, mi_heads: dict[str, nn.Module] | None = None,
) -> EvalReport:
    """Compare the teacher's standard and MC dropout with each model of ``distilled`` on ``inputs``.

    ``select`` picks the prediction among the models' outputs (default: logits / first tensor).
    ``class_dim`` is its class axis: an output with more positions per input (segmentation,
    tagging) is compared with MC position by position, and its labels, which are per input,
    are not used. ``classes`` are the models' class names in output order: class subfolders
    are matched to them by name (see :func:`ddtool.data.class_labels`). ``timing=False`` skips
    the batch-1 latency runs. ``regression``: embeddings, compared with the MC-average output
    in MSE and cosine (``class_dim``: the embedding axis; labels unused). ``ood``, inputs from
    another distribution, adds each method's OOD-detection AUROC (its predictive entropy there
    against on ``inputs``). ``mi_heads`` (name -> ddtool.mihead.with_mi) adds :func:`_mi_columns`.
    """
    models = {"standard": teacher, **(distilled or {})}
    x = _check_passes(models, inputs, preprocess, batch_size, mc_samples)
    outputs = {name: probe(model, x[:2], select) for name, model in models.items()}
    positions, labels = _positions_and_labels(inputs, classes, outputs, class_dim)
    labels = None if regression else labels
    plan = check_dropout(teacher, x[:2], sample_drop_path, select)
    with fast_layout(list(models.values()), x) as x:
        ood_x = _ood_inputs(ood, preprocess, x, positions)
        standard, runs, standard_ood = _standard_runs(models, x, batch_size, select, class_dim, timing, regression, ood_x)
        runs["mc"] = []
        for r in range(repeats):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed + r)
                mc, seconds = predict_probs(teacher, x, batch_size, mc_samples, select, sample_drop_path, plan, class_dim,
                                            regression)
                _require_finite(mc, f"mc-{mc_samples}")
                mc_latency = latency_ms(teacher, x, mc_samples, select, 10, sample_drop_path, plan) if timing and r == 0 else None
                mc_ood = None if ood_x is None else \
                    predict_probs(teacher, ood_x, batch_size, mc_samples, select, sample_drop_path, plan, class_dim)[0]
            runs["mc"].append({**metrics(mc, None, labels, regression, mc_ood), "throughput": len(x) / seconds,
                               "latency_ms": mc_latency})
            for name, probs in standard.items():
                entry = metrics(probs, mc, labels, regression, standard_ood.get(name))
                if r == 0:
                    runs[name][0].update(entry)
                else:
                    runs[name].append(entry)
        mi = _mi_columns(teacher, mi_heads, x, ood_x, mc_samples, seed, select, sample_drop_path, plan) if mi_heads else {}
    report = EvalReport(inputs=len(x), labelled=labels is not None, mc_samples=mc_samples, repeats=repeats,
                        positions=positions, unused=[u.as_dict() for u in inputs.unused], mutual_information=mi,
                        notes=[u.as_dict() for u in inputs.notes], ood_inputs=0 if ood is None else len(ood))
    count = {name: count_parameters(m) for name, m in models.items()}
    for name, method, passes in [("standard", "standard", 1), ("mc", f"mc-{mc_samples}", mc_samples),
                                 *((n, n, 1) for n in distilled or {})]:
        report.results.append(_summarise(method, runs[name], count.get(name, count["standard"]), passes))
    return report


def _mi_columns(teacher: nn.Module, heads: dict[str, nn.Module], x, ood_x, mc_samples: int, seed: int, select,
                sample_drop_path: bool, plan) -> dict:
    """For each distilled model with an MI head: how its one-pass MI (ddtool.mihead) follows MC
    dropout's, MI_m(x) = H(mean_k p_k) - mean_k H(p_k) over ``mc_samples`` masks (seed ``seed``):
    Pearson's and Spearman's correlation over the inputs, the means, and, with OOD inputs, the OOD
    AUROC of the head's MI and of MC's MI (the score separating OOD inputs from the others)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mc = mc_mutual_information(teacher, x, mc_samples, select, plan, sample_drop_path)
        mc_ood = None if ood_x is None else mc_mutual_information(teacher, ood_x, mc_samples, select, plan, sample_drop_path)
    out = {}
    for name, both in heads.items():
        mi = head_values(both, x)
        entry = {"mean_head": mi.mean().item(), "mean_mc": mc.mean().item(), "pearson": pearson(mi, mc),
                 "spearman": spearman(mi, mc)}
        if ood_x is not None:
            is_ood = torch.arange(len(x) + len(ood_x)) >= len(x)
            entry["auroc_ood_head"] = auroc(torch.cat([mi, head_values(both, ood_x)]), is_ood)
            entry["auroc_ood_mc"] = auroc(torch.cat([mc, mc_ood]), is_ood)
        out[name] = entry
    return out


# --------------------------------------------------------------------------- the labelled check
@dataclass
class Check:
    """Standard dropout's and the distilled student's error on the ``n`` inputs of a labelled
    check folder, and which of the two models is kept: the student unless it errs more."""

    n: int
    standard_error: float
    distilled_error: float

    @property
    def kept(self) -> str:
        return "standard" if self.distilled_error > self.standard_error else "distilled"

    def as_dict(self) -> dict:
        return {"n": self.n, "standard_error": self.standard_error, "distilled_error": self.distilled_error,
                "kept": self.kept}

    def line(self) -> str:
        """The one line that reports the check."""
        verdict = ("kept the distilled student" if self.kept == "distilled" else
                   "the distilled student errs more: kept the teacher's own weights (standard dropout)")
        return (f"check on {self.n} labelled inputs: standard {100 * self.standard_error:.2f}% error, "
                f"distilled {100 * self.distilled_error:.2f}%; {verdict}")


def check_labels(teacher: nn.Module, inputs: Inputs, preprocess: Preprocess, select=None, class_dim: int = 1,
                 classes: list[str] | None = None) -> torch.Tensor:
    """The labels of a labelled check folder as the teacher's class indices, checked as
    :func:`evaluate` checks them (the model runs on its inputs, the class folders name its
    classes), so that a check that cannot work fails before any distillation."""
    require(inputs.x.numel() * 4, f"the {len(inputs):,} check inputs as floats", "use fewer check inputs or a smaller --size")
    out = probe(teacher, preprocess.prepare(inputs.x[:2]), select)
    positions, labels = _positions_and_labels(inputs, classes, {"standard": out}, class_dim)
    if positions != 1:
        raise UsageError("--check needs one prediction per input (a classifier); this output has several positions")
    if labels is None:
        raise DataError("the check folder has no labels (class subfolders of inputs, or labelled .jsonl records)")
    return labels


def check_student(teacher: nn.Module, student: nn.Module, x: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                  select=None, class_dim: int = 1) -> Check:
    """The test errors of standard dropout (``teacher`` run deterministically) and of ``student``
    on the prepared inputs ``x`` with ``labels`` (from :func:`check_labels`)."""
    errors = []
    for name, model in (("standard", teacher), ("distilled", student)):
        probs = predict_probs(model, x, batch_size, select=select, class_dim=class_dim)[0]
        _require_finite(probs, name)
        errors.append(int((probs.argmax(1) != labels).sum()) / len(labels))  # exact: wrong / n
    return Check(len(labels), *errors)


def plot(report: EvalReport, path, force: bool = False) -> None:
    """A PNG: each method's error (or KL to MC, without labels) with its std over repeats as
    error bars, and the reliability diagram of every method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = ("error", "test error (%)") if report.labelled else ("kl_to_mc", "KL to MC average (nats)")
    if not report.labelled and all(r.kl_to_mc is None for r in report.results):
        key, label = "mse_to_mc", "MSE to MC-average output"
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
