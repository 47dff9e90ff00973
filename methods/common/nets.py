# SPDX-License-Identifier: Apache-2.0
"""Classifiers on [0, 1] inputs, with the dataset normalization inside ``forward`` (as RobustBench).

Every model is ``head(features(x))``: ``features`` returns the penultimate-layer latent (N, D) that
latent-space methods such as GOT transport, and ``head`` is one linear layer.

References:
    [1] He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (pre-activation ResNet).
    [2] Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (WRN-34-10 as used by TRADES).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Classifier(nn.Module):
    """Normalizes [0, 1] inputs, then ``head(features(.))``."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate latent (N, D) of inputs (N, C, H, W) in [0, 1]."""
        return self.body(self.normalize(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def inference(self) -> nn.Module:
        """The model to attack and score: itself, or a faster export computing the same function."""
        return self


class SmallCNN(Classifier):
    """Two conv blocks and an MLP: for 8x8 digits and 28x28 MNIST-sized inputs."""

    def __init__(self, in_channels: int, num_classes: int, mean, std, width: int = 32):
        super().__init__(mean, std)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            # Pooling to a fixed 4x4 grid lets the same net take 8x8 and 28x28 inputs.
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, 128), nn.ReLU(),
        )
        self.head = nn.Linear(128, num_classes)


class _PreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(Classifier):
    def __init__(self, in_channels: int, num_classes: int, mean, std):
        super().__init__(mean, std)
        layers, in_planes = [nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)], 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            for s in (stride, 1):
                layers.append(_PreActBlock(in_planes, planes, s))
                in_planes = planes
        layers += [nn.BatchNorm2d(512), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(512, num_classes)


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.shortcut = None if in_planes == planes and stride == 1 else \
            nn.Conv2d(in_planes, planes, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = self.conv2(F.relu(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNet(Classifier):
    """WRN-depth-widen; WRN-34-10 is the TRADES/MART reference architecture."""

    def __init__(self, in_channels: int, num_classes: int, mean, std, depth: int = 34, widen: int = 10):
        super().__init__(mean, std)
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers, in_planes = [nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            for i in range(n):
                layers.append(_WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        layers += [nn.BatchNorm2d(in_planes), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(in_planes, num_classes)


def _lipschitz(name: str) -> Callable[..., Classifier]:
    """A deel-torchlip architecture of ``methods.common.lipschitz``, imported on first use: that
    module subclasses ``Classifier``, so importing it at the top of this one would be circular."""
    def build_lipschitz(in_channels: int, num_classes: int, mean, std) -> Classifier:
        from otarena.methods.common import lipschitz
        return getattr(lipschitz, name)(in_channels, num_classes, mean, std)
    return build_lipschitz


ARCHS: dict[str, Callable[..., Classifier]] = {
    "small_cnn": SmallCNN,
    "preact_resnet18": PreActResNet18,
    "wrn34_10": lambda c, k, mean, std: WideResNet(c, k, mean, std, depth=34, widen=10),
    "lipschitz_small": _lipschitz("lipschitz_small"),   # 1-Lipschitz (deel-torchlip), 8x8 to 28x28
    "lipschitz_cifar": _lipschitz("lipschitz_cifar"),   # 1-Lipschitz, 32x32x3
}


def build(arch: str, *, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """Build a registered architecture for a dataset's shape and statistics."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](in_channels, num_classes, mean, std)
