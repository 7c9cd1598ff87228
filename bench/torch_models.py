"""The Table-1 backbones in PyTorch, built from the same layer specs as spp_jax's.

Mirrors :mod:`spp_jax.models.backbones`: conv + ReLU, Caffe ceil-mode max pools
(``nn.MaxPool2d(ceil_mode=True)`` has the same output size rule when there is no
padding), within-channel LRN as ``x * (1 + alpha * avg3x3(x^2))^-beta`` with the
zero-padded average dividing by size*size (``count_include_pad=True``), and an
SPP + fc6/fc7/fc8 head for the training step.  Only for benchmarking.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from spp_jax.models import layers as L
from spp_jax.models.sppnet import scaled_specs


class TorchLRN(nn.Module):
    def __init__(self, spec: L.LRN):
        super().__init__()
        self.spec = spec

    def forward(self, x):
        s = self.spec
        if s.within_channel:
            avg = F.avg_pool2d(x * x, s.size, stride=1, padding=s.size // 2, count_include_pad=True)
            return x * (s.k + s.alpha * avg).pow(-s.beta)
        return F.local_response_norm(x, s.size, alpha=s.alpha, beta=s.beta, k=s.k)


def backbone(arch: str, width: float = 1.0) -> nn.Sequential:
    mods, cin = [], 3
    for s in scaled_specs(arch, width):
        if isinstance(s, L.Conv):
            mods += [nn.Conv2d(cin, s.features, s.kernel, s.stride, s.pad), nn.ReLU(inplace=True)]
            cin = s.features
        elif isinstance(s, L.Pool):
            mods.append(nn.MaxPool2d(s.kernel, s.stride, ceil_mode=s.ceil_mode))
        else:
            mods.append(TorchLRN(s))
    return nn.Sequential(*mods)


class TorchSPPNet(nn.Module):
    """Backbone -> SPP (adaptive max pool per level, concat) -> fc6 -> fc7 -> fc8, dropout.

    ``gray=True`` is ``input_norm="gray_std"`` as a torch user would write it: each image's
    channel mean standardised over its pixels, into a one-channel conv1 (spp_jax folds its
    3-channel kernel to the same work)."""

    def __init__(self, arch: str, channels: int, num_classes: int = 1000, levels=(6, 3, 2, 1),
                 fc_dim: int = 4096, width: float = 1.0, dropout: float = 0.5, gray: bool = False):
        super().__init__()
        self.features = backbone(arch, width)
        if gray:
            c1 = self.features[0]
            self.features[0] = nn.Conv2d(1, c1.out_channels, c1.kernel_size, c1.stride, c1.padding)
        self.gray = gray
        self.levels = levels
        d = channels * sum(n * n for n in levels)
        self.fc6, self.fc7 = nn.Linear(d, fc_dim), nn.Linear(fc_dim, fc_dim)
        self.fc8 = nn.Linear(fc_dim, num_classes)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        if self.gray:
            g = x.mean(1, keepdim=True)
            mu = g.mean((1, 2, 3), keepdim=True)
            x = (g - mu) * torch.rsqrt(((g - mu) ** 2).mean((1, 2, 3), keepdim=True) + 1e-6)
        f = self.features(x)
        p = torch.cat([F.adaptive_max_pool2d(f, n).flatten(1) for n in self.levels], 1)
        h = self.drop(F.relu(self.fc6(p)))
        h = self.drop(F.relu(self.fc7(h)))
        return self.fc8(h)


def load_backbone_params(tmodel: nn.Sequential, flax_backbone_params: dict) -> None:
    """Copy Flax conv kernels (kh, kw, in, out) / biases into the torch backbone's convs."""
    convs = [m for m in tmodel if isinstance(m, nn.Conv2d)]
    names = sorted(flax_backbone_params, key=lambda n: int(n[4:]))  # conv1, conv2, ...
    assert len(names) == len(convs), (names, len(convs))
    with torch.no_grad():
        for name, m in zip(names, convs):
            k = np.asarray(flax_backbone_params[name]["kernel"]).transpose(3, 2, 0, 1)
            m.weight.copy_(torch.from_numpy(np.ascontiguousarray(k)))
            m.bias.copy_(torch.from_numpy(np.array(flax_backbone_params[name]["bias"])))

