"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx.gz files), as tensors.

Used by ``make_samples.py`` and the benchmarks; ddtool itself never reads these files.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (big-endian dims after a 4-byte magic whose last byte is the rank)."""
    with gzip.open(path) as f:
        data = f.read()
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * rank).reshape(dims).copy()


def load(split: str, root: Path = ROOT) -> tuple[np.ndarray, torch.Tensor]:
    """(uint8 images (N, 28, 28), int64 labels (N,)) of the ``train`` or ``test`` split."""
    images, labels = (root / name for name in FILES[split])
    if not images.exists():
        raise SystemExit(f"{images} not found: install it with `apt-get install dataset-fashion-mnist`")
    return read_idx(images), torch.from_numpy(read_idx(labels).astype(np.int64))


def as_float(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [0, 1], the sample model's input."""
    return torch.from_numpy(images).float().div_(255).unsqueeze(1)
