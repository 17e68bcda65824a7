"""Algorithm 2 on tiny models: losses, the K-sample target, schedule, resume, signals, data paths."""

import os
import signal

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny_arch
from conftest import write_images
from ddtool.data import Preprocess, index_folder, open_unlabelled
from ddtool import distillation
from ddtool.distillation import LR_CANDIDATES, DistillConfig, distill, kl_loss, resolve_device, scheduled_lr
from ddtool.mc import MCSampler, mc_average, probabilities
from ddtool.errors import ModelError, NoDropoutError, UsageError
from ddtool.evaluation import kl_divergence
from ddtool.model import clone_model
from ddtool.resume import Interrupted

PRE = Preprocess()


def _inputs(n=64, seed=0):
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _confident(model):
    with torch.no_grad():  # confident outputs, so that standard and MC dropout differ clearly
        model[-1].weight.mul_(20)
    return model


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


# --------------------------------------------------------------------------- losses
def test_kl_loss_is_the_mean_kl_divergence():
    logits = torch.randn(5, 4)
    p = F.softmax(torch.randn(5, 4), dim=1)
    q = F.softmax(logits, dim=1)
    assert torch.allclose(kl_loss(logits, p), (p * (p.log() - q.log())).sum(1).mean(), atol=1e-6)
    assert kl_loss(torch.log(p), p).abs().item() < 1e-6
    one_hot = torch.eye(4)[:2]  # 0 * log 0 counts as 0
    assert torch.isfinite(kl_loss(torch.randn(2, 4), one_hot))


def test_kl_loss_per_position_for_segmentation_outputs():
    logits, p = torch.randn(2, 3, 4, 5), F.softmax(torch.randn(2, 3, 4, 5), dim=1)
    flat_logits = logits.permute(0, 2, 3, 1).reshape(-1, 3)
    flat_p = p.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.allclose(kl_loss(logits, p, dim=1), kl_loss(flat_logits, flat_p), atol=1e-6)


# --------------------------------------------------------------------------- K teacher samples
def _grads(model, x, k, draws):
    """Gradients of the distillation loss in the student's last layer, one per draw of K masks."""
    student = clone_model(model).eval()
    torch.manual_seed(0)
    passes = MCSampler(model, x).outputs(x, k * draws)  # k * draws independent masked passes
    targets = F.softmax(passes, dim=-1).view(draws, k, *passes.shape[1:]).mean(1)
    grads = []
    for target in targets:
        student.zero_grad()
        kl_loss(student(x), target).backward()
        grads.append(student[-1].weight.grad.flatten().clone())
    return torch.stack(grads)


@pytest.mark.slow
def test_k_samples_keep_the_gradient_mean_and_lower_its_variance():
    # Theorem 1(ii): the gradient is linear in the target, so averaging K masked targets leaves
    # E[grad] unchanged; the K draws are independent, so its variance falls roughly as 1/K.
    torch.manual_seed(0)
    model, x = _confident(tiny_arch.tiny()), _inputs(16)
    g1, g8 = _grads(model, x, 1, 400), _grads(model, x, 8, 400)
    se = ((g1.var(0) + g8.var(0)) / 400).sqrt()
    z = (g1.mean(0) - g8.mean(0)).abs() / se.clamp_min(1e-12)
    assert (z < 4.5).all(), z.max()  # equal means, within 4.5 standard errors for every coordinate
    ratio = g8.var(0).sum() / g1.var(0).sum()
    assert ratio < 0.25, ratio  # 1/8 expected


# --------------------------------------------------------------------------- the loop
def test_distillation_moves_the_student_towards_the_mc_average():
    torch.manual_seed(0)
    model, x = _confident(tiny_arch.tiny()), _inputs(96)
    result = distill(model, x, PRE, DistillConfig(epochs=15, lr_drop_epoch=10, lr=0.05, batch_size=32, perturb=0.0))
    torch.manual_seed(1)
    ref = mc_average(model, x, 500, probabilities)
    with torch.no_grad():
        before = kl_divergence(ref, F.softmax(model.eval()(x), 1)).mean()
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
    assert _same(a, b)
    c = distill(tiny_model, _inputs(), PRE, DistillConfig(epochs=2, batch_size=16, seed=4)).student
    assert not _same(a, c)


def test_global_rng_is_left_alone(tiny_model):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    distill(tiny_model, _inputs(16), PRE, DistillConfig(epochs=1))
    assert torch.equal(torch.rand(3), expected)


class Recording(nn.Module):
    """A student that keeps every batch it is given."""

    def __init__(self, model):
        super().__init__()
        self.model, self.seen = model, []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.model(x)


@pytest.mark.parametrize("flip, dim", [("", None), ("h", 3), ("v", 2)])
def test_flips_mirror_about_half_of_the_inputs_the_student_sees(tiny_model, flip, dim):
    x = _inputs(64)
    student = Recording(clone_model(tiny_model))
    distill(tiny_model, x, PRE, DistillConfig(epochs=2, batch_size=16, perturb=0.0, flip=flip), student=student)
    rows = torch.cat(student.seen[1:-1])  # (the first call is the input check, the last the finite-output check)
    assert len(rows) == 128
    plain = (rows[:, None] == x[None]).flatten(2).all(2).any(1)
    mirrored = (rows[:, None] == x.flip(dim)[None]).flatten(2).all(2).any(1) if dim else torch.zeros(128, dtype=torch.bool)
    assert (plain | mirrored).all()  # every input is an input of S, as it is or mirrored
    share = (mirrored & ~plain).float().mean().item()
    assert (share == 0.0) if not flip else (0.3 < share < 0.7), share


def test_fidelity_is_measured_on_held_out_inputs_and_early_stopping_keeps_the_best():
    torch.manual_seed(0)
    model = _confident(tiny_arch.tiny())
    events = []
    cfg = DistillConfig(epochs=20, lr=0.5, lr_drop_epoch=20, val_fraction=0.25, patience=2, batch_size=16, perturb=0.2)
    result = distill(model, _inputs(64), PRE, cfg, progress=events.append)
    fid = [r["fidelity"] for r in result.history]
    assert result.best_epoch == 1 + fid.index(min(fid))
    # this run stops before its last epoch, `patience` epochs after its best one, with the best weights
    assert len(result.history) < 20 and result.best_epoch == len(result.history) - 2
    assert fid[result.best_epoch - 1] < fid[0]
    assert {e["event"] for e in events} == {"step", "epoch"}
    assert sum(e["event"] == "step" for e in events) == len(result.history) * 3  # 48 training inputs / 16


def test_patience_needs_a_validation_split():
    with pytest.raises(UsageError, match="--val-fraction"):
        DistillConfig(patience=3)


def test_segmentation_outputs_and_named_outputs_distill():
    class Seg(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.drop, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Dropout2d(0.3), nn.Conv2d(4, 3, 1)

        def forward(self, x):
            return {"aux": x.mean(), "logits": self.head(self.drop(torch.relu(self.conv(x))))}

    torch.manual_seed(0)
    result = distill(Seg(), _inputs(16), PRE, DistillConfig(epochs=1, output="logits", class_dim=1))
    assert result.student(_inputs(2))["logits"].shape == (2, 3, 8, 8)
    with pytest.raises(ModelError, match="no tensor 'scores'"):
        distill(Seg(), _inputs(16), PRE, DistillConfig(epochs=1, output="scores"))


def test_regression_with_squared_error_moves_the_student_towards_the_mc_mean():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 2))
    with torch.no_grad():  # a dropout before a ReLU of large weights: E[f_sigma(x)] is far from f(x)
        model[4].weight.mul_(4)
        model[6].weight.mul_(4)
    x = _inputs(64)
    config = DistillConfig(epochs=20, lr=3e-3, optimizer="adam", teacher_samples=8, batch_size=16, perturb=0.0, loss="mse")
    result = distill(model, x, PRE, config)
    ref = mc_average(model, x, 4000)  # the MC mean of the outputs themselves
    with torch.no_grad():
        before = F.mse_loss(model.eval()(x), ref)
        after = F.mse_loss(result.student(x), ref)
    assert after < 0.4 * before, (before, after)  # measured: 0.071 -> 0.012


def test_model_without_dropout_is_refused():
    with pytest.raises(NoDropoutError):
        distill(tiny_arch.no_dropout(), _inputs(8), PRE)


def test_compile_without_a_cxx_compiler_is_a_clear_error(tiny_model, monkeypatch):
    """As in the slim image: inductor finds no C++ compiler, and --compile says so before the
    first step instead of failing inside it."""
    from torch._inductor import config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-compiler++",))
    with pytest.raises(UsageError, match="--compile needs a C\\+\\+ compiler"):
        distill(tiny_model, _inputs(8), PRE, DistillConfig(epochs=1, compile=True))


def test_inputs_that_do_not_fit_the_model(tiny_model):
    with pytest.raises(ModelError, match=r"failed on inputs of shape \(2, 1, 5, 5\)"):
        distill(tiny_model, torch.rand(8, 1, 5, 5), PRE)


@pytest.mark.parametrize("field, value", [("epochs", 0), ("lr", -1.0), ("teacher_samples", 0), ("perturb", 1.0),
                                          ("loss", "hinge"), ("optimizer", "lbfgs"), ("flip", "x")])
def test_invalid_settings(field, value):
    with pytest.raises(UsageError, match=field):
        DistillConfig(**{field: value})


def test_devices():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA is not available"):
            resolve_device("cuda:0")
    with pytest.raises(UsageError):
        resolve_device("tpu")


# --------------------------------------------------------------------------- safety
@pytest.mark.parametrize("done, saved", [(7, (1, 2)), (10, (1, 5))])  # mid-way through epoch 2; its last step
def test_interrupted_run_resumes_to_the_same_weights(tmp_path, tiny_model, done, saved):
    """An interruption at the last step of an epoch resumes into an empty rest of that epoch
    (which once made an empty batch and a NaN loss)."""
    cfg = DistillConfig(epochs=3, lr_drop_epoch=2, batch_size=8, seed=5)
    x = _inputs(40)
    whole = distill(tiny_model, x, PRE, cfg).student
    ckpt = tmp_path / "resume.pt"

    def interrupt(event):
        if event["event"] == "step" and event["done"] == done:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as info:
        distill(tiny_model, x, PRE, cfg, progress=interrupt, checkpoint=ckpt)
    assert info.value.exit_code == 130 and ckpt.exists()
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == saved
    resumed = distill(tiny_model, x, PRE, cfg, checkpoint=ckpt, resume=True).student
    assert _same(resumed, whole)
    assert not ckpt.exists()  # finished: nothing left to resume


def test_sigterm_exit_code_and_resume_guard(tmp_path, tiny_model):
    ckpt = tmp_path / "resume.pt"

    def terminate(event):
        if event["event"] == "step" and event["done"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(Interrupted) as info:
        distill(tiny_model, _inputs(32), PRE, DistillConfig(epochs=2, batch_size=8), progress=terminate, checkpoint=ckpt)
    assert info.value.exit_code == 143
    with pytest.raises(UsageError, match="batch_size was 8"):
        distill(tiny_model, _inputs(32), PRE, DistillConfig(epochs=2, batch_size=16), checkpoint=ckpt, resume=True)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model):
    ckpt = tmp_path / "resume.pt"
    student = clone_model(tiny_model)

    def poison(event):
        if event["event"] == "epoch" and event["epoch"] == 1:
            with torch.no_grad():
                student[0].weight.fill_(float("nan"))

    with pytest.raises(ModelError, match="last good checkpoint"):
        distill(tiny_model, _inputs(32), PRE, DistillConfig(epochs=3, batch_size=8), progress=poison,
                student=student, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["student"].values())


# --------------------------------------------------------------------------- data paths
def test_streamed_and_cached_folders_give_the_same_student(tmp_path, tiny_model):
    write_images(tmp_path / "s", 40)
    index = index_folder(tmp_path / "s", labelled=False)
    cfg = DistillConfig(epochs=2, batch_size=8)
    cached = open_unlabelled(index, PRE, list(range(40)), cache_mb=100)
    streamed = open_unlabelled(index, PRE, list(range(40)), cache_mb=0, workers=1)
    assert cached.cache is not None and cached.cache.dtype == torch.uint8 and streamed.cache is None
    a = distill(tiny_model, cached, PRE, cfg).student
    b = distill(tiny_model, streamed, PRE, cfg).student
    assert _same(a, b)


# --------------------------------------------------------------------------- no host synchronisation per step
#: The Tensor methods that read a value back to the host (on CUDA, each waits for the device).
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _host_reads(monkeypatch, run) -> dict[str, int]:
    """How many times ``run()`` calls each of :data:`HOST_READS` on a tensor."""
    counts = dict.fromkeys(HOST_READS, 0)
    with monkeypatch.context() as patch:
        for name in HOST_READS:
            def counted(self, *args, _name=name, _original=getattr(torch.Tensor, name), **kwargs):
                counts[_name] += 1
                return _original(self, *args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        run()
    return counts


def test_a_step_reads_nothing_back_from_the_device(monkeypatch, tiny_model):
    """The same run with 4 and with 16 steps per epoch, check points only at the end of each
    epoch: the host reads of the two are the same (the set-up's, the check points', the end's),
    so a step itself makes none. Images, so scaling, flips and zeroed pixels are on the path."""
    monkeypatch.setattr(distillation, "CHECK_EVERY", 1000)
    images = (torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)

    def run(batch):
        cfg = DistillConfig(epochs=2, batch_size=batch, teacher_samples=2, perturb=0.2, flip="hv")
        return _host_reads(monkeypatch, lambda: distill(tiny_model, images, PRE, cfg, progress=lambda e: None))

    few, many = run(16), run(4)
    assert many == few, f"host reads with 4 steps an epoch {few}, with 16 {many}"
    assert sum(few.values()) > 0  # the counting works: the check points read


def test_a_check_point_every_n_steps_reads_once(monkeypatch, tiny_model):
    """Check points every 2 steps: twice the check points, more reads; still none per step
    beyond them (8 steps an epoch against 4, as many check points per step)."""
    monkeypatch.setattr(distillation, "CHECK_EVERY", 2)
    x = _inputs(32)

    def reads(batch):
        cfg = DistillConfig(epochs=1, batch_size=batch, teacher_samples=2)
        return sum(_host_reads(monkeypatch, lambda: distill(tiny_model, x, PRE, cfg)).values())

    base = sum(_host_reads(monkeypatch, lambda: distill(tiny_model, x, PRE, DistillConfig(epochs=1, batch_size=32))).values())
    four, eight = reads(8) - base, reads(4) - base  # 2 and 4 check points, against the base run's 1
    assert eight == 3 * four and four > 0


def test_a_nan_mid_epoch_falls_back_at_most_n_steps(monkeypatch, tmp_path, tiny_model):
    """A NaN after step 3 is found at the check point of step 4; the run falls back to the state
    of step 2 (finite weights), writes it and stops with the documented error (exit 8)."""
    monkeypatch.setattr(distillation, "CHECK_EVERY", 2)
    student, ckpt = clone_model(tiny_model), tmp_path / "resume.pt"

    def poison(event):
        if event["event"] == "step" and event["done"] == 3:
            with torch.no_grad():
                student[0].weight.fill_(float("nan"))

    with pytest.raises(ModelError, match=r"NaN or infinite at epoch 1, between step 2 and step 4.*last good checkpoint"):
        distill(tiny_model, _inputs(64), PRE, DistillConfig(epochs=2, batch_size=8), progress=poison,
                student=student, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (0, 2)
    assert all(torch.isfinite(v).all() for v in state["student"].values())
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())  # restored in place too
    resumed = distill(tiny_model, _inputs(64), PRE, DistillConfig(epochs=2, batch_size=8, lr=0.005),
                      checkpoint=ckpt, resume=True)  # --resume with a lower rate continues from there
    assert len(resumed.history) == 2


def test_an_epoch_cut_short_is_still_checked(monkeypatch, tmp_path, tiny_model):
    """A streamed file that becomes unreadable after the folder was opened makes the epoch one
    step short of its count: its end is checked all the same (finite, stop requests), once."""
    monkeypatch.setattr(distillation, "CHECK_EVERY", 1000)
    write_images(tmp_path / "s", 12)
    index = index_folder(tmp_path / "s", labelled=False)
    streamed = open_unlabelled(index, PRE, list(range(12)), cache_mb=0, workers=0)
    (tmp_path / "s" / "img005.png").write_bytes(b"not a png any more")
    calls, original = [], distillation._check_point
    monkeypatch.setattr(distillation, "_check_point", lambda *args: calls.append(args[6]) or original(*args))
    distill(tiny_model, streamed, PRE, DistillConfig(epochs=1, batch_size=1))
    assert calls == [12]  # 11 steps taken, the epoch's end checked as its nominal last step


# --------------------------------------------------------------------------- schedule and the range test
def test_the_rate_drops_after_two_thirds_of_any_number_of_epochs():
    def rates(**kw):
        return [scheduled_lr(DistillConfig(**kw), e) for e in range(kw["epochs"])]

    assert rates(epochs=30).count(0.01) == 20 and rates(epochs=30)[20:] == [0.001] * 10  # the paper's 20 + 10
    assert rates(epochs=3) == [0.01, 0.01, 0.001] and rates(epochs=10).count(0.01) == 7
    assert rates(epochs=1) == [0.01]
    assert rates(epochs=5, lr_drop_epoch=1) == [0.01] + [0.001] * 4  # an explicit drop epoch still rules
    cosine = rates(epochs=6, schedule="cosine", lr=0.1)
    assert cosine[0] == 0.1 and all(a > b > 0 for a, b in zip(cosine, cosine[1:]))
    assert cosine[3] == pytest.approx(0.05)  # half-way: half the base rate


def test_lr_find_picks_a_candidate_and_leaves_the_run_as_it_would_be_at_that_rate(tiny_model):
    """The range test tries every candidate from the same start and puts everything back:
    the run after it equals a run given the chosen rate."""
    x = _inputs(600)
    cfg = DistillConfig(epochs=2, batch_size=16, seed=3, lr_find=True, perturb=0.2)
    found = distill(tiny_model, x, PRE, cfg)
    assert found.lr in LR_CANDIDATES and [t["lr"] for t in found.lr_search] == list(LR_CANDIDATES)
    best = min(found.lr_search, key=lambda t: t["fidelity"])
    assert best["lr"] == found.lr and all(t["fidelity"] >= 0 for t in found.lr_search)
    plain = distill(tiny_model, x, PRE, DistillConfig(epochs=2, batch_size=16, seed=3, lr=found.lr, perturb=0.2))
    assert _same(found.student, plain.student) and plain.lr == found.lr and not plain.lr_search
    assert [h["lr"] for h in found.history] == [found.lr, found.lr / 10]


def test_a_resumed_lr_find_run_keeps_its_rate_and_old_states_still_resume(tmp_path, tiny_model):
    x, ckpt = _inputs(600), tmp_path / "resume.pt"
    cfg = DistillConfig(epochs=2, batch_size=16, seed=1, lr_find=True)
    whole = distill(tiny_model, x, PRE, cfg)

    def interrupt(event):
        if event["event"] == "step" and event["done"] == 40:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        distill(tiny_model, x, PRE, cfg, progress=interrupt, checkpoint=ckpt)
    assert torch.load(ckpt, weights_only=True)["lr"] == whole.lr
    resumed = distill(tiny_model, x, PRE, cfg, checkpoint=ckpt, resume=True, progress=lambda e: e["event"] != "lr_find" or 1 / 0)
    assert _same(resumed.student, whole.student) and resumed.lr == whole.lr
    # a state written before --schedule and --lr-find existed resumes with their defaults
    plain = DistillConfig(epochs=2, batch_size=16, seed=1)
    with pytest.raises(Interrupted):
        distill(tiny_model, x, PRE, plain, progress=interrupt, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    for key in ("schedule", "lr_find"):
        del state["config"][key]
    del state["lr"], state["lr_search"]
    torch.save(state, ckpt)
    assert _same(distill(tiny_model, x, PRE, plain, checkpoint=ckpt, resume=True).student,
                 distill(tiny_model, x, PRE, plain).student)
