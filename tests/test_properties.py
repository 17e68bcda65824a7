"""Property-based tests: the checkpoint sniffer and the folder reader, fed random bytes and names,
either succeed or raise ddtool's own error, never anything else."""

import shutil
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ARCH
from ddtool.checkpoint import load_model, sniff_format
from ddtool.data import ARRAY_EXTS, IMAGE_EXTS, Preprocess, read_folder
from ddtool.errors import DDToolError

PROFILE = settings(max_examples=int(__import__("os").environ.get("DDTOOL_HYPOTHESIS_EXAMPLES", 60)), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
HEADS = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", b"\x08", b"{", b"\x89PNG\r\n\x1a\n"])
NAMES = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\\x00"), min_size=1, max_size=30)


@PROFILE
@given(head=HEADS, body=st.binary(max_size=2048))
def test_sniffer_and_loader_never_crash(head, body):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ckpt"
        path.write_bytes(head + body)
        try:
            assert sniff_format(path) in {"torchscript", "torch-zip", "torch-legacy", "safetensors", "torch-export"}
        except DDToolError:
            pass
        try:
            load_model(path, arch=ARCH)
        except DDToolError:
            pass


@PROFILE
@given(files=st.lists(st.tuples(NAMES, st.sampled_from(IMAGE_EXTS + ARRAY_EXTS + (".txt", "")), HEADS,
                                st.binary(max_size=512)), max_size=8))
def test_folder_reader_never_crashes(files):
    tmp = Path(tempfile.mkdtemp())
    try:
        for name, ext, head, body in files:
            if name in (".", ".."):
                continue
            try:
                (tmp / (name + ext)).write_bytes(head + body)
            except OSError:  # a name the filesystem refuses (too long in bytes, say)
                continue
        try:
            inputs = read_folder(tmp, Preprocess())
            assert len(inputs) >= 1 and isinstance(inputs.x, torch.Tensor)
        except DDToolError:
            pass
    finally:
        shutil.rmtree(tmp)


# --------------------------------------------------------------------------- every numeric option
import json as _json
import re as _re

import pytest
from typer.testing import CliRunner

from conftest import save_tiny_teacher, write_images
from ddtool.cli import app

README_CODES = {int(c) for c in _re.findall(r"^\| (\d+) \|", (Path(__file__).parent.parent / "README.md").read_text(), _re.M)}
BIG = 2**70


def _ints(lo: int, hi: int, cheap: int | None = None):
    """Integers on both sides of [lo, hi]; inside it, only up to ``cheap`` (a large valid epoch
    count is a long run, not a parser case), plus the edges and text that is no integer."""
    inside = st.integers(lo, min(hi, lo + 64 if cheap is None else cheap))
    return st.one_of(st.integers(-BIG, lo - 1), st.integers(hi + 1, BIG), inside,
                     st.sampled_from([lo, lo - 1, hi + 1, 0, -1])).map(str) | st.sampled_from(["", "x", "1e3", "1.5", "nan"])


def _floats(lo: float, hi: float):
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(lo, hi),
                     st.sampled_from([lo, hi, float("nan"), float("inf"), -float("inf"), 1e308, -0.0])).map(repr) \
        | st.sampled_from(["", "x", "1,2"])


def _number_lists(numbers, max_size: int = 4):
    return st.lists(numbers, min_size=0, max_size=max_size).map(lambda xs: ",".join(map(str, xs)))


SIZES = _number_lists(st.one_of(st.integers(-3, 40), st.integers(-BIG, BIG)), 3)
STATS = _number_lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 2)), 4)
PREPROCESS = {"--channels": _ints(1, 3), "--size": SIZES, "--mean": STATS, "--std": STATS}

#: Every numeric option of every command, with values on both sides of its range.
OPTIONS = {
    "distill": {"--epochs": _ints(1, 100_000, 2), "--lr": _floats(0, 10), "--lr-drop-epoch": _ints(0, 100_000),
                "--momentum": _floats(0, 1), "--weight-decay": _floats(0, 10), "--batch-size": _ints(1, 1_000_000),
                "--teacher-samples": _ints(1, 10_000, 4), "--class-dim": _ints(-8, 8), "--perturb": _floats(0, 1),
                "--val-fraction": _floats(0, 1), "--patience": _ints(0, 100_000), "--seed": _ints(0, 2**32 - 1),
                "--workers": _ints(0, 64, 1), "--cache-mb": _floats(0, 1e9), **PREPROCESS},
    "evaluate": {"--mc-samples": _ints(1, 1_000_000, 3), "--repeats": _ints(1, 10_000, 2),
                 "--batch-size": _ints(1, 1_000_000), "--seed": _ints(0, 2**32 - 1), **PREPROCESS},
    "export": {"--atol": _floats(0, 1e6), "--opset": _ints(7, 100), "--input-shape": SIZES},
    "predict": {"--top-k": _ints(1, 1_000_000), "--batch-size": _ints(1, 1_000_000), **PREPROCESS},
    "inspect": {"--input-shape": SIZES, **PREPROCESS},
}
CHOICES = [(command, option) for command, options in OPTIONS.items() for option in options]


@pytest.fixture(scope="module")
def cli_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    save_tiny_teacher(root)
    write_images(root / "images", 6)
    for c in range(3):
        write_images(root / "labelled" / f"{c}_class", 2, seed=c)
    return root


def _base(command: str, root: Path) -> list[str]:
    teacher = [str(root / "teacher.pt"), "--arch", ARCH]
    return {
        "distill": ["distill", *teacher, "--data", str(root / "images"), "--out", str(root / "out"), "--epochs", "1",
                    "--force"],
        "evaluate": ["evaluate", *teacher, "--data", str(root / "labelled"), "--mc-samples", "2", "--no-timing"],
        "export": ["export", *teacher, "--input-shape", "1,8,8", "--format", "torchscript", "--out", str(root / "m.ts"),
                   "--force"],
        "predict": ["predict", *teacher, "--data", str(root / "images")],
        "inspect": ["inspect", *teacher],
    }[command]


@pytest.mark.slow
@settings(max_examples=int(__import__("os").environ.get("DDTOOL_HYPOTHESIS_EXAMPLES", 40)), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_every_numeric_option_ends_in_success_or_a_documented_error(cli_world, data):
    command, option = data.draw(st.sampled_from(CHOICES), label="option")
    value = data.draw(OPTIONS[command][option], label="value")
    result = CliRunner().invoke(app, [*_base(command, cli_world), f"{option}={value}"])
    assert result.exit_code != 1 and result.exit_code in README_CODES, (result.exit_code, result.stderr)
    assert "Traceback" not in result.output
    if result.exit_code:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and lines[-1] == errors[0] and "\x1b" not in result.stderr, result.stderr
    if result.exit_code == 0 and "--json" in result.output:
        _json.loads(result.stdout)
