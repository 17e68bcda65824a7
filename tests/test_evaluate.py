"""Standard vs MC vs distilled: the metrics against hand-computed values."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from ddtool.data import Inputs, Preprocess
from ddtool.evaluation import calibration, evaluate, kl_divergence, plot, predict_probs


def test_kl_divergence_matches_definition():
    p = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    q = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    expected = torch.tensor([0.5 * math.log(2.0) + 0.5 * math.log(2 / 3), math.log(2.0)])
    assert torch.allclose(kl_divergence(p, q), expected, atol=1e-6)
    assert kl_divergence(p, p).abs().max() < 1e-6


def test_report_rows_and_metrics(tiny_model):
    x = torch.rand(30, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(30) % 3
    inputs = Inputs(x=x, paths=[None] * 30, labels=labels, classes=["a", "b", "c"])
    twin = copy.deepcopy(tiny_model)
    report = evaluate(tiny_model, inputs, Preprocess(), {"twin": twin}, mc_samples=20, batch_size=7)
    std, mc, twin_row = report.results
    assert [r.method for r in report.results] == ["standard", "mc-20", "twin"]
    probs = predict_probs(tiny_model, x, 30)[0]
    assert std.error == (probs.argmax(1) != labels).float().mean().item()
    assert std.nll == pytest.approx(-probs[torch.arange(30), labels].log().mean().item(), rel=1e-5)
    # a copy of the teacher predicts exactly like standard dropout
    assert twin_row.error == std.error and abs(twin_row.kl_to_mc - std.kl_to_mc) < 1e-6
    assert mc.kl_to_mc is None and mc.forward_passes == 20 and std.forward_passes == 1
    assert std.kl_to_mc > 0 and 0 <= std.agreement <= 1 and 0 <= std.ece <= 1
    assert std.latency_ms > 0 and mc.latency_ms > 0 and std.throughput > mc.throughput
    assert std.parameters == twin_row.parameters == sum(p.numel() for p in tiny_model.parameters())


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


def test_repeats_give_spread_and_plot(tmp_path, tiny_model):
    x = torch.rand(20, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = Inputs(x=x, paths=[None] * 20, labels=torch.arange(20) % 3)
    report = evaluate(tiny_model, inputs, Preprocess(), mc_samples=3, repeats=3, timing=False)
    mc = report.results[1]
    assert report.repeats == 3 and "error" in mc.std and mc.std["error"] >= 0
    assert report.results[0].std["error"] == 0.0  # standard dropout does not depend on the seed
    plot(report, tmp_path / "eval.png")
    assert (tmp_path / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
