"""Standard vs MC vs distilled: the metrics against hand-computed values."""

import copy
import math
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_arch
from ddtool.data import Inputs, Preprocess
from ddtool.evaluation import auroc, calibration, entropy, evaluate, kl_divergence, plot, predict_probs
from ddtool.mc import MC_ROWS, MCSampler


def test_kl_divergence_matches_definition():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    expected = torch.tensor([0.5 * math.log(2.0) + 0.5 * math.log(2 / 3), math.log(2.0)])
    assert torch.allclose(kl_divergence(p, q), expected, atol=1e-6)
    assert kl_divergence(p, p).abs().max() < 1e-6


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3)).eval()


def test_report_rows_and_metrics():
    """Every metric of the report against its definition, recomputed here from the same
    predictions (MC ones drawn again under the same seed)."""
    model, x = _mlp(), torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 3
    inputs = Inputs(x=x, paths=[None] * 30, labels=labels, classes=["a", "b", "c"])
    twin = copy.deepcopy(model)
    report = evaluate(model, inputs, Preprocess(), {"twin": twin}, mc_samples=20, batch_size=7, seed=4)
    std, mc, twin_row = report.results
    assert [r.method for r in report.results] == ["standard", "mc-20", "twin"]
    probs = predict_probs(model, x, 30)[0]
    torch.manual_seed(4)
    mc_probs = predict_probs(model, x, 7, mc_samples=20)[0]
    assert std.error == (probs.argmax(1) != labels).float().mean().item()
    assert std.nll == pytest.approx(-probs[torch.arange(30), labels].log().mean().item(), rel=1e-5)
    assert std.kl_to_mc == pytest.approx(kl_divergence(mc_probs, probs).mean().item(), rel=1e-5)
    assert std.agreement == (probs.argmax(1) == mc_probs.argmax(1)).float().mean().item()
    assert mc.error == (mc_probs.argmax(1) != labels).float().mean().item()
    # a copy of the teacher predicts exactly like standard dropout
    assert twin_row.error == std.error and abs(twin_row.kl_to_mc - std.kl_to_mc) < 1e-6
    assert mc.kl_to_mc is None and mc.forward_passes == 20 and std.forward_passes == 1
    assert std.latency_ms > 0 and mc.latency_ms > 0
    assert std.parameters == twin_row.parameters == 64 * 32 + 32 + 32 * 3 + 3


def test_mc_dropout_costs_m_forward_passes_per_input_and_standard_one():
    """The cost the report states (forward_passes), counted: rows through the last layer."""
    model, x = _mlp(), torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    rows = []
    hook = model[-1].register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
    try:
        predict_probs(model, x, 7)
        standard = sum(rows)
        sampler = MCSampler(model, x[:2])
        rows.clear()  # (building the sampler runs the model on two inputs)
        sampler.mean(x, 20, rows=MC_ROWS)
        mc = sum(rows)
    finally:
        hook.remove()
    assert (standard, mc) == (30, 20 * 30)


def test_unlabelled_report_has_no_error(tiny_model):
    inputs = Inputs(x=torch.rand(10, 1, 8, 8), paths=[None] * 10)
    report = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5, timing=False)
    assert not report.labelled and all(r.error is None and r.nll is None for r in report.results)


def test_mc_average_is_reproducible_with_a_seed(tiny_model):
    inputs = Inputs(x=torch.rand(10, 1, 8, 8), paths=[None] * 10)
    a = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5, seed=1, timing=False).results[0].kl_to_mc
    b = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5, seed=1, timing=False).results[0].kl_to_mc
    assert a == b


def test_softmax_outputs_sum_to_one(tiny_model):
    probs, seconds = predict_probs(tiny_model, torch.rand(9, 1, 8, 8), 4, mc_samples=3)
    assert torch.allclose(probs.sum(1), torch.ones(9)) and seconds > 0
    assert torch.equal(predict_probs(tiny_model, torch.zeros(1, 1, 8, 8), 4)[0],
                       F.softmax(tiny_model.eval()(torch.zeros(1, 1, 8, 8)), 1))


def test_calibration_of_a_perfectly_calibrated_table():
    # confidence 0.75 everywhere and 75% right: ECE 0
    probs = torch.tensor([[0.75, 0.25]] * 4)
    labels = torch.tensor([0, 0, 0, 1])
    ece, table = calibration(probs, labels)
    assert ece == pytest.approx(0.0, abs=1e-6) and table == [(0.75, 0.75, 4)]
    ece, _ = calibration(probs, torch.tensor([1, 1, 1, 1]))
    assert ece == pytest.approx(0.75)


def test_repeats_give_mean_and_spread_over_seeds_and_plot(tmp_path):
    model, x = _mlp(), torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 3
    report = evaluate(model, Inputs(x=x, paths=[None] * 20, labels=labels), Preprocess(), mc_samples=3, repeats=3,
                      timing=False, seed=7)
    errors = []
    for r in range(3):  # repeat r draws its masks from seed + r
        torch.manual_seed(7 + r)
        errors.append((predict_probs(model, x, 256, mc_samples=3)[0].argmax(1) != labels).float().mean().item())
    mc = report.results[1]
    assert report.repeats == 3
    assert mc.error == pytest.approx(statistics.fmean(errors)) and mc.std["error"] == pytest.approx(statistics.stdev(errors))
    assert report.results[0].std["error"] == 0.0  # standard dropout does not depend on the seed
    plot(report, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_position_outputs_are_compared_with_mc_position_by_position():
    """A tagger's (N, 8, 3) output with class_dim=2: probabilities along that axis, 8 rows per
    input compared with MC, the per-input labels left out."""
    torch.manual_seed(0)
    model, x = tiny_arch.tagger().eval(), torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = Inputs(x=x, paths=[None] * 6, labels=torch.arange(6) % 3)
    report = evaluate(model, inputs, Preprocess(), mc_samples=10, timing=False, class_dim=2, seed=1)
    std = report.results[0]
    probs = F.softmax(model(x), dim=2).reshape(-1, 3)
    torch.manual_seed(1)
    mc = predict_probs(model, x, 256, mc_samples=10, class_dim=2)[0]
    assert mc.shape == (48, 3) and report.positions == 8 and not report.labelled and std.error is None
    assert std.kl_to_mc == pytest.approx(kl_divergence(mc, probs).mean().item(), rel=1e-5)


# --------------------------------------------------------------------------- uncertainty: AUROC
def test_auroc_of_a_perfect_a_reversed_and_a_constant_score():
    positive = torch.tensor([0, 0, 1, 0, 1, 1]).bool()
    perfect = positive.double() + 0.1 * torch.arange(6)  # every positive above every negative
    assert auroc(perfect, positive) == 1.0
    assert auroc(-perfect, positive) == 0.0
    assert auroc(torch.ones(6), positive) == 0.5  # all tied: each pair counts one half
    assert auroc(torch.ones(6), torch.zeros(6)) is None  # no positives: undefined


def test_auroc_counts_ties_one_half_and_matches_the_pairwise_definition():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (200,), generator=gen).double()  # many ties
    positive = torch.rand(200, generator=gen) < 0.3
    pos, neg = scores[positive], scores[~positive]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auroc(scores, positive) == pytest.approx(pairs.mean().item(), abs=1e-12)


def test_auroc_of_a_random_score_is_near_one_half():
    """Random scores, independent of the labels: AUROC ~ 0.5 with standard deviation
    sqrt((n_pos + n_neg + 1) / (12 n_pos n_neg)) ~ 0.009 here; 5 sigma bound."""
    gen = torch.Generator().manual_seed(1)
    positive = torch.rand(10_000, generator=gen) < 0.2
    value = auroc(torch.rand(10_000, generator=gen), positive)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    sigma = math.sqrt((n_pos + n_neg + 1) / (12 * n_pos * n_neg))
    assert abs(value - 0.5) < 5 * sigma


def test_entropy_of_one_hot_and_uniform_rows():
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert torch.allclose(entropy(probs), torch.tensor([0.0, math.log(4)], dtype=torch.float64))


def test_evaluate_reports_misclassification_and_ood_auroc_per_method():
    """The report's AUROCs equal the definitions recomputed from the same predictions; OOD
    inputs of pure noise far outside the training range are told apart from the inputs."""
    model, x = _mlp(), torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(40) % 3
    inputs = Inputs(x=x, paths=[None] * 40, labels=labels, classes=["a", "b", "c"])
    ood_x = torch.rand(25, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ood = Inputs(x=ood_x, paths=[None] * 25)
    report = evaluate(model, inputs, Preprocess(), mc_samples=10, batch_size=16, seed=2, timing=False, ood=ood)
    std, mc = report.results
    assert report.ood_inputs == 25
    probs, ood_probs = predict_probs(model, x, 40)[0], predict_probs(model, ood_x, 40)[0]
    assert std.auroc_error == pytest.approx(auroc(entropy(probs), probs.argmax(1) != labels))
    both = torch.cat([entropy(probs), entropy(ood_probs)])
    assert std.auroc_ood == pytest.approx(auroc(both, torch.arange(65) >= 40))
    torch.manual_seed(2)
    mc_probs = predict_probs(model, x, 16, mc_samples=10)[0]
    mc_ood = predict_probs(model, ood_x, 16, mc_samples=10)[0]
    assert mc.auroc_error == pytest.approx(auroc(entropy(mc_probs), mc_probs.argmax(1) != labels))
    assert mc.auroc_ood == pytest.approx(auroc(torch.cat([entropy(mc_probs), entropy(mc_ood)]), torch.arange(65) >= 40))
    without = evaluate(model, inputs, Preprocess(), mc_samples=10, batch_size=16, seed=2, timing=False).results[0]
    assert without.auroc_ood is None and without.auroc_error == std.auroc_error
