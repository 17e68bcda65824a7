"""Standard vs MC vs distilled: the metrics against hand-computed values."""

import copy
import math

import torch
import torch.nn.functional as F

from ddtool.data import Inputs, Preprocess
from ddtool.evaluate import evaluate, kl_divergence, predict_probs


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
    expected_error = (predict_probs(tiny_model, x, 30)[0].argmax(1) != labels).float().mean().item()
    assert std.error == expected_error
    # a copy of the teacher predicts exactly like standard dropout
    assert twin_row.error == std.error and abs(twin_row.kl_to_mc - std.kl_to_mc) < 1e-6
    assert mc.kl_to_mc is None and mc.forward_passes == 20 and std.forward_passes == 1
    assert std.kl_to_mc > 0 and 0 <= std.agreement <= 1 and std.ms_per_input > 0


def test_unlabelled_report_has_no_error(tiny_model):
    inputs = Inputs(x=torch.rand(10, 1, 8, 8), paths=[None] * 10)
    report = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5)
    assert not report.labelled and all(r.error is None for r in report.results)


def test_mc_average_is_reproducible_with_a_seed(tiny_model):
    inputs = Inputs(x=torch.rand(10, 1, 8, 8), paths=[None] * 10)
    a = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5, seed=1).results[0].kl_to_mc
    b = evaluate(tiny_model, inputs, Preprocess(), mc_samples=5, seed=1).results[0].kl_to_mc
    assert a == b


def test_softmax_outputs_sum_to_one(tiny_model):
    probs, seconds = predict_probs(tiny_model, torch.rand(9, 1, 8, 8), 4, mc_samples=3)
    assert torch.allclose(probs.sum(1), torch.ones(9)) and seconds > 0
    assert torch.equal(predict_probs(tiny_model, torch.zeros(1, 1, 8, 8), 4)[0],
                       F.softmax(tiny_model.eval()(torch.zeros(1, 1, 8, 8)), 1))
