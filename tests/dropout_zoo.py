"""The dropout zoo: one small model for every way of writing dropout that ddtool must find.

Each entry: a factory, an example input, and the sites ``find_dropout`` must report as
(name, kind, found_by, p, calls per forward).
"""

import torch
import torch.nn.functional as F
from torch import nn


class AllModules(nn.Module):
    def __init__(self):
        super().__init__()
        self.d1, self.d2, self.d3 = nn.Dropout1d(0.1), nn.Dropout2d(0.2), nn.Dropout3d(0.3)
        self.alpha, self.falpha, self.plain = nn.AlphaDropout(0.4), nn.FeatureAlphaDropout(0.25), nn.Dropout(0.5)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):  # x: (N, 4, 8)
        x = self.d1(x)
        x = self.d2(x.unsqueeze(-1)).squeeze(-1)
        x = self.d3(x.view(x.shape[0], 4, 2, 2, 2)).flatten(2)
        x = self.falpha(self.alpha(x))
        return self.fc(self.plain(x).mean(1))


class FunctionalHead(nn.Module):
    """timm's classifier heads: ``F.dropout(x, p=self.drop_rate, training=self.training)``."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.drop_rate = nn.Linear(8, 16), nn.Linear(16, 3), 0.3

    def forward(self, x):
        x = F.relu(self.body(x))
        return self.head(F.dropout(x, p=self.drop_rate, training=self.training))


class TorchDropout(nn.Module):
    """``torch.dropout`` called directly, gated by self.training."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(torch.dropout(x, 0.2, self.training))


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.fc = nn.MultiheadAttention(8, 2, dropout=0.2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):  # (N, L, 8)
        return self.fc(self.attn(x, x, x, need_weights=False)[0].mean(1))


class Encoder(nn.Module):
    """nn.TransformerEncoderLayer: in eval mode under no_grad its fast path skips dropout."""

    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1, batch_first=True)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.layer(x).mean(1))


class SDPAttention(nn.Module):
    """timm / Hugging Face attention: ``dropout_p=self.p if self.training else 0``."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj, self.attn_p = nn.Linear(8, 24), nn.Linear(8, 3), 0.25

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_p if self.training else 0.0)
        return self.proj(out.mean(1))


class DropPath(nn.Module):
    """timm's DropPath: a per-sample bernoulli_ mask on a residual branch."""

    def __init__(self, drop_prob=0.2):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x):
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.branch, self.drop_path = nn.Linear(8, 8), DropPath(0.2)
        self.drop, self.fc = nn.Dropout(0.1), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.drop(x + self.drop_path(self.branch(x))))


class Reused(nn.Module):
    """One dropout module called at two places of the forward pass."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(8, 8), nn.Linear(8, 3), nn.Dropout(0.3)

    def forward(self, x):
        return self.b(self.drop(F.relu(self.a(self.drop(x)))))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.drop = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(self.drop(F.relu(self.bn(self.conv(x)))).flatten(1))


class LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.rnn, self.fc = nn.LSTM(8, 8, num_layers=2, dropout=0.3, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.rnn(x)[0][:, -1])


def _seq():
    return torch.randn(4, 5, 8)


ZOO = {
    "all_modules": (AllModules, lambda: torch.randn(4, 4, 8), [
        ("d1", "Dropout1d", "module", 0.1, 1), ("d2", "Dropout2d", "module", 0.2, 1),
        ("d3", "Dropout3d", "module", 0.3, 1), ("alpha", "AlphaDropout", "module", 0.4, 1),
        ("falpha", "FeatureAlphaDropout", "module", 0.25, 1), ("plain", "Dropout", "module", 0.5, 1)]),
    "functional_head": (FunctionalHead, lambda: torch.randn(4, 8), [("<root>", "F.dropout", "functional", 0.3, 1)]),
    "torch_dropout": (TorchDropout, lambda: torch.randn(4, 8), [("<root>", "torch.dropout", "functional", 0.2, 1)]),
    "multihead_attention": (MHA, _seq, [("attn", "MultiheadAttention", "attention", 0.2, 1)]),
    "transformer_encoder_layer": (Encoder, _seq, [
        ("layer.self_attn", "MultiheadAttention", "attention", 0.1, 1), ("layer.dropout", "Dropout", "module", 0.1, 1),
        ("layer.dropout1", "Dropout", "module", 0.1, 1), ("layer.dropout2", "Dropout", "module", 0.1, 1)]),
    "sdpa": (SDPAttention, _seq, [("<root>", "scaled_dot_product_attention", "attention", 0.25, 1)]),
    "reused": (Reused, lambda: torch.randn(4, 8), [("drop", "Dropout", "module", 0.3, 2)]),
    "batchnorm": (ConvBN, lambda: torch.randn(4, 1, 8, 8), [("drop", "Dropout", "module", 0.5, 1)]),
    "lstm": (LSTM, _seq, [("rnn", "LSTM", "module", 0.3, 1)]),
    "drop_path": (Residual, lambda: torch.randn(4, 8), [
        ("drop_path", "DropPath", "module", 0.2, 1), ("drop", "Dropout", "module", 0.1, 1)]),
}
