"""Shared fixtures: tiny seeded models saved as checkpoints, and tiny image folders in tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_arch

TESTS = Path(__file__).parent

# The models here are tiny: a second intra-op thread only adds OpenMP barriers, which cost
# milliseconds per op on a busy machine. Subprocesses (the CLI, torchrun) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
ARCH = f"{TESTS / 'tiny_arch.py'}:tiny"
NO_DROPOUT_ARCH = f"{TESTS / 'tiny_arch.py'}:no_dropout"


def write_images(folder: Path, n: int, seed: int = 0, size: int = 8, mode: str = "L") -> list[Path]:
    """``n`` random ``size`` x ``size`` PNGs in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = (size, size) if mode == "L" else (size, size, 3)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(path)
        paths.append(path)
    return paths


def save_tiny_teacher(folder: Path) -> Path:
    """The seeded tiny teacher's state dict saved as ``folder/teacher.pt`` (for module-scoped fixtures)."""
    torch.manual_seed(0)
    torch.save(tiny_arch.tiny().state_dict(), folder / "teacher.pt")
    return folder / "teacher.pt"


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return tiny_arch.tiny()


@pytest.fixture
def tiny_ckpt(tmp_path, tiny_model) -> Path:
    path = tmp_path / "teacher.pt"
    torch.save(tiny_model.state_dict(), path)
    return path


@pytest.fixture
def no_dropout_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "plain.pt"
    torch.save(tiny_arch.no_dropout().state_dict(), path)
    return path


@pytest.fixture
def unlabelled(tmp_path) -> Path:
    write_images(tmp_path / "unlabelled", 48)
    return tmp_path / "unlabelled"


@pytest.fixture
def labelled(tmp_path) -> Path:
    root = tmp_path / "labelled"
    for c in range(3):
        write_images(root / f"{c}_class", 10, seed=10 + c)
    return root
