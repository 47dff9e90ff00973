# SPDX-License-Identifier: Apache-2.0
"""Classifiers on [0, 1] inputs, with the dataset normalization inside ``forward`` (as RobustBench).

Every model is ``head(features(x))``: ``features`` returns the penultimate-layer latent (N, D) that
latent-space methods such as GOT transport, and ``head`` is one linear layer.

References:
    [1] He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016 (pre-activation ResNet).
    [2] Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016 (WRN-34-10 as used by TRADES).
    [3] Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", IEEE S&P 2017, Table 1;
        code: carlini/nn_robust_attacks (``train_models.py``). Seed 003's "Standard CNN" (its Tables 1 and 6).
    [4] Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018; code:
        MadryLab/mnist_challenge (``model.py``).
    [5] Seed 004, "A distributional robustness perspective on adversarial training with the
        infinity-Wasserstein distance", Appendix B.2 (Architectures A and B); code:
        busycalibrating/Adversarial-Training (``adv_train/model/mnist/models.py``, ``mnist_net.py``).

The papers' MNIST nets [3-5] flatten a fixed spatial grid into their first linear layer, so they take
28x28 inputs only (``INPUT_SIZE``); like every net here they normalize inside ``forward``, where the
papers' code feeds raw [0, 1] pixels (an affine change of the first layer's input).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

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


class LayerStack(Classifier):
    """``layers`` in order as ``body``, then a linear ``head`` on their ``latent``-wide output."""

    def __init__(self, mean, std, layers: Sequence[nn.Module], latent: int, num_classes: int):
        super().__init__(mean, std)
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(latent, num_classes)


def cw_mnist(in_channels: int, num_classes: int, mean, std) -> Classifier:
    """Carlini & Wagner's MNIST "standard CNN" [3], seed 003's MNIST network: conv 32, conv 32,
    max-pool, conv 64, conv 64, max-pool (3x3 kernels without padding: 28 -> 26 -> 24 -> 12 -> 10 ->
    8 -> 4), fc 200, fc 200, fc 10, ReLU after each conv and fc but the last. The dropout 0.5 after the first fc is
    C&W's training code's (``train_models.py``). The latent (seed 003's penultimate layer) is the
    second fc's 200 units."""
    return LayerStack(mean, std, [
        nn.Conv2d(in_channels, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3), nn.ReLU(), nn.Conv2d(64, 64, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 4 * 4, 200), nn.ReLU(), nn.Dropout(0.5), nn.Linear(200, 200), nn.ReLU(),
    ], 200, num_classes)


def madry_mnist(in_channels: int, num_classes: int, mean, std) -> Classifier:
    """Madry et al.'s MNIST challenge network [4]: conv 32 5x5, max-pool, conv 64 5x5, max-pool (TF
    "SAME" padding: 28 -> 14 -> 7), fc 1024, fc 10, ReLU after each conv and the first fc."""
    return LayerStack(mean, std, [
        nn.Conv2d(in_channels, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 7 * 7, 1024), nn.ReLU(),
    ], 1024, num_classes)


def langevin_mnist_a(in_channels: int, num_classes: int, mean, std) -> Classifier:
    """Seed 004's "Architecture A" [5] (its Tables 1 and 3): Conv(1, 64, 5), ReLU, Conv(64, 64, 5), ReLU,
    Dropout(0.25), Linear(64 x 20 x 20, 128), Dropout(0.5), Linear(128, 10), as printed in Appendix B.2,
    with a ReLU after Linear(.., 128): the listing omits it, but the official code's ``modelA`` has it
    (without it the two linear layers would compose into one linear map of rank 128)."""
    return LayerStack(mean, std, [
        nn.Conv2d(in_channels, 64, 5), nn.ReLU(), nn.Conv2d(64, 64, 5), nn.ReLU(), nn.Dropout(0.25),
        nn.Flatten(), nn.Linear(64 * 20 * 20, 128), nn.ReLU(), nn.Dropout(0.5),
    ], 128, num_classes)


def langevin_mnist_b(in_channels: int, num_classes: int, mean, std) -> Classifier:
    """Seed 004's "Architecture B" [5] (its Table 4), as the official code builds it (``mnist_net.py``):
    Conv(1, 32, 3, padding 1), Conv(32, 32, 3, padding 1, stride 2), Conv(32, 64, 3, padding 1),
    Conv(64, 64, 3, padding 1, stride 2), Linear(7 x 7 x 64, 100), Linear(100, 10), ReLU after each layer
    but the last.

    Our reading of the printed listing, whose channel counts do not chain (Conv(32, 64, ..) three
    times): the second conv's output is 32, not 64, since the third takes 32; the fourth takes the
    third's 64, not 32; and the fourth has stride 2, which the printed Linear(7 x 7 x 64, ..) needs
    (28 -> 14 -> 7). The official code agrees on all three. The appendix calls B "the one used by
    Madry et al."; Madry et al.'s network is ``madry_mnist``, which differs."""
    return LayerStack(mean, std, [
        nn.Conv2d(in_channels, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(64 * 7 * 7, 100), nn.ReLU(),
    ], 100, num_classes)


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
    "cw_mnist": cw_mnist,                   # Carlini & Wagner's standard CNN (seed 003's MNIST tables)
    "madry_mnist": madry_mnist,             # Madry et al.'s MNIST challenge network
    "langevin_mnist_a": langevin_mnist_a,   # seed 004's Architecture A (its Tables 1 and 3)
    "langevin_mnist_b": langevin_mnist_b,   # seed 004's Architecture B (its Table 4)
}

INPUT_SIZE: dict[str, int] = {
    "lipschitz_cifar": 32, "cw_mnist": 28, "madry_mnist": 28, "langevin_mnist_a": 28, "langevin_mnist_b": 28,
}
"""The side of the square inputs an architecture takes, for those that take one size only."""


def input_size_error(arch: str, image_size: int) -> Optional[str]:
    """Why ``arch`` cannot take ``image_size`` x ``image_size`` inputs, or None when it can."""
    size = INPUT_SIZE.get(arch)
    if size is None or size == image_size:
        return None
    return f"arch {arch!r} takes {size}x{size} images only, not {image_size}x{image_size}"


def build(arch: str, *, in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """Build a registered architecture for a dataset's shape and statistics."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(ARCHS)}")
    return ARCHS[arch](in_channels, num_classes, mean, std)
