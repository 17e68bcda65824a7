"""Tiny seeded architectures for the tests; each is used as ``--arch tests/tiny_arch.py:NAME``."""

from torch import nn


def tiny(p: float = 0.5, classes: int = 3, channels: int = 1) -> nn.Sequential:
    """An 8x8 conv net with dropout before a max-pool and before the classifier."""
    return nn.Sequential(
        nn.Conv2d(channels, 6, 3, padding=1), nn.ReLU(), nn.Dropout(p), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Dropout(p), nn.Linear(16, classes),
    )


def no_dropout(classes: int = 3) -> nn.Sequential:
    """The same network without dropout: nothing to distill."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, classes),
    )


def broken():
    """A factory that raises, as a user's factory might."""
    raise ValueError("unknown width 7")


def narrow(classes: int = 3) -> nn.Sequential:
    """A smaller student for ``tiny``: the same convolution, a narrower hidden layer."""
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Dropout(0.5), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 4), nn.ReLU(), nn.Dropout(0.5), nn.Linear(4, classes),
    )


class Functional(nn.Module):
    """Dropout written as a function call, gated by self.training: found only by running the model."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Linear(6 * 8 * 8, classes)

    def forward(self, x):
        return self.fc(nn.functional.dropout(self.conv(x).relu(), 0.5, self.training).flatten(1))


def functional(classes: int = 3) -> nn.Module:
    return Functional(classes)


class Tagger(nn.Module):
    """One prediction per image row: (N, 8 rows, classes) outputs, the class axis 2."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv, self.drop, self.fc = nn.Conv2d(1, 6, 3, padding=1), nn.Dropout(0.5), nn.Linear(6 * 8, classes)

    def forward(self, x):
        h = self.drop(self.conv(x).relu())  # (N, 6, 8, 8)
        return self.fc(h.permute(0, 2, 1, 3).flatten(2))  # (N, 8, classes)


def tagger(classes: int = 3) -> nn.Module:
    return Tagger(classes)


def wide(classes: int = 3) -> nn.Sequential:
    """A conv net for any image size (global pooling), wide enough that its activations are large."""
    return nn.Sequential(
        nn.Conv2d(1, 64, 3, padding=1), nn.ReLU(), nn.Dropout(0.5),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )


def linear(classes: int = 3) -> nn.Sequential:
    """A linear classifier of 8x8 images, with dropout on its inputs."""
    return nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, classes))
