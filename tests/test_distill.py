"""Algorithm 2 on a tiny model: the loss, the K-sample target, and what a run must guarantee."""

import pytest
import torch
import torch.nn.functional as F

import tiny_arch
from ddtool.data import Preprocess
from ddtool.distill import DistillConfig, distill, kl_loss, teacher_target
from ddtool.dropout import mc_average, set_mc
from ddtool.errors import ModelError, NoDropoutError, UsageError
from ddtool.evaluate import kl_divergence

PRE = Preprocess()


def _inputs(n=64, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_kl_loss_is_the_mean_kl_divergence():
    logits = torch.randn(5, 4)
    p = F.softmax(torch.randn(5, 4), dim=1)
    q = F.softmax(logits, dim=1)
    expected = (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(kl_loss(logits, p), expected, atol=1e-6)
    assert kl_loss(torch.log(p), p).abs().item() < 1e-6


def test_teacher_target_averages_independent_samples(tiny_model):
    x = _inputs(8)
    torch.manual_seed(0)
    set_mc(tiny_model)
    one = teacher_target(tiny_model, x, 1)
    many = teacher_target(tiny_model, x, 100)
    ref = teacher_target(tiny_model, x, 4000)
    assert torch.allclose(one.sum(1), torch.ones(8)) and torch.allclose(many.sum(1), torch.ones(8))
    # the 100-sample target sits much closer to the MC reference than a single masked pass
    assert kl_divergence(ref, many).mean() < 0.2 * kl_divergence(ref, one).mean()


def test_distillation_moves_the_student_towards_the_mc_average(tiny_model):
    with torch.no_grad():  # confident outputs, so that standard and MC dropout differ clearly
        tiny_model[-1].weight.mul_(20)
    x = _inputs(96)
    result = distill(tiny_model, x, PRE, DistillConfig(epochs=15, lr_drop_epoch=10, lr=0.05, batch_size=32, perturb=0.0, teacher_samples=4))
    torch.manual_seed(1)
    ref = mc_average(tiny_model, x, 500, lambda o: F.softmax(o, 1))
    with torch.no_grad():
        before = kl_divergence(ref, F.softmax(tiny_model.eval()(x), 1)).mean()
        after = kl_divergence(ref, F.softmax(result.student(x), 1)).mean()
    assert after < 0.7 * before
    assert len(result.history) == 15 and result.history[-1]["lr"] == pytest.approx(0.005)
    assert not result.student.training and not any(p.requires_grad for p in result.student.parameters())


def test_teacher_is_not_modified_and_runs_are_reproducible(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    cfg = DistillConfig(epochs=2, batch_size=16, seed=3)
    a = distill(tiny_model, _inputs(), PRE, cfg).student
    b = distill(tiny_model, _inputs(), PRE, cfg).student
    assert all(torch.equal(before[k], v) for k, v in tiny_model.state_dict().items())
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    c = distill(tiny_model, _inputs(), PRE, DistillConfig(epochs=2, batch_size=16, seed=4)).student
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))


def test_global_rng_is_left_alone(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(tiny_model, _inputs(16), PRE, DistillConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_model_without_dropout_is_refused():
    with pytest.raises(NoDropoutError):
        distill(tiny_arch.no_dropout(), _inputs(8), PRE)


def test_inputs_that_do_not_fit_the_model(tiny_model):
    with pytest.raises(ModelError, match=r"failed on inputs of shape \(2, 1, 5, 5\)"):
        distill(tiny_model, torch.rand(8, 1, 5, 5), PRE)


def test_diverging_loss_stops_with_a_clear_error(tiny_model):
    with pytest.raises(ModelError, match="lower --lr"):
        distill(tiny_model, _inputs() * 1e6, PRE, DistillConfig(epochs=3, lr=1e6))


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("teacher_samples", 0), ("perturb", 1.0)])
def test_invalid_settings(field, value):
    with pytest.raises(UsageError, match=field):
        DistillConfig(**{field: value})
