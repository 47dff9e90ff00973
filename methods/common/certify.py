# SPDX-License-Identifier: Apache-2.0
r"""Certified L2 robustness of Lipschitz classifiers from their logit margins.

For a classifier :math:`f: \mathbb{R}^d \to \mathbb{R}^K` and a correctly classified :math:`x`,
the margin :math:`M(x) = f_y(x) - \max_{k \neq y} f_k(x)` certifies every L2 perturbation smaller
than

.. math::
    r(x) = \frac{M(x)}{c\, L}, \qquad
    c = \sqrt 2 \text{ if the whole map is } L\text{-Lipschitz}, \qquad
    c = 2 \text{ if each logit } f_k \text{ is } L\text{-Lipschitz (disjoint neurons)},

since :math:`|f_y - f_k|` then moves by at most :math:`\sqrt 2 L \|\delta\|` (the gradient of
:math:`f_y - f_k` is :math:`(e_y - e_k)^\top J`) or :math:`2 L \|\delta\|`. This is the rule of
deel-lip's ``metrics.py``, used by Serrurier et al., "Achieving robustness in classification using
optimal transport with hinge regularization", CVPR 2021 (after Tsuzuku et al., "Lipschitz-Margin
Training", NeurIPS 2018). Certified accuracy at radius :math:`\varepsilon` is the share of points
with :math:`r(x) > \varepsilon`, an exact count over the points; a misclassified point has
:math:`M \le 0` and never counts.

``certify`` measures L first and refuses, by raising ``UncertifiableError``, when the exported net's
bound exceeds 1 + ``tolerance``: the iterative normalizers are approximate, and a certificate
computed with a constant the net does not have is worthless. Raising rather than returning an
empty result means a caller cannot log a number by mistake.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn as nn

from otarena.methods.common.attacks import eval_mode
from otarena.methods.common.evaluate import share
from otarena.methods.common.lipschitz import UnsupportedLayerError, export, lipschitz_bound

DIVISORS = {"sqrt2": math.sqrt(2.0), "2": 2.0}
"""c: ``sqrt2`` when the whole network is Lipschitz (spectral last layer), ``2`` per logit."""


class UncertifiableError(RuntimeError):
    """The model's Lipschitz constant is unknown or above 1 + tolerance: no certificate is given."""

    def __init__(self, reason: str, bound: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.bound = bound


def _radii(radii: float | Iterable[float]) -> list[float]:
    radii = [float(radii)] if isinstance(radii, (int, float)) else [float(r) for r in radii]
    if any(not r >= 0 for r in radii):
        raise ValueError(f"radii are L2 distances in [0, 1] pixel units and must be >= 0, got {radii}")
    return radii


def certified_radius(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, divisor: str = "sqrt2",
                     lipschitz: float = 1.0, batch_size: int = 512) -> torch.Tensor:
    """r(x) = M(x) / (c L) per example (module docstring); negative when misclassified.

    Args:
        model: logits of (N, C, H, W) inputs in [0, 1]; run in eval mode.
        x, y: inputs (N, C, H, W) and true labels (N,).
        divisor: ``sqrt2`` or ``2`` (c).
        lipschitz: L, the constant the margin is divided by.

    Returns:
        radii (N,), L2 in [0, 1] pixel units.
    """
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {sorted(DIVISORS)}, got {divisor!r}")
    if not lipschitz > 0:
        raise ValueError(f"lipschitz must be > 0, got {lipschitz}")
    margins = []
    with eval_mode(model), torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits = model(x[i:i + batch_size]).double()
            yb = y[i:i + batch_size]
            true = logits.gather(1, yb[:, None]).squeeze(1)
            others = logits.scatter(1, yb[:, None], -math.inf).max(1).values
            margins.append(true - others)
    return torch.cat(margins) / (DIVISORS[divisor] * lipschitz)


def certified_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: float | Iterable[float], *,
                       divisor: str = "sqrt2", lipschitz: float = 1.0, batch_size: int = 512) -> dict[float, float]:
    """Fraction of points with r(x) > radius, for each radius; trusts ``lipschitz`` (see ``certify``).

    Returns:
        ``{radius: certified accuracy}``; at radius 0 it is the clean accuracy (ties excluded).
    """
    radii = _radii(radii)
    r = certified_radius(model, x, y, divisor=divisor, lipschitz=lipschitz, batch_size=batch_size)
    return {radius: share(r > radius) for radius in radii}


def certify(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radii: float | Iterable[float], *,
            tolerance: float = 0.02, divisor: str = "sqrt2", batch_size: int = 512) -> dict:
    """Certified accuracy of ``model`` after checking that it is (1 + ``tolerance``)-Lipschitz.

    Exports ``model`` (``lipschitz.export``) and bounds the export's constant on inputs shaped like
    ``x`` (``lipschitz_bound``: whole map for ``sqrt2``, per logit for ``2``). Margins are divided
    by :math:`c \\max(\\text{bound}, 1)`: the nominal constant 1, raised to the bound when the
    normalizers overshoot; never below 1, as power iteration approaches each norm from below.

    Args:
        model: a classifier on (N, C, H, W) inputs in [0, 1].
        x, y: inputs and true labels.
        radii: L2 radii in [0, 1] pixel units (CIFAR-10 standard: 36/255, 72/255, 108/255).
        tolerance: the bound may exceed 1 by this much (relative).
        divisor: ``sqrt2`` (a Lipschitz whole map) or ``2`` (Lipschitz logits).

    Returns:
        ``{"certified_acc": {radius: acc}, "clean_acc", "lipschitz_bound", "lipschitz",
        "divisor", "n_ex", "radius"}``, accuracies as fractions, ``radius`` each point's certified
        radius (:func:`certified_radius`).

    Raises:
        UncertifiableError: the bound exceeds 1 + ``tolerance``, or a layer has no known bound.
    """
    radii = _radii(radii)
    if divisor not in DIVISORS:
        raise ValueError(f"divisor must be one of {sorted(DIVISORS)}, got {divisor!r}")
    exported = export(model)
    try:
        bound = lipschitz_bound(exported, tuple(x.shape[1:]), per_output=divisor == "2")
    except UnsupportedLayerError as err:
        raise UncertifiableError(f"cannot bound the Lipschitz constant: {err}") from err
    if not bound <= 1 + tolerance:
        raise UncertifiableError(
            f"Lipschitz bound {bound:.4g} exceeds 1 + tolerance = {1 + tolerance:g}: no certificate "
            f"(a certificate assuming L = 1 would overstate every radius by {bound:.3g}x)", bound)
    lipschitz = max(bound, 1.0)
    r = certified_radius(exported, x, y, divisor=divisor, lipschitz=lipschitz, batch_size=batch_size)
    return {
        "certified_acc": {radius: share(r > radius) for radius in radii},
        "clean_acc": share(r > 0),
        "lipschitz_bound": bound,
        "lipschitz": lipschitz,
        "divisor": divisor,
        "n_ex": len(y),
        "radius": r,
    }
