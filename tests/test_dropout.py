"""Dropout discovery and MC sampling over the dropout zoo."""

import pytest
import torch
from torch import nn

from dropout_zoo import ZOO, ConvBN, Residual
from ddtool.dropout import SampledDropout, find_dropout, keep_mask, mc_mode, plan_mc, require_dropout
from ddtool.errors import NoDropoutError


def _build(name):
    torch.manual_seed(0)
    factory, example, expected = ZOO[name]
    return factory().eval(), example(), expected


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_site_is_found(name):
    model, x, expected = _build(name)
    sites = find_dropout(model, x, sample_drop_path=True)
    got = [(s.name, s.kind, s.found_by, s.p, s.calls) for s in sites]
    assert sorted(got) == sorted((n, k, f, pytest.approx(p), c) for n, k, f, p, c in expected)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_mc_outputs_vary_and_deterministic_outputs_do_not(name):
    model, x, _ = _build(name)
    require_dropout(model, x, sample_drop_path=True)
    owners = plan_mc(model, x, sample_drop_path=True).owners
    assert owners == (("<root>",) if name == "sdpa" else ())  # it gates its attention dropout on self.training
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
        with mc_mode(model, sample_drop_path=True, owners=owners):
            outs = [model(x) for _ in range(4)]
    assert any(not torch.equal(outs[0], o) for o in outs[1:])
    assert not any(m.training for m in model.modules())  # mc_mode put everything back


def test_module_sites_without_running_the_model():
    model, _, _ = _build("transformer_encoder_layer")
    assert {s.name for s in find_dropout(model)} == {"layer.self_attn", "layer.dropout", "layer.dropout1", "layer.dropout2"}
    assert all(s.calls is None for s in find_dropout(model))
    assert find_dropout(_build("functional_head")[0]) == []  # functional dropout needs a forward pass


def test_drop_path_is_reported_but_not_sampled_by_default():
    torch.manual_seed(0)
    model = Residual().eval()
    model.drop.p = 0.0  # leave DropPath as the only stochastic site
    x = torch.randn(4, 8)
    sites = find_dropout(model, x)
    assert [(s.kind, s.sampled) for s in sites] == [("DropPath", False)]
    with pytest.raises(NoDropoutError, match="DropPath"):
        require_dropout(model, x)
    require_dropout(model, x, sample_drop_path=True)


def test_model_whose_dropout_never_runs_is_refused():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 2), nn.Dropout(0.5)  # defined, never called

        def forward(self, x):
            return self.fc(x)

    model = Unused().eval()
    assert find_dropout(model, torch.randn(2, 4))[0].calls == 0
    with pytest.raises(NoDropoutError, match="do not vary"):
        require_dropout(model, torch.randn(2, 4))


def test_no_dropout_is_an_error():
    with pytest.raises(NoDropoutError, match="no active dropout"):
        require_dropout(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.0)))


def test_mc_mode_switches_only_dropout_and_restores_training_flags():
    model = ConvBN().train()
    model.fc.eval()
    before = [m.training for m in model.modules()]
    with mc_mode(model):
        assert model.drop.training and not any(m.training for m in (model, model.conv, model.bn, model.fc))
    assert [m.training for m in model.modules()] == before


def test_scripted_model_sites_and_sampling():
    torch.manual_seed(0)
    scripted = torch.jit.script(ConvBN().eval())
    assert [(s.name, s.kind) for s in find_dropout(scripted, torch.randn(2, 1, 8, 8))] == [("drop", "Dropout")]
    require_dropout(scripted, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("p", [0.5, 0.2, 0.1])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_fast_masks_keep_each_element_with_probability_one_minus_p(p, layout):
    """keep_mask: the keep rate is 1 - p within 5 standard errors, masks follow the layout of the
    input, neighbouring elements (which share a 64-bit draw) are uncorrelated, and SampledDropout
    scales kept elements by 1 / (1 - p) like F.dropout, whatever the training argument says."""
    torch.manual_seed(0)
    x = torch.ones(64, 8, 24, 24)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = x[:, :, ::2]
    keep = keep_mask(x, p).float()
    assert keep.shape == x.shape
    n = keep.numel()
    assert abs(keep.mean().item() - (1 - p)) < 5 * ((p * (1 - p) / n) ** 0.5)
    flat = keep.flatten()
    corr = torch.corrcoef(torch.stack([flat[:-1], flat[1:]]))[0, 1].item()
    assert abs(corr) < 5 / n ** 0.5
    for training in (True, False):
        with SampledDropout():
            y = torch.nn.functional.dropout(x, p, training=training)
        values = torch.unique(y)
        assert len(values) == 2 and values[0] == 0 and values[1].item() == pytest.approx(1 / (1 - p))


def test_fast_masks_give_the_same_mc_average_as_f_dropout():
    """MC averages of a conv net through SampledDropout and through F.dropout agree within noise."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Dropout(0.3), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 9, 3)).train()
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        plain = torch.stack([net(x) for _ in range(4000)])
        with SampledDropout():
            fast = torch.stack([net(x) for _ in range(4000)])
    stderr = (plain.std(0) ** 2 / 4000 + fast.std(0) ** 2 / 4000).sqrt()
    assert ((plain.mean(0) - fast.mean(0)).abs() < 5 * stderr + 1e-6).all()
