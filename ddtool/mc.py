"""MC dropout of a model: K masked passes per input, and their mean (Bulo et al. 2016, Eq. 4).

    f_hat(x) = 1/K * sum_k f_{Theta, sigma_k}(x),    sigma_k ~ Bernoulli(1 - p) per unit.

One :class:`MCSampler` serves every place that samples: the distillation target (the K of
Theorem 1(ii)), the validation reference, and MC-dropout evaluation.

The K copies of a batch of B inputs are stacked into one batch of K*B rows, so that each row
draws its own masks in one forward pass. The part of the model before its first dropout site is
deterministic, so it runs once: a forward pre-hook on the module owning the site that *runs*
first (not the one registered first) repeats that module's inputs K times. Whether this is
valid for the model is checked once, against the plain K-fold stack at the input: in eval mode
the outputs must agree (no skip connection around the site carrying the unrepeated batch, say),
and in MC mode every dropout call must see the shape it sees in the plain stack, K x B rows (no
branch computed from the unrepeated batch drops units). If either check fails, the plain stack
is used.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .dropout import MCPlan, SampledDropout, deterministic, dropout_shapes, mc_mode, plan_mc, set_mc
from .outputs import select_output

#: Rows per stacked forward pass in MC evaluation: bigger batches only cost memory traffic on the
#: CPU (measured on the sample net: 2,300 masked passes/s at 256 rows, 1,600 at 4,096).
MC_ROWS = 256
#: Copies stacked in the prefix-sharing check: odd, so that it differs from a batch of 2.
CHECK_K = 3


def _stack(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.repeat(k, *([1] * (x.dim() - 1))) if k > 1 else x


def probabilities(out: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Class probabilities of logits whose class axis is ``dim``: the space a classifier's
    ensemble is averaged in."""
    return F.softmax(out.float(), dim=dim)


class MCSampler:
    """K masked passes of ``model`` per input (see the module docstring).

    ``example`` is an input batch the sampler runs once to find the stacking point. ``select``
    picks the prediction among the model's outputs. ``own=True`` says the model is the caller's
    private copy (distillation's frozen teacher): it stays in MC mode between calls instead of
    being switched for each one. Masks come from torch's global generator, so
    ``torch.manual_seed`` makes the samples reproducible.
    """

    def __init__(self, model: nn.Module, example, *, select=None, sample_drop_path: bool = False,
                 share_prefix: bool = True, own: bool = False, plan: MCPlan | None = None):
        self.model, self.select, self.sample_drop_path, self.own = model, select, sample_drop_path, own
        self.plan = plan or plan_mc(model, example, sample_drop_path)
        self.hook_module: nn.Module | None = None
        if own:
            set_mc(model, sample_drop_path, self.plan.owners)
        if share_prefix and self.plan.first not in (None, "<root>") and isinstance(example, torch.Tensor):
            self.hook_module = model.get_submodule(self.plan.first)
            if not self._sharing_is_exact(example):
                self.hook_module = None

    @property
    def shared_prefix(self) -> bool:
        """Whether the deterministic prefix runs once for all K copies."""
        return self.hook_module is not None

    def _sampling(self, fast: bool = True):
        """MC mode for one call (a model of its own stays in it: only the functions are sampled)."""
        return SampledDropout(fast) if self.own else mc_mode(self.model, self.sample_drop_path, self.plan.owners, fast)

    @contextlib.contextmanager
    def _repeat_at_stacking_point(self, batch: int, k: int):
        fired = False

        def repeat(value):
            is_batch = isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == batch
            return _stack(value, k) if is_batch else value

        def hook(_module, args, kwargs):
            nonlocal fired
            if fired:  # a module called twice: its second call is downstream, already stacked
                return None
            fired = True
            return tuple(repeat(a) for a in args), {name: repeat(v) for name, v in kwargs.items()}

        handle = self.hook_module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    def _stacked(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The selected outputs of k masked passes, as one batch of k*B rows (k-major)."""
        if self.hook_module is not None and k > 1:
            with self._repeat_at_stacking_point(x.shape[0], k):
                return select_output(self.model(x), self.select)
        return self._plain(x, k)

    def _plain(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return select_output(self.model(_stack(x, k)), self.select)

    @torch.no_grad()
    def _sharing_is_exact(self, example: torch.Tensor) -> bool:
        try:
            with deterministic(self.model):
                shared, plain = self._stacked(example, CHECK_K), self._plain(example, CHECK_K)
            if shared.shape != plain.shape or not torch.allclose(shared, plain, atol=1e-5, rtol=1e-4):
                return False
            with torch.random.fork_rng(devices=[]):  # the check draws masks: not from the run's stream
                shared_calls = dropout_shapes(lambda: self._checked(self._stacked, example))[1]
                plain_calls = dropout_shapes(lambda: self._checked(self._plain, example))[1]
        except Exception:  # noqa: BLE001 - a shape clash means sharing does not apply
            return False
        return shared_calls == plain_calls

    def _checked(self, run, example):
        # torch's own masks: fast ones replace F.dropout without calling it, hiding it from the recorder
        with self._sampling(fast=False):
            return run(example, CHECK_K)

    @torch.no_grad()
    def outputs(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """The selected outputs of ``k`` masked passes over the batch ``x``: shape (k, B, ...)."""
        with self._sampling():
            out = self._stacked(x, k)
        return out.view(k, x.shape[0], *out.shape[1:])

    @torch.no_grad()
    def mean(self, x: torch.Tensor, k: int, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
             rows: int | None = None) -> torch.Tensor:
        """The mean over ``k`` masked passes of ``transform(output)`` (default: the output as float32).

        ``transform`` maps outputs to the space the ensemble is averaged in: probabilities for a
        classifier (:func:`probabilities`), the outputs themselves for regression. With ``rows``
        the passes are stacked at most ``rows`` rows at a time (so ``k`` is not bounded by
        memory); without it all k copies go in one batch.
        """
        transform = transform or (lambda out: out.float())
        if rows is None:
            return self._mean(x, k, transform)
        per_pass, total, left = max(1, rows // max(1, x.shape[0])), 0.0, k
        while left:
            n = min(per_pass, left)
            total = total + self._mean(x, n, transform) * n
            left -= n
        return total / k

    def _mean(self, x: torch.Tensor, k: int, transform) -> torch.Tensor:
        with self._sampling():
            out = transform(self._stacked(x, k))
        return out.view(k, x.shape[0], *out.shape[1:]).mean(0)


@torch.no_grad()
def mc_average(model: nn.Module, x: torch.Tensor, samples: int, transform=None, sample_drop_path: bool = False,
               select=None) -> torch.Tensor:
    """The MC-dropout average (Eq. 4) of ``transform(model(x))`` over ``samples`` fresh masks per
    input: probabilities (:func:`probabilities`) for a classifier, the outputs for regression."""
    sampler = MCSampler(model, x[:2], select=select, sample_drop_path=sample_drop_path)
    return sampler.mean(x, samples, transform, rows=MC_ROWS)
