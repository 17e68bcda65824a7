"""On a CUDA device: bf16 autocast, channels_last, no host synchronisation in a step, streamed
batches through pinned memory, and an exact --resume (the CUDA generator's state is saved).

Skipped without CUDA; ``benchmarks/gpu.py`` runs them first (``pytest -m cuda``). The CPU side
of the same code paths (the state's structure, the step's host reads) is tested in
tests/test_distill.py and here below the CUDA tests.
"""

import os
import signal

import pytest
import torch
from torch import nn

import tiny_arch
from conftest import write_images
from ddtool import distillation
from ddtool.data import Preprocess, index_folder, open_unlabelled
from ddtool.distillation import DistillConfig, distill
from ddtool.errors import CheckpointError
from ddtool.resume import Interrupted, device_rng_state, set_device_rng_state

PRE = Preprocess()


def _images(n=64, seed=0):
    return (torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def _mlp() -> nn.Sequential:
    """Dropout and linear layers only: every CUDA kernel it runs is deterministic."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.5), nn.Linear(32, 3))


class _Recorder(nn.Module):
    """Wraps a student and records the dtype and memory layout of what it sees and gives."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.seen = inner, []

    def forward(self, x):
        out = self.inner(x)
        if torch.is_grad_enabled():  # the training steps, not the checks
            self.seen.append((x.is_contiguous(memory_format=torch.channels_last), out.dtype, x.device.type))
        return out


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_steps_run_in_bf16_and_channels_last():
    teacher = tiny_arch.tiny()
    student = _Recorder(tiny_arch.tiny())
    student.inner.load_state_dict(teacher.state_dict())
    distill(teacher, _images(), PRE, DistillConfig(epochs=1, batch_size=16, device="cuda"), student=student)
    assert student.seen and all(s == (True, torch.bfloat16, "cuda") for s in student.seen), student.seen[:3]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_step_synchronises_with_the_host(monkeypatch):
    """torch.cuda.set_sync_debug_mode("error") around every step: any synchronising call
    (.item(), a pageable copy, a boolean mask) raises. Check points are outside the steps."""
    original = distillation._step

    def strict(run, raw):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return original(run, raw)
        finally:
            torch.cuda.set_sync_debug_mode(0)

    monkeypatch.setattr(distillation, "_step", strict)
    cfg = DistillConfig(epochs=2, batch_size=8, teacher_samples=4, perturb=0.2, flip="hv", device="cuda")
    result = distill(tiny_arch.tiny(), _images(), Preprocess(mean=(0.5,), std=(0.25,)), cfg)
    assert len(result.history) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_streamed_batches_come_through_pinned_memory(tmp_path):
    """A streamed folder on CUDA (DataLoader with pinned memory, copied one batch ahead on a side
    stream) gives the student a cached one gives."""
    write_images(tmp_path / "s", 40)
    index = index_folder(tmp_path / "s", labelled=False)
    cached = open_unlabelled(index, PRE, list(range(40)), cache_mb=100)
    streamed = open_unlabelled(index, PRE, list(range(40)), cache_mb=0, workers=1)
    batches = list(streamed.batches(torch.arange(40), 8, torch.device("cuda")))
    assert all(b.device.type == "cuda" and b.dtype == torch.uint8 for b in batches)
    cfg = DistillConfig(epochs=1, batch_size=8, device="cuda")
    a = distill(_mlp(), cached, PRE, cfg).student
    b = distill(_mlp(), streamed, PRE, cfg).student
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_resume_on_cuda_is_exact(tmp_path):
    """Interrupted mid-epoch on CUDA and resumed: the same weights as the run left alone. The
    masks come from the CUDA generator, so this holds only because its state is saved."""
    cfg = DistillConfig(epochs=2, batch_size=8, seed=3, device="cuda", perturb=0.2)
    x = _images(40)
    whole = distill(_mlp(), x, PRE, cfg).student
    ckpt = tmp_path / "resume.pt"

    def interrupt(event):
        if event["event"] == "step" and event["done"] == 7:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        distill(_mlp(), x, PRE, cfg, progress=interrupt, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert (state["epoch"], state["step"]) == (1, 2) and state["device_rng"][0] is not None
    resumed = distill(_mlp(), x, PRE, cfg, checkpoint=ckpt, resume=True).student
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))


# --------------------------------------------------------------------------- the same paths on the CPU
def test_the_device_generator_state_is_saved_per_rank(tmp_path):
    """The resumable state has one device random state per rank: None on the CPU (whose
    generator is the saved ``rng``), a byte tensor on CUDA; a state of another type is refused."""
    ckpt = tmp_path / "resume.pt"

    def interrupt(event):
        if event["event"] == "step" and event["done"] == 2:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        distill(_mlp(), _images(32), PRE, DistillConfig(epochs=2, batch_size=8), progress=interrupt, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["device_rng"] == [None] and len(state["rng"]) == 1
    assert device_rng_state(torch.device("cpu")) is None
    set_device_rng_state(torch.device("cpu"), torch.zeros(16, dtype=torch.uint8))  # another device's: ignored
    state["device_rng"] = ["not a tensor"]
    torch.save(state, ckpt)
    with pytest.raises(CheckpointError, match="device random state"):
        distill(_mlp(), _images(32), PRE, DistillConfig(epochs=2, batch_size=8), checkpoint=ckpt, resume=True)
    for device_rng in ([torch.zeros(16, dtype=torch.uint8)], None):  # a CUDA run's resumed on the CPU; an older state
        state["device_rng"] = device_rng
        torch.save(state, ckpt)
        assert len(distill(_mlp(), _images(32), PRE, DistillConfig(epochs=2, batch_size=8), checkpoint=ckpt,
                           resume=True, keep_checkpoint=True).history) == 2
