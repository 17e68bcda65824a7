"""Tiny models written the way timm writes them (timm itself does not import beside torch 2.13):
each is used as ``--arch tests/timm_like.py:NAME`` on 3-channel 16x16 images.

  vit            patch embedding, class token, attention through ``F.scaled_dot_product_attention``
                 with ``dropout_p=self.attn_drop if self.training else 0.``, DropPath, Dropout
  resnet         conv stem with BatchNorm, a residual block, ``F.dropout`` in the head
  efficientnet   depthwise-separable blocks with BatchNorm, SiLU, DropPath, ``F.dropout`` in the head
  mobilenetv3    inverted residuals with BatchNorm and hard-swish, ``F.dropout`` before the classifier
  convnext       depthwise convolutions, LayerNorm, layer scale, DropPath rates rising to
                 ``drop_path_rate`` block by block (``drop_rate`` 0: no other dropout)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """timm's ``drop_path`` (stochastic depth, Huang et al. 2016): drop whole samples of a branch."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    random_tensor = x.new_empty(shape).bernoulli_(keep_prob)
    random_tensor.div_(keep_prob)
    return x * random_tensor


class DropPath(nn.Module):
    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class OldDropPath(nn.Module):
    """timm's drop path before 0.4: a mask from ``floor(keep + rand)``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        random_tensor = keep_prob + torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), dtype=x.dtype, device=x.device)
        random_tensor.floor_()
        return x.div(keep_prob) * random_tensor


# --------------------------------------------------------------------------- ViT
class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.attn_drop = heads, attn_drop
        self.qkv, self.proj, self.proj_drop = nn.Linear(dim, dim * 3), nn.Linear(dim, dim), nn.Dropout(proj_drop)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, drop: float, drop_path_rate: float, old_drop_path: bool = False):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, drop, drop)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Dropout(drop), nn.Linear(dim * 2, dim), nn.Dropout(drop))
        self.drop_path = (OldDropPath if old_drop_path else DropPath)(drop_path_rate)

    def forward(self, x):
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class ViT(nn.Module):
    """A 2-block ViT on 16x16 images (patch 4). ``fixed_batch`` turns the batch size into a Python
    int, as some models do, so that ``torch.jit.trace`` records it as a constant."""

    def __init__(self, classes: int = 4, dim: int = 16, drop: float = 0.1, drop_path_rate: float = 0.1,
                 batch_norm: bool = False, old_drop_path: bool = False, fixed_batch: bool = False):
        super().__init__()
        self.fixed_batch = fixed_batch
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.stem_norm = nn.BatchNorm2d(dim) if batch_norm else nn.Identity()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, 17, dim) * 0.02)
        self.blocks = nn.Sequential(Block(dim, 2, drop, drop_path_rate / 2),
                                    Block(dim, 2, drop, drop_path_rate, old_drop_path))
        self.norm, self.head_drop, self.head = nn.LayerNorm(dim), nn.Dropout(drop), nn.Linear(dim, classes)

    def forward(self, x):
        x = self.stem_norm(self.patch(x)).flatten(2).transpose(1, 2)
        batch = int(x.shape[0]) if self.fixed_batch else x.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), x], dim=1) + self.pos
        x = self.norm(self.blocks(x))
        return self.head(self.head_drop(x[:, 0]))


def vit(**kwargs) -> ViT:
    return ViT(**kwargs)


# --------------------------------------------------------------------------- CNNs
def conv_bn(cin: int, cout: int, stride: int = 1, groups: int = 1, act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class BasicBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.conv1, self.conv2 = conv_bn(dim, dim), nn.Sequential(nn.Conv2d(dim, dim, 3, 1, 1, bias=False), nn.BatchNorm2d(dim))

    def forward(self, x):
        return F.relu(x + self.conv2(self.conv1(x)))


class ClassifierNet(nn.Module):
    """timm's CNN layout: a body, global pooling, ``F.dropout(x, p=self.drop_rate, training=self.training)``, a classifier."""

    def __init__(self, body: nn.Module, width: int, classes: int, drop_rate: float):
        super().__init__()
        self.body, self.drop_rate, self.fc = body, drop_rate, nn.Linear(width, classes)

    def forward(self, x):
        x = self.body(x).mean((2, 3))
        return self.fc(F.dropout(x, p=self.drop_rate, training=self.training))


def resnet(classes: int = 4, drop_rate: float = 0.3) -> ClassifierNet:
    return ClassifierNet(nn.Sequential(conv_bn(3, 8, 2), BasicBlock(8)), 8, classes, drop_rate)


class DepthwiseSeparable(nn.Module):
    """EfficientNet's first block kind: depthwise conv, pointwise conv, a drop path on the residual."""

    def __init__(self, dim: int, drop_path_rate: float, act=nn.SiLU):
        super().__init__()
        self.dw, self.pw = conv_bn(dim, dim, groups=dim, act=act), nn.Sequential(nn.Conv2d(dim, dim, 1, bias=False), nn.BatchNorm2d(dim))
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x):
        return x + self.drop_path(self.pw(self.dw(x)))


def efficientnet(classes: int = 4, drop_rate: float = 0.2, drop_path_rate: float = 0.2) -> ClassifierNet:
    body = nn.Sequential(conv_bn(3, 8, 2, act=nn.SiLU), DepthwiseSeparable(8, drop_path_rate / 2),
                         DepthwiseSeparable(8, drop_path_rate))
    return ClassifierNet(body, 8, classes, drop_rate)


def mobilenetv3(classes: int = 4, drop_rate: float = 0.2) -> ClassifierNet:
    body = nn.Sequential(conv_bn(3, 8, 2, act=nn.Hardswish), DepthwiseSeparable(8, 0.0, act=nn.Hardswish))
    return ClassifierNet(body, 8, classes, drop_rate)


# --------------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, drop_path_rate: float):
        super().__init__()
        self.conv_dw, self.norm = nn.Conv2d(dim, dim, 7, padding=3, groups=dim), LayerNorm2d(dim)
        self.mlp = nn.Sequential(nn.Conv2d(dim, dim * 4, 1), nn.GELU(), nn.Conv2d(dim * 4, dim, 1))
        self.gamma = nn.Parameter(torch.full((dim, 1, 1), 0.5))  # layer scale (1e-6 in timm; 0.5 to be seen in tests)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x):
        return x + self.drop_path(self.gamma * self.mlp(self.norm(self.conv_dw(x))))


def convnext(classes: int = 4, depth: int = 4, drop_path_rate: float = 0.1, drop_rate: float = 0.0) -> ClassifierNet:
    rates = [drop_path_rate * i / max(1, depth - 1) for i in range(depth)]  # timm: linspace(0, rate, depth)
    body = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8), *[ConvNeXtBlock(8, r) for r in rates])
    return ClassifierNet(body, 8, classes, drop_rate)


def single_drop_path(classes: int = 4, rate: float = 0.05) -> nn.Module:
    """A net whose only stochastic site is one DropPath of rate ``rate``."""
    return ClassifierNet(nn.Sequential(conv_bn(3, 8, 2), DepthwiseSeparable(8, rate)), 8, classes, 0.0)
