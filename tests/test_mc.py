"""The one MC sampler: K masked passes stacked, the shared prefix, and MC averages."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_arch
from dropout_zoo import ConvBN
from ddtool.evaluation import kl_divergence
from ddtool.mc import MCSampler, mc_average, probabilities


def _inputs(n, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _confident(model):
    with torch.no_grad():  # confident outputs, so that standard and MC dropout differ clearly
        model[-1].weight.mul_(20)
    return model


# --------------------------------------------------------------------------- stacking
def test_outputs_are_k_independently_masked_copies_of_each_input():
    """outputs(x, k)[j, b] is input b under the j-th mask: every element is 0 or x / (1 - p), and
    two copies keep the same element as often as independent masks do, (1-p)^2 + p^2."""
    p, k = 0.25, 64
    x = torch.rand(3, 500) + 0.5
    torch.manual_seed(0)
    out = MCSampler(nn.Dropout(p), x).outputs(x, k)
    assert out.shape == (k, 3, 500)
    kept = out != 0
    assert torch.allclose(out[kept], (x / (1 - p)).expand_as(out)[kept])
    agree = (kept[:-1] == kept[1:]).float().mean().item()
    assert abs(agree - ((1 - p) ** 2 + p ** 2)) < 0.01


def test_mc_mean_of_linear_model_converges_to_exact_expectation():
    # y = w . dropout(x): E[y] = w . x exactly (inverted dropout keeps the mean), and the MC
    # average of m samples has standard deviation sqrt(sum_i w_i^2 x_i^2 * p/(1-p) / m).
    torch.manual_seed(0)
    p, m = 0.3, 20000
    model = nn.Sequential(nn.Dropout(p), nn.Linear(20, 1, bias=False))
    x = torch.randn(1, 20)
    exact = (model[1].weight @ x.T).item()
    sd = ((model[1].weight ** 2 * x ** 2).sum() * p / (1 - p) / m).sqrt().item()
    assert abs(mc_average(model, x, m).item() - exact) < 4 * sd


def test_more_samples_get_closer_to_the_mc_average():
    torch.manual_seed(0)
    model, x = _confident(tiny_arch.tiny()), _inputs(8)
    ref = mc_average(model, x, 4000, probabilities)
    torch.manual_seed(1)
    sampler = MCSampler(model, x)
    one, many = sampler.mean(x, 1, probabilities), sampler.mean(x, 200, probabilities)
    assert kl_divergence(ref, many).mean() < 0.2 * kl_divergence(ref, one).mean()


def test_rows_bound_the_stack_without_changing_the_average():
    """mean(rows=R) stacks at most R rows per pass; the average is the same estimator."""
    torch.manual_seed(0)
    model, x = _confident(tiny_arch.tiny()), _inputs(4)
    sampler = MCSampler(model, x)
    stacked = torch.stack([sampler.mean(x, 40, probabilities) for _ in range(60)])
    chunked = torch.stack([sampler.mean(x, 40, probabilities, rows=8) for _ in range(60)])
    se = ((stacked.var(0) + chunked.var(0)) / 60).sqrt()
    assert ((stacked.mean(0) - chunked.mean(0)).abs() < 5 * se + 1e-6).all()


@pytest.mark.parametrize("train", [False, True])
def test_samples_are_reproducible_with_a_seed_and_leave_the_model_as_it_was(tiny_model, train):
    x = _inputs(5)
    tiny_model.train(train)
    torch.manual_seed(3)
    a = mc_average(tiny_model, x, 7, probabilities)
    torch.manual_seed(3)
    assert torch.equal(mc_average(tiny_model, x, 7, probabilities), a)
    assert all(m.training == train for m in tiny_model.modules())


def test_batchnorm_statistics_are_bit_identical_after_100_mc_passes():
    torch.manual_seed(0)
    model = ConvBN().eval()
    model.bn.running_mean.uniform_()
    model.bn.running_var.uniform_(0.5, 2)
    before = {k: v.clone() for k, v in model.bn.state_dict().items()}
    mc_average(model, torch.randn(8, 1, 8, 8), 100)
    after = model.bn.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included


# --------------------------------------------------------------------------- the shared prefix
def test_shared_prefix_draws_the_masks_of_the_plain_stack():
    """Stacking at the first dropout site feeds it the same K x B rows as stacking at the input
    (the prefix is deterministic), so under the same seed both give the same target."""
    torch.manual_seed(0)
    lenet = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 16), nn.ReLU(),
                          nn.Dropout(0.5), nn.Linear(16, 3))
    x = _inputs(6)
    shared, plain = MCSampler(lenet, x), MCSampler(lenet, x, share_prefix=False)
    assert shared.hook_module is lenet[5] and plain.hook_module is None
    torch.manual_seed(1)
    a = shared.mean(x, 8, probabilities)
    torch.manual_seed(1)
    b = plain.mean(x, 8, probabilities)
    assert torch.allclose(a, b, atol=1e-6)
    torch.manual_seed(2)
    assert not torch.allclose(shared.mean(x, 8, probabilities), a, atol=1e-3)  # and the masks are fresh


def test_no_sharing_when_the_input_skips_over_the_first_site():
    class Skip(nn.Module):  # the input skips over the dropout: stacking at the site would be wrong
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x):
            return x + self.fc(self.drop(x))

    assert MCSampler(Skip(), torch.randn(3, 4)).hook_module is None


class LateRegisteredFirst(nn.Module):
    """``late`` is registered before ``early``, but ``early`` runs first."""

    def __init__(self):
        super().__init__()
        self.late, self.early = nn.Dropout(0.2), nn.Dropout(0.5)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.late(F.relu(self.fc1(self.early(x)))))


class FunctionalBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)

    def forward(self, x):
        return F.dropout(F.relu(self.fc(x)), 0.5, self.training)


class FunctionalFirst(nn.Module):
    """A functional site (inside ``block``) runs before the module site ``drop`` listed first."""

    def __init__(self):
        super().__init__()
        self.drop, self.block, self.fc = nn.Dropout(0.2), FunctionalBlock(), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(self.drop(self.block(x)))


def _rows_at_sites(model, sampler, x, k, sites):
    """The leading size of each dropout site's output during one K-sample mean."""
    rows = []
    hooks = [model.get_submodule(name).register_forward_hook(lambda m, a, out: rows.append(out.shape[0]))
             for name in sites]
    try:
        sampler.mean(x, k)
    finally:
        for hook in hooks:
            hook.remove()
    return rows


@pytest.mark.parametrize("make, sites, first", [(LateRegisteredFirst, ["early", "late"], "early"),
                                                (FunctionalFirst, ["block", "drop"], "block")])
def test_every_dropout_call_sees_k_copies_whatever_the_registration_order(make, sites, first):
    """The prefix is shared up to the site that *runs* first: every dropout call (a module site,
    or the functional one inside ``block``) draws masks for all K x B rows, and the K samples of
    the target vary as much as K plain copies do. Stacking at the first site *registered* left
    the early site one mask for all K copies: 3.5x and 5.7x the variance of the plain stack."""
    torch.manual_seed(0)
    model, x, k = make(), torch.randn(3, 8), 8
    sampler = MCSampler(model, x)
    assert sampler.hook_module is model.get_submodule(first)
    assert _rows_at_sites(model, sampler, x, k, sites) == [k * 3, k * 3]
    plain = MCSampler(model, x, share_prefix=False)
    torch.manual_seed(1)
    shared_var = torch.stack([sampler.mean(x, k, probabilities) for _ in range(600)]).var(0).sum()
    plain_var = torch.stack([plain.mean(x, k, probabilities) for _ in range(600)]).var(0).sum()
    assert 0.75 < shared_var / plain_var < 1.33, shared_var / plain_var


def test_sharing_falls_back_to_the_plain_stack_when_a_dropout_call_would_miss_the_copies():
    """A dropout on a branch that skips the stacking point sees B rows, not K x B: the sampler
    must notice it (in MC mode: in eval mode the two agree) and stack at the input instead."""

    class Branches(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.first, self.second = nn.Linear(8, 8), nn.Dropout(0.5), nn.Dropout(0.5)

        def forward(self, x):
            h = self.fc(x)
            a, b = self.first(h), self.second(h)  # with sharing at `first`, b comes from the unstacked h
            return a + b.repeat(a.shape[0] // b.shape[0], 1)  # ... and is tiled to a's rows

    torch.manual_seed(0)
    assert MCSampler(Branches(), torch.randn(3, 8)).hook_module is None


# --------------------------------------------------------------------------- only dropout is sampled
class CountsTrainCalls(nn.Module):
    """A user's module whose train mode changes its state: it counts the calls made in it."""

    def __init__(self):
        super().__init__()
        self.fc, self.train_calls = nn.Linear(16, 3), 0

    def forward(self, x):
        self.train_calls += int(self.training)
        return self.fc(x)


class Gated(nn.Module):
    """Dropout written as the attention of transformers libraries: p is 0 unless self.training."""

    def __init__(self):
        super().__init__()
        self.qkv, self.p = nn.Linear(16, 48), 0.3

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], 1, 3, 16).unbind(2)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0).flatten(1)


def _user_model(parametrized: bool):
    torch.manual_seed(0)
    norm = nn.utils.parametrizations.spectral_norm if parametrized else nn.utils.spectral_norm
    return nn.Sequential(norm(nn.Linear(8, 16)), nn.ReLU(), Gated(), nn.Dropout(0.3), CountsTrainCalls()).eval()


def _spectral_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if "weight_u" in k or "weight_v" in k or "_u" in k or "_v" in k}


@pytest.mark.parametrize("parametrized", [False, True])
def test_sampling_leaves_every_non_dropout_computation_as_in_eval_mode(parametrized):
    """spectral_norm runs a power iteration (and updates its vectors) in train mode; a user's
    module may count its train-mode calls. Discovery, the activity check, MC averages and
    evaluation sample dropout, the attention dropout gated by its module's training flag
    included, and change neither."""
    from ddtool.data import Inputs, Preprocess
    from ddtool.dropout import find_dropout, require_dropout
    from ddtool.evaluation import evaluate

    model, x = _user_model(parametrized), torch.randn(6, 8)
    with torch.no_grad():
        before, state = model(x), _spectral_state(model)
    assert state
    sites = find_dropout(model, x)
    assert {(s.kind, s.found_by) for s in sites} == {("Dropout", "module"), ("scaled_dot_product_attention", "attention")}
    require_dropout(model, x)
    torch.manual_seed(0)
    mean = mc_average(model, x, 4000)
    evaluate(model, Inputs(x=x, paths=[None] * 6), Preprocess(), mc_samples=10, timing=False)
    assert model[-1].train_calls == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        assert torch.equal(model(x), before)
    # the last layer is linear after the dropout: the MC mean is the deterministic output, in expectation
    assert torch.allclose(mean, before, atol=0.1)


def test_distillation_targets_see_the_teacher_in_eval_mode_but_for_dropout():
    """A teacher whose train mode shifts its logits: the MC reference of the held-out inputs must
    be the eval-mode network's with dropout sampled, so a student that starts as the teacher is
    already close to it (fidelity small), not 5 nats off."""
    import ddtool

    class TrainShift(nn.Module):
        def forward(self, x):
            return x + 5 * torch.eye(x.shape[1])[0] if self.training else x

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Dropout(0.2), nn.Linear(64, 3), TrainShift())
    config = ddtool.DistillConfig(epochs=1, lr=1e-6, val_fraction=0.5, batch_size=16)
    result = ddtool.distill(model, _inputs(32), ddtool.Preprocess(), config)
    assert result.history[0]["fidelity"] < 0.05, result.history
