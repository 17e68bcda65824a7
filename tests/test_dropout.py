"""Dropout discovery and MC sampling on small seeded models."""

import pytest
import torch
from torch import nn

from ddtool.dropout import find_dropout, mc_average, mc_mode, require_dropout
from ddtool.errors import NoDropoutError


def test_every_dropout_module_is_found(tiny_model):
    sites = find_dropout(tiny_model)
    assert [(s.name, s.kind, s.p) for s in sites] == [("2", "Dropout", 0.5), ("7", "Dropout", 0.5)]


def test_all_dropout_types_and_zero_rate():
    model = nn.Sequential(nn.Dropout1d(0.1), nn.Dropout2d(0.2), nn.Dropout3d(0.3), nn.AlphaDropout(0.4),
                          nn.FeatureAlphaDropout(0.5), nn.Dropout(0.0))
    assert [s.kind for s in find_dropout(model)] == [
        "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout", "FeatureAlphaDropout"]


def test_no_dropout_is_an_error():
    with pytest.raises(NoDropoutError, match="no active dropout"):
        require_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))


def test_mc_outputs_vary_and_deterministic_outputs_do_not(tiny_model):
    x = torch.randn(4, 1, 8, 8)
    tiny_model.eval()
    with torch.no_grad():
        assert torch.equal(tiny_model(x), tiny_model(x))
        with mc_mode(tiny_model):
            a, b = tiny_model(x), tiny_model(x)
    assert not torch.equal(a, b)


def test_mc_mode_restores_training_flags(tiny_model):
    tiny_model.train()
    tiny_model[0].eval()
    before = [m.training for m in tiny_model.modules()]
    with mc_mode(tiny_model):
        assert [m.training for m in tiny_model.modules()][1:4] == [False, False, True]
    assert [m.training for m in tiny_model.modules()] == before


def test_mc_mean_of_linear_model_converges_to_exact_expectation():
    # y = w . dropout(x): E[y] = w . x exactly (inverted dropout keeps the mean), and the MC
    # average of m samples has standard deviation sqrt(sum w_i^2 x_i^2 p/(1-p) / m).
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(20, 1, bias=False))
    x = torch.randn(1, 20)
    exact = (model[1].weight @ x.T).item()
    m = 20000
    sd = ((model[1].weight ** 2 * x ** 2).sum() * 0.5 / 0.5 / m).sqrt().item()
    assert abs(mc_average(model, x, m).item() - exact) < 4 * sd


def test_batchnorm_statistics_are_untouched_by_sampling():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(144, 2))
    bn = model[1]
    bn.running_mean.uniform_()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    mc_average(model, torch.randn(8, 1, 8, 8), 100)
    assert all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
