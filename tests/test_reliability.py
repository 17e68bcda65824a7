"""The bad-input matrix: every case drives the CLI and must end in one clear line on stderr, a
non-zero exit code from the README's table, no traceback, unchanged inputs, and no partial output.

Permission cases run the CLI as an unprivileged user when the tests run as root (root reads and
writes through any mode bits). Interruption cases run the CLI as a separate process and signal it.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import tiny_arch
from conftest import ARCH, NO_DROPOUT_ARCH, TESTS, write_images
from ddtool.cli import app

ROOT = TESTS.parent
README_CODES = {int(c) for c in re.findall(r"^\| (\d+) \|", (ROOT / "README.md").read_text(), re.M)}
DDTOOL = [sys.executable, "-m", "ddtool"]
runner = CliRunner()


def _hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _check_failure(code: int, stderr: str, output: str, expected_code: int, fragment: str) -> None:
    assert code == expected_code, f"exit {code}, expected {expected_code}: {stderr}"
    assert code in README_CODES, f"exit code {code} is not in the README's table"
    lines = [line for line in stderr.strip().splitlines() if line]
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last thing said; progress lines of work done before it may precede it
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert fragment in errors[0], errors[0]
    assert "Traceback" not in output + stderr


class World:
    """A tmp folder with inputs (in/) and outputs (out/), and a hash of the inputs."""

    def __init__(self, root: Path):
        self.root, self.inp, self.out = root, root / "in", root / "out"
        self.inp.mkdir()
        torch.manual_seed(0)
        self.ckpt = self.inp / "teacher.pt"
        torch.save(tiny_arch.tiny().state_dict(), self.ckpt)
        write_images(self.inp / "images", 24)

    def run(self, *args):
        before = _hashes(self.inp)
        result = runner.invoke(app, [str(a) for a in args])
        assert _hashes(self.inp) == before, "an input was modified"
        return result

    def expect_failure(self, args, code, fragment):
        result = self.run(*args)
        _check_failure(result.exit_code, result.stderr, result.output, code, fragment)
        leftovers = [p for p in self.out.rglob("*") if p.is_file()] if self.out.exists() else []
        assert not leftovers, f"partial output left behind: {leftovers}"


@pytest.fixture
def world(tmp_path) -> World:
    return World(tmp_path)


def distill_args(w: World, ckpt=None, data=None, arch=ARCH, *extra):
    return ["distill", ckpt or w.ckpt, "--arch", arch, "--data", data or w.inp / "images", "--out", w.out,
            "--epochs", 1, *extra]


# --------------------------------------------------------------------------- checkpoints
def _write(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    return path


class Evil:
    def __reduce__(self):
        return (os.makedirs, (str(Path.cwd() / "PWNED"),))


CHECKPOINT_CASES = {
    "missing": (lambda w: w.inp / "nope.pt", 3, "checkpoint not found"),
    "empty": (lambda w: _write(w.inp / "empty.pt", b""), 3, "is empty"),
    "truncated": (lambda w: _write(w.inp / "cut.pt", w.ckpt.read_bytes()[:300]), 3, "damaged or truncated"),
    "text file": (lambda w: _write(w.inp / "notes.pt", b"these are my notes\n"), 3, "not a format ddtool reads"),
    "random bytes": (lambda w: _write(w.inp / "noise.pt", np.random.default_rng(0).bytes(4096)), 3, "not a format ddtool reads"),
    "state dict not fitting --arch": (
        lambda w: (torch.save(tiny_arch.tiny(classes=5).state_dict(), w.inp / "five.pt"), w.inp / "five.pt")[1],
        3, "does not fit --arch"),
    "pickled module without --trust-checkpoint": (
        lambda w: (torch.save(tiny_arch.tiny(), w.inp / "full.pt"), w.inp / "full.pt")[1], 3, "--trust-checkpoint"),
}


@pytest.mark.parametrize("case", sorted(CHECKPOINT_CASES))
def test_bad_checkpoints(world, case):
    make, code, fragment = CHECKPOINT_CASES[case]
    world.expect_failure(distill_args(world, make(world)), code, fragment)


def test_malicious_pickle_runs_nothing(world, monkeypatch):
    monkeypatch.chdir(world.root)
    path = world.inp / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"weights": Evil()}, f, protocol=2)
    world.expect_failure(distill_args(world, path), 3, "pickled Python objects")
    torch.save({"weights": Evil()}, world.inp / "evil_zip.pt")
    world.expect_failure(distill_args(world, world.inp / "evil_zip.pt"), 3, "pickled Python objects")
    assert not (world.root / "PWNED").exists()


def test_model_without_dropout(world):
    torch.save(tiny_arch.no_dropout().state_dict(), world.inp / "plain.pt")
    world.expect_failure(distill_args(world, world.inp / "plain.pt", None, NO_DROPOUT_ARCH), 4, "no active dropout")


@pytest.mark.parametrize("arch, fragment", [
    ("nowhere/net.py:build", "--arch file not found"),
    (f"{TESTS / 'tiny_arch.py'}:missing", "no callable named 'missing'"),
    (f"{TESTS / 'tiny_arch.py'}:broken", "the factory raised ValueError"),
])
def test_bad_arch(world, arch, fragment):
    world.expect_failure(distill_args(world, None, None, arch), 3, fragment)


# --------------------------------------------------------------------------- data
def _folder(w: World, name: str) -> Path:
    (w.inp / name).mkdir()
    return w.inp / name


def _mixed_bad(w: World, bad: int) -> Path:
    folder = _folder(w, "mixed")
    write_images(folder, 20)
    good = (folder / "img000.png").read_bytes()
    makers = [lambda p: p.write_bytes(b""), lambda p: p.write_bytes(good[: len(good) // 2]),
              lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(50))]
    for i in range(bad):
        makers[i % 3](folder / f"bad{i}.png")
    return folder


def _sizes(w: World) -> Path:
    folder = _folder(w, "sizes")
    write_images(folder, 3, size=8)
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(folder / "big.png")
    return folder


def _nan(w: World) -> Path:
    folder = _folder(w, "arrays")
    np.save(folder / "a.npy", np.zeros((1, 8, 8), np.float32))
    np.save(folder / "b.npy", np.full((1, 8, 8), np.nan, np.float32))
    return folder


DATA_CASES = {
    "empty folder": (lambda w: _folder(w, "empty"), 5, "no readable inputs"),
    "only non-input files": (lambda w: (_folder(w, "docs"), (w.inp / "docs" / "a.txt").write_text("x"))[0], 5, "no readable inputs"),
    "too many corrupt images": (lambda w: _mixed_bad(w, 6), 5, "are unreadable (more than 10%)"),
    "images of different sizes": (_sizes, 5, "--size"),
    "npy holding NaN": (_nan, 5, "NaN or infinite"),
    "missing folder": (lambda w: w.inp / "nowhere", 5, "data folder not found"),
}


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_data(world, case):
    make, code, fragment = DATA_CASES[case]
    world.expect_failure(distill_args(world, None, make(world)), code, fragment)


def test_a_few_corrupt_images_are_skipped_with_a_count(world):
    result = world.run(*distill_args(world, None, _mixed_bad(world, 2)))
    assert result.exit_code == 0, result.output
    assert "warning: skipped 2 unreadable file(s) of 22" in result.stderr


@pytest.mark.parametrize("mode, channels", [("L", 3), ("RGB", 1)])
def test_grayscale_and_rgb_are_converted_to_what_the_model_takes(world, mode, channels):
    folder = _folder(world, mode)
    write_images(folder, 8, mode=mode)
    torch.save(tiny_arch.tiny(channels=channels).state_dict(), world.inp / "c.pt")
    result = world.run(*distill_args(world, world.inp / "c.pt", folder, ARCH, "--arch-args", f'{{"channels": {channels}}}'))
    assert result.exit_code == 0, result.output
    assert (world.out / "model.pt").is_file()


# --------------------------------------------------------------------------- outputs
def test_existing_output_needs_force(world):
    world.out.mkdir()
    (world.out / "model.pt").write_bytes(b"previous result")
    result = world.run(*distill_args(world))
    _check_failure(result.exit_code, result.stderr, result.output, 6, "--force")
    assert (world.out / "model.pt").read_bytes() == b"previous result"


def test_full_disk_half_way_keeps_the_previous_output(world, monkeypatch):
    assert world.run(*distill_args(world)).exit_code == 0
    previous = (world.out / "model.pt").read_bytes()
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if Path(f).name.startswith(".model.pt."):
            Path(f).write_bytes(b"half a bundle")
            raise OSError(28, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    result = world.run(*distill_args(world, None, None, ARCH, "--force"))
    _check_failure(result.exit_code, result.stderr, result.output, 6, "No space left on device")
    assert (world.out / "model.pt").read_bytes() == previous
    assert sorted(p.name for p in world.out.iterdir()) == ["history.json", "model.pt"]


def _without_root_powers(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` so that file mode bits apply: as root, without the capabilities that let root
    read and write through them (root's own files stay usable through their owner bits)."""
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without util-linux setpriv: mode bits cannot be enforced")
        cmd = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
def test_unreadable_checkpoint(world):
    before = _hashes(world.inp)
    world.ckpt.chmod(0o000)
    try:
        result = _without_root_powers([*DDTOOL, *map(str, distill_args(world))], world.root)
    finally:
        world.ckpt.chmod(0o644)
    _check_failure(result.returncode, result.stderr, result.stdout, 3, "not readable (permission denied)")
    assert _hashes(world.inp) == before and not world.out.exists()


@pytest.mark.slow
def test_unwritable_output_folder(world):
    locked = world.root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        args = [*map(str, distill_args(world)[:-4]), "--out", str(locked / "out"), "--epochs", "1"]
        result = _without_root_powers([*DDTOOL, *args], world.root)
    finally:
        locked.chmod(0o755)
    _check_failure(result.returncode, result.stderr, result.stdout, 6, "locked")
    assert not any(locked.iterdir())


# --------------------------------------------------------------------------- interruption
def _start(args: list, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([*DDTOOL, *map(str, args)], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 120) -> str:
    seen, deadline = "", time.time() + timeout
    while time.time() < deadline:
        line = proc.stderr.readline()
        seen += line
        if text in line:
            return seen
        if not line and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"never saw {text!r}: {seen}")


@pytest.mark.slow
def test_sigint_writes_a_resumable_checkpoint_and_resume_finishes(world):
    args = distill_args(world)[:-2] + ["--epochs", 200, "--batch-size", 4]
    proc = _start(args, world.root)
    _wait_for(proc, "epoch 1/200")
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    _check_failure(proc.returncode, stderr, "", 130, "--resume")
    assert (world.out / "resume.pt").is_file() and not (world.out / "model.pt").exists()
    state = torch.load(world.out / "resume.pt", weights_only=True)
    assert state["epoch"] >= 1
    resume = [*args[:-4], "--epochs", state["epoch"] + 1, "--batch-size", 4, "--resume"]
    done = subprocess.run([*DDTOOL, *map(str, resume)],
                          cwd=world.root, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert (world.out / "model.pt").is_file() and not (world.out / "resume.pt").exists()


SLOW_WRITER = """
import sys, time, torch
real_save = torch.save
def slow_save(obj, f, *a, **k):
    real_save(obj, f, *a, **k)
    if str(f).endswith(".tmp") and ".resume.pt." in str(f):
        print("writing checkpoint", file=sys.stderr, flush=True)
        time.sleep(30)   # the window in which the test kills us
torch.save = slow_save
from ddtool.cli import main
sys.argv = ["ddtool"] + sys.argv[1:]
main()
"""


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_the_previous_one(world):
    script = world.root / "slow_writer.py"
    script.write_text(SLOW_WRITER)
    args = distill_args(world)[:-2] + ["--epochs", 5, "--batch-size", 4]
    # a first, finished epoch leaves a good checkpoint; the second write is killed half-way
    world.out.mkdir()
    good = {"ddtool_resume": 1, "marker": "previous"}
    torch.save(good, world.out / "resume.pt")
    proc = subprocess.Popen([sys.executable, str(script), *map(str, args), "--force"], cwd=world.root,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    _wait_for(proc, "writing checkpoint")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert torch.load(world.out / "resume.pt", weights_only=True) == good  # the previous checkpoint, intact
    stale = list(world.out.glob(".resume.pt.*.tmp"))
    assert stale, "the killed writer's temporary file is what a SIGKILL leaves"
    # the next write cleans up what the killed process could not
    from ddtool.files import write_text

    write_text(world.out / "resume.pt", "x", force=True)
    assert not list(world.out.glob(".resume.pt.*.tmp"))
