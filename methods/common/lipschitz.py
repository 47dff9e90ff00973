# SPDX-License-Identifier: Apache-2.0
r"""1-Lipschitz classifiers from deel-torchlip layers, their plain-PyTorch export, and Lipschitz bounds.

The nets fit the ``Classifier`` contract of ``nets.py`` (``head(features(normalize(x)))``) with one
change: ``normalize`` only subtracts the dataset mean. Dividing by the standard deviation would
multiply the Lipschitz constant by :math:`1/\sigma` (about 2.6 on MNIST, 4 on CIFAR-10), so that a
"1-Lipschitz" net would certify radii 2.6-4 times too large on [0, 1] inputs.

Layers (deel-torchlip's; see [1], [2]): ``SpectralConv2d`` / ``SpectralLinear`` (spectral normalisation, then
Björck orthonormalisation, then the conv correction factor), ``GroupSort2`` activations,
``ScaledL2NormPool2d`` downsampling, no batch norm, no dropout. The head is a ``SpectralLinear``:
its rows are orthonormal, so the whole map :math:`\mathbb{R}^d \to \mathbb{R}^K` is 1-Lipschitz
and certificates divide the margin by :math:`\sqrt 2` (``methods.common.certify``).

The normalizers are iterative, hence approximate, and in eval mode they replay the weights cached
by the last training forward. So the constant is checked, not assumed: ``lipschitz_bound`` composes
per-layer operator norms of the exported net, ``lipschitz_estimate`` gives an empirical lower bound.

References:
    [1] Serrurier et al., "Achieving robustness in classification using optimal transport with hinge
        regularization", CVPR 2021, arXiv:2006.06520.
    [2] Anil, Lucas, Grosse, "Sorting out Lipschitz function approximation", ICML 2019 (GroupSort,
        Björck orthonormalisation).
"""
from __future__ import annotations

import copy
import itertools
from typing import Sequence

import torch
import torch.nn as nn
from deel import torchlip

from otarena.methods.common.attacks import eval_mode
from otarena.methods.common.nets import Classifier


# --------------------------------------------------------------------------------------------------
# Architectures and export

POWER_ITERATIONS = 10
"""Power-iteration steps per training forward of each spectral normalisation (torch's default is 1)."""


class LipschitzClassifier(Classifier):
    """A ``Classifier`` that only mean-centres its input (``std`` is fixed to 1, see module docstring).

    Subclasses build ``body`` and ``head``, then call ``track_spectral_norms``.
    """

    def __init__(self, mean: Sequence[float]):
        super().__init__(mean, [1.0] * len(mean))

    def inference(self) -> nn.Module:
        # The exported net skips the normalizers' power iterations on every forward.
        return export(self)

    def track_spectral_norms(self, n: int = POWER_ITERATIONS) -> None:
        """Run ``n`` power-iteration steps per training forward instead of torch's one.

        With one step the estimate of the top singular value lags behind fast-moving weights; once
        it is 2.2 times too small, Björck's iteration diverges and the loss becomes NaN (digits,
        Adam lr 5e-3, within 5 steps). Ten steps, deel-torchlip's own ``DEFAULT_MAXITER_SPECTRAL``,
        keep it within 1% at lr 2e-2, for matrix-vector products that cost next to nothing.
        """
        for module in self.modules():
            if hasattr(module, "n_power_iterations"):   # torch's spectral-norm parametrization
                module.n_power_iterations = n


class LipschitzSmall(LipschitzClassifier):
    """Two spectral conv stages (32 then 128 channels, each with an L2-norm pool), global pooling,
    a spectral linear layer; for 8x8 digits and 28x28 MNIST alike (global pooling is size-free).

    Few convolutions that widen, rather than a VGG stack: a 3x3 spectral conv scales a typical
    input's norm by about :math:`\sqrt{C_{out} / (9 C_{in})}` (Björck makes its
    :math:`C_{out} \times 9 C_{in}` kernel matrix orthonormal, and the correction factor is 1/3),
    so a stack of same-width convs starts out nearly constant and learns slowly. On digits (Adam,
    lr 5e-3, batch 16) this net is at 68% validation accuracy after one epoch, a stack of four
    32-64-channel convs at 22%; both reach about 95% within 6 epochs.
    """

    def __init__(self, in_channels: int, num_classes: int, mean, widths=(32, 128), hidden: int = 128):
        super().__init__(mean)
        layers, c = [], in_channels
        for w in widths:
            layers += [torchlip.SpectralConv2d(c, w, 3, padding=1), torchlip.GroupSort2(),
                       torchlip.ScaledL2NormPool2d(2)]
            c = w
        # sum / sqrt(H W): 1-Lipschitz for any H x W, where a plain average would not be size-free.
        layers += [torchlip.ScaledAdaptiveAvgPool2d((1, 1)), nn.Flatten(),
                   torchlip.SpectralLinear(c, hidden), torchlip.GroupSort2()]
        self.body = nn.Sequential(*layers)
        self.head = torchlip.SpectralLinear(hidden, num_classes)
        self.track_spectral_norms()


class LipschitzCifar(LipschitzClassifier):
    """Four widening spectral convs (64, 128, 256, 512) with three L2-norm pools; 32x32 inputs only."""

    def __init__(self, in_channels: int, num_classes: int, mean, widths=(64, 128, 256, 512), hidden: int = 512):
        super().__init__(mean)
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [torchlip.SpectralConv2d(c, w, 3, padding=1), torchlip.GroupSort2()]
            if i > 0:
                layers.append(torchlip.ScaledL2NormPool2d(2))
            c = w
        # 32 / 2**3 = 4: flattening keeps the spatial layout (hence the fixed input size).
        layers += [nn.Flatten(), torchlip.SpectralLinear(c * 16, hidden), torchlip.GroupSort2()]
        self.body = nn.Sequential(*layers)
        self.head = torchlip.SpectralLinear(hidden, num_classes)
        self.track_spectral_norms()


def lipschitz_small(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """``ARCHS`` factory for digits and MNIST-sized inputs; ``std`` is ignored (mean-centring only)."""
    return LipschitzSmall(in_channels, num_classes, mean)


def lipschitz_cifar(in_channels: int, num_classes: int, mean: Sequence[float], std: Sequence[float]) -> Classifier:
    """``ARCHS`` factory for 32x32 inputs (CIFAR, SVHN); ``std`` is ignored (mean-centring only)."""
    return LipschitzCifar(in_channels, num_classes, mean)


def export(model: nn.Module) -> nn.Module:
    """A plain-PyTorch copy for inference: torchlip layers become ``nn.Conv2d`` / ``nn.Linear``.

    deel-torchlip's ``vanilla_model`` on a deep copy, in eval mode, so the copy computes exactly what
    ``model.eval()`` computes (the normalizers' cached weights), and its weights are fresh tensors:
    editing them never touches ``model``. ``model``'s mode is left as it was. Models without torchlip
    layers come back as plain copies.
    """
    with eval_mode(model):
        exported = torchlip.vanilla_model(model, in_place=False)
    # vanilla_export shares the normalizers' cached tensors with ``model``: copy them.
    exported = copy.deepcopy(exported).eval()
    for p in exported.parameters():
        p.requires_grad_(False)
    return exported


# --------------------------------------------------------------------------------------------------
# Bounds


class UnsupportedLayerError(TypeError):
    """``lipschitz_bound`` met a layer whose Lipschitz constant it cannot bound."""


_ONE_LIPSCHITZ = (nn.ReLU, nn.Tanh, nn.Flatten, nn.Identity, nn.Dropout, nn.Unflatten)
_LINEAR = (nn.Conv1d, nn.Conv2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)


def _leaves(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in the order they run: a ``Classifier``'s body then head, or a Sequential."""
    if isinstance(model, Classifier):
        return _leaves(model.body) + _leaves(model.head)
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in _leaves(child)]
    return [model]


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _nonlinear_constant(layer: nn.Module) -> float | None:
    """The Lipschitz constant of a known nonlinear layer, or None."""
    coef = float(getattr(layer, "_coefficient_lip", 1.0))
    if isinstance(layer, (torchlip.GroupSort, torchlip.MaxMin)):
        return coef
    if isinstance(layer, _ONE_LIPSCHITZ):
        return 1.0
    if isinstance(layer, nn.LPPool2d) and layer.norm_type == 2 and not layer.ceil_mode:
        # Disjoint windows: each output is the L2 norm of its window (reverse triangle inequality).
        kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
        if all(s >= k for k, s in zip(kernel, stride)):
            return coef
    if isinstance(layer, nn.MaxPool2d) and _pair(layer.dilation) == (1, 1):
        kernel, stride = _pair(layer.kernel_size), _pair(layer.stride or layer.kernel_size)
        if all(s >= k for k, s in zip(kernel, stride)):
            return 1.0
    if isinstance(layer, torchlip.ScaledAdaptativeL2NormPool2d):
        return coef
    return None


def operator_norm(layer: nn.Module, input_shape: Sequence[int], *, max_iter: int = 500, rtol: float = 1e-7,
                  seed: int = 0) -> float:
    """Largest singular value of the linear map ``v -> layer(v) - layer(0)`` on inputs of ``input_shape``.

    Power iteration on :math:`A^\\top A` (the adjoint by autograd), in float64, from a seeded Gaussian
    start, until :math:`\\sigma` changes by less than ``rtol`` (relative). Power iteration approaches
    :math:`\\sigma` from below; at this tolerance its error is far under any tolerance applied to the
    bound. ``nn.Linear`` uses an exact SVD instead.

    Args:
        layer: a linear layer plus bias (convolution, average pooling, ...).
        input_shape: the shape of one input, without the batch dimension, e.g. ``(C, H, W)``; a
            convolution's norm depends on it through the zero padding.
    """
    layer = copy.deepcopy(layer).double().eval()
    if isinstance(layer, nn.Linear):
        return torch.linalg.matrix_norm(layer.weight, ord=2).item()
    param = next(itertools.chain(layer.parameters(), layer.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator(device=device).manual_seed(seed)
    u = torch.randn((1, *input_shape), generator=generator, device=device, dtype=torch.float64)
    with torch.no_grad():
        offset = layer(torch.zeros_like(u))
    sigma = 0.0
    for i in range(max_iter):
        u = (u / u.norm()).requires_grad_(True)
        v = layer(u) - offset
        u, = torch.autograd.grad(v, u, grad_outputs=v)   # A^T A u
        previous, sigma = sigma, v.norm().item()
        if i > 10 and abs(sigma - previous) <= rtol * sigma:
            break
    return sigma


def layer_norms(model: nn.Module, input_shape: Sequence[int], *, per_output: bool = False) -> list[tuple[str, float]]:
    """Per-layer Lipschitz constants of ``model`` (a ``Classifier`` or a Sequential), in order.

    The first entry is the input normalization (1 / min std); then each layer. With ``per_output``
    the last layer, if linear, counts its largest row norm (each logit's own constant) instead of
    its spectral norm.

    Raises:
        UnsupportedLayerError: for a layer with no known bound (residual blocks, batch norm, ...).
    """
    leaves = _leaves(model)
    shapes: dict[int, tuple] = {}

    def record(i):
        def hook(module, inputs, output):
            shapes.setdefault(i, tuple(inputs[0].shape[1:]))   # returns None: the output is kept
        return hook

    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device("cpu")
    hooks = [leaf.register_forward_hook(record(i)) for i, leaf in enumerate(leaves)]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
    norms = []
    if isinstance(model, Classifier):
        norms.append(("normalize", 1.0 / model.std.min().item()))
    for i, leaf in enumerate(leaves):
        name = f"{i}:{type(leaf).__name__}"
        constant = _nonlinear_constant(leaf)
        if constant is None and per_output and i == len(leaves) - 1 and isinstance(leaf, nn.Linear):
            constant = leaf.weight.detach().double().norm(dim=1).max().item()
        if constant is None and isinstance(leaf, (nn.Linear, *_LINEAR)):
            if i not in shapes:
                raise UnsupportedLayerError(f"layer {name} did not run on a {tuple(input_shape)} input")
            constant = operator_norm(leaf, shapes[i])
        if constant is None:
            raise UnsupportedLayerError(f"no Lipschitz bound for layer {name} ({leaf!r})")
        norms.append((name, constant))
    return norms


def lipschitz_bound(model: nn.Module, input_shape: Sequence[int], *, per_output: bool = False) -> float:
    r"""Upper bound of the L2 Lipschitz constant of ``model`` on inputs of ``input_shape``.

    The product of per-layer constants (``layer_norms``): exact for ``nn.Linear``, power iteration
    on the operator for convolutions and poolings, known constants for GroupSort, L2-norm pooling
    and the other 1-Lipschitz layers, and :math:`1/\min\sigma` for a ``Classifier``'s normalization.
    The composition makes it an upper bound; the power-iteration norms are converged estimates
    (from below, to ``rtol`` 1e-7 in ``operator_norm``), so it is one up to that error.
    Meant for ``export(model)``: on a torchlip model the normalizers' parametrizations are bounded
    as they run in eval mode, which is the same thing but slower.

    Args:
        model: a ``Classifier`` or a Sequential of supported layers.
        input_shape: one input's shape, ``(C, H, W)``.
        per_output: bound each logit separately (the last linear layer's largest row norm): the
            constant behind the divisor 2 of disjoint-neuron certificates.

    Raises:
        UnsupportedLayerError: for a layer with no known bound.
    """
    bound = 1.0
    for _, constant in layer_norms(model, input_shape, per_output=per_output):
        bound *= constant
    return bound


def lipschitz_estimate(model: nn.Module, x: torch.Tensor, *, batch_size: int = 64) -> float:
    r"""Empirical lower bound of the L2 Lipschitz constant of ``model`` on [0, 1] inputs ``x``.

    The largest of (a) the spectral norm of the Jacobian :math:`\partial f / \partial x` at each
    point, computed exactly from its :math:`K` rows, and (b) :math:`\|f(x_i) - f(x_j)\| / \|x_i - x_j\|`
    over all pairs of points in each batch. Both are attained, so any true constant is at least this.

    Args:
        model: logits of (N, C, H, W) inputs; evaluated in eval mode.
        x: (N, C, H, W) points.
    """
    best = 0.0
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].detach().clone().requires_grad_(True)
            logits = model(xb)
            rows = [torch.autograd.grad(logits[:, k].sum(), xb, retain_graph=True)[0].flatten(1)
                    for k in range(logits.shape[1])]
            jacobian = torch.stack(rows, 1).double()   # (N, K, d): examples are independent in eval mode
            best = max(best, torch.linalg.matrix_norm(jacobian, ord=2).max().item())
            out, flat = logits.detach().double(), xb.detach().flatten(1).double()
            dist = torch.cdist(flat, flat, compute_mode="donot_use_mm_for_euclid_dist")
            gaps = torch.cdist(out, out, compute_mode="donot_use_mm_for_euclid_dist")
            mask = dist > 1e-6
            if mask.any():
                best = max(best, (gaps[mask] / dist[mask]).max().item())
    return best
