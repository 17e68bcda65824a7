"""The networks of the benchmarks, for 28x28 grayscale inputs (Fashion-MNIST).

LeNet and LeNetAll follow the paper's MNIST rows (Bulo et al. 2016, Sec. 5.1): Caffe's LeNet
(conv 20 -> pool -> conv 50 -> pool -> fc 500 -> fc 10) with dropout either only before the
last layer, or after every conv and fc layer but the last (after the pooling). Quick is the
sample's architecture (samples/quick.py): dropout before every max-pool, where standard and MC
dropout differ most.
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "samples"))
from quick import quick  # noqa: E402


def lenet(p: float = 0.5, num_classes: int = 10) -> nn.Sequential:
    """LeNet with dropout only before the last layer."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2),            # 28 -> 24 -> 12
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),           # 12 -> 8 -> 4
        nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
        nn.Dropout(p), nn.Linear(500, num_classes),
    )


def lenet_all(p: float = 0.5, num_classes: int = 10) -> nn.Sequential:
    """LeNetAll: dropout after every conv and fc layer but the last (after the pooling)."""
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Dropout(p),
        nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Dropout(p),
        nn.Flatten(), nn.Linear(50 * 4 * 4, 500), nn.ReLU(),
        nn.Dropout(p), nn.Linear(500, num_classes),
    )


NETS = {"lenet": lenet, "lenet_all": lenet_all, "quick": quick}
