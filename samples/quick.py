"""The sample architecture: a cuda-convnet "Quick"-style network for 28x28 grayscale inputs.

Three 5x5 convolutions (32, 32, 64 filters) and two fully connected layers (64, 10), as in
cuda-convnet's / Caffe's ``cifar10_quick``. Dropout follows every conv and fc layer except the
last, and sits *before* the pooling, as in the "CIFAR10 Quick" row of Bulo et al. (2016),
Table 1. With a max-pool after a dropout layer the scaling rule of standard dropout is a poor
approximation of the ensemble average (E[max] != max of E), which is exactly where MC dropout,
and therefore dropout distillation, pays off.

Used as ``--arch samples/quick.py:quick``.
"""

from torch import nn


def quick(num_classes: int = 10, in_channels: int = 1, p: float = 0.5, width: int = 32, pool: str = "max") -> nn.Sequential:
    """Build the Quick network; ``p`` is the dropout rate of every dropout layer.

    ``pool="max"`` max-pools after every conv; ``"quick"`` follows cifar10_quick (max, avg, avg).
    """
    w = width

    def pooling(i):
        return nn.MaxPool2d(3, stride=2, padding=1) if pool == "max" or i == 0 else nn.AvgPool2d(3, stride=2, padding=1)

    return nn.Sequential(
        nn.Conv2d(in_channels, w, 5, padding=2), nn.ReLU(), nn.Dropout(p), pooling(0),  # 28 -> 14
        nn.Conv2d(w, w, 5, padding=2), nn.ReLU(), nn.Dropout(p), pooling(1),            # 14 -> 7
        nn.Conv2d(w, 2 * w, 5, padding=2), nn.ReLU(), nn.Dropout(p), pooling(2),        # 7 -> 4
        nn.Flatten(),
        nn.Linear(2 * w * 4 * 4, 64), nn.ReLU(), nn.Dropout(p),
        nn.Linear(64, num_classes),
    )
