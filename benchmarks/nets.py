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

import torch
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


class ViT(nn.Module):
    """A timm-like Vision Transformer: patch embedding (a strided conv), a class token, learned
    positions, pre-norm encoder layers with dropout after attention and in the MLP (and on the
    attention weights), a linear head on the class token. The defaults are ViT-B/16 at 224 x 224
    (86 M parameters, 197 tokens), the "ViT-sized net" of benchmarks/gpu.py."""

    def __init__(self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 classes: int = 1000, channels: int = 3, p: float = 0.1):
        super().__init__()
        self.embed = nn.Conv2d(channels, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2 + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=p, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def vit_base(**kwargs) -> ViT:
    return ViT(**kwargs)


NETS = {"lenet": lenet, "lenet_all": lenet_all, "quick": quick}
