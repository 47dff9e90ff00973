# SPDX-License-Identifier: Apache-2.0
r"""ARMOR_D's maths: the duals of an OT-regularized divergence ball, and transport under the UDR soft cost.

Birrell, Ebrahimi, "Adversarially Robust Learning with Optimal Transport Regularized Divergences",
arXiv:2309.03791; official code star-ailab/ARMOR. The objectives, their sample weights and the
deviations from the code are written out in ``methods.armor``, the method that trains them; this
module holds the stateless functions (and the dual variables' parametrization), as
``methods.common.functional`` does for the per-example losses.

- alpha-divergence: :func:`alpha_dual`, with :class:`DualVariables` (lambda > 0, nu) trained;
- KL: :func:`kl_dual` at :func:`kl_optimal_lambda`, solved per batch on the device;
- the UDR soft ball (L-inf): :func:`udr_cost` and the transport step :func:`udr_attack`, which runs
  the one ascent loop of ``methods.common.attacks`` with its own move.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from otarena.methods.common.attacks import ascent, ce_loss, random_start

LAMBDA_MIN = 1e-6
"""Floor of lambda: the softplus parametrization's offset and the low end of the KL search."""
LAMBDA_MAX = 1e6
"""High end of the KL search for lambda* (radius -> 0 sends lambda* -> infinity)."""
UDR_CAP = 2.0
"""Under the UDR cost, no pixel moves more than UDR_CAP * eps from x."""


# --------------------------------------------------------------------------------------------------
# The dual objectives and their sample weights


def f_star_alpha(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Convex conjugate of f_alpha(t) = (t^alpha - 1) / (alpha (alpha - 1)) on t >= 0, elementwise."""
    p = alpha / (alpha - 1)
    return (alpha - 1) ** p / alpha * F.relu(s) ** p + 1 / (alpha * (alpha - 1))


def alpha_dual(losses: torch.Tensor, costs: torch.Tensor, lam: torch.Tensor, nu: torch.Tensor, *,
               radius: float, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The alpha-divergence dual J(lambda, nu) of ``methods.armor``'s docstring, and its sample weights.

    Args:
        losses: L_i, (N,); costs: c_i, (N,) (zeros for the hard ball).
        lam, nu: scalar tensors, lam > 0; gradients reach them.

    Returns:
        ``(J, w)``: J a scalar; w (N,), detached, dJ/dL_i normalized to sum 1:
        w_i ∝ relu(s_i)^(1 / (alpha - 1)), s_i = (L_i - nu) / lam - c_i, exactly 0 where s_i <= 0
        (all 0 when every s_i <= 0).
    """
    s = (losses - nu) / lam - costs
    J = lam * radius + nu + lam * f_star_alpha(s, alpha).mean()
    w = F.relu(s.detach()) ** (1 / (alpha - 1))
    return J, w / w.sum().clamp_min(torch.finfo(w.dtype).tiny)


def kl_scores(losses: torch.Tensor, costs: torch.Tensor, temperature: torch.Tensor,
              stay: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """z_i = L_i / T - c_i, and the cost c_i that z_i pays.

    With ``stay`` (L_i at x' = x, which costs nothing), z_i = max(L_i / T - c_i, stay_i / T): the
    sup over x' can always keep x. Under a soft cost this keeps J bounded below in lambda; without
    it, transported samples fixed while lambda is solved would give a slope r - sum_i w_i c_i < 0
    at large lambda whenever the costs exceed r, and lambda* would run off to the end of the range.
    """
    z = losses / temperature - costs
    if stay is None:
        return z, costs.expand_as(z)
    z_stay = stay / temperature
    return torch.maximum(z, z_stay), torch.where(z >= z_stay, costs, torch.zeros_like(costs))


def kl_dual(losses: torch.Tensor, costs: torch.Tensor, lam: torch.Tensor, *, radius: float, kappa: float,
            stay: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The KL dual J(lambda) = lambda r + T log mean_i exp(z_i), T = lambda + kappa, and w = softmax(z).

    Args:
        losses, costs: L_i and c_i, (N,); ``stay``: see ``kl_scores``.
        lam: a scalar tensor >= 0, or (M,) (then J is (M,) and w is (M, N)).

    Returns:
        ``(J, w)``; w, detached, is dJ/dL_i (the weights of the theta-gradient).
    """
    temperature = (lam + kappa)[..., None]
    z, _ = kl_scores(losses, costs, temperature, stay)
    J = lam * radius + temperature[..., 0] * (torch.logsumexp(z, -1) - math.log(losses.shape[-1]))
    return J, torch.softmax(z.detach(), -1)


def kl_dual_slope(losses: torch.Tensor, costs: torch.Tensor, lam: torch.Tensor, *, radius: float, kappa: float,
                  stay: Optional[torch.Tensor] = None) -> torch.Tensor:
    """dJ/dlambda of ``kl_dual`` = r - KL(w || uniform) - sum_i w_i c_i; nondecreasing, as J is convex."""
    z, paid = kl_scores(losses, costs, (lam + kappa)[..., None], stay)
    log_w = torch.log_softmax(z, -1)
    return radius - (log_w.exp() * (log_w + math.log(losses.shape[-1]) + paid)).sum(-1)


def kl_optimal_lambda(losses: torch.Tensor, costs: torch.Tensor, *, radius: float, kappa: float,
                      stay: Optional[torch.Tensor] = None, points: int = 64, rounds: int = 4) -> torch.Tensor:
    """argmin of ``kl_dual`` over lambda >= 0 (at most 1e6): the root of its slope, detached, on the device.

    Each round evaluates the slope on a ``points``-point grid in log lambda over [1e-6, 1e6] and keeps
    the cell where it changes sign: bisection with ``points - 1`` cells, so 4 rounds locate lambda* to
    a relative 2e-6 (in float64). A slope >= 0 already at 1e-6 gives lambda* = 0 (1e-6 if kappa = 0,
    where lambda = 0 would divide by zero); a slope < 0 throughout gives 1e6.
    """
    dtype = losses.dtype
    losses, costs = losses.detach().double(), costs.detach().double()
    stay = None if stay is None else stay.detach().double()

    def slope(lam):
        return kl_dual_slope(losses, costs, lam, radius=radius, kappa=kappa, stay=stay)

    lo = torch.tensor(math.log(LAMBDA_MIN), dtype=torch.float64, device=losses.device)
    hi = torch.tensor(math.log(LAMBDA_MAX), dtype=torch.float64, device=losses.device)
    for _ in range(rounds):
        grid = lo + (hi - lo) * torch.linspace(0, 1, points, dtype=torch.float64, device=losses.device)
        # Tensor indices, not .item(): the search stays on the device, with no host sync.
        k = (slope(grid.exp()) < 0).sum().clamp(1, points - 1)
        lo, hi = grid.index_select(0, k.view(1) - 1)[0], grid.index_select(0, k.view(1))[0]
    at_floor = slope(torch.tensor([LAMBDA_MIN], dtype=torch.float64, device=losses.device))[0] >= 0
    floor = 0.0 if kappa > 0 else LAMBDA_MIN
    return torch.where(at_floor, floor, hi.exp()).to(dtype)


def weight_stats(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Entropy in nats of normalized weights w (N,) (log N when uniform), and the fraction exactly 0."""
    return -torch.special.xlogy(w, w).sum(), (w == 0).float().mean()


class DualVariables(nn.Module):
    """lambda = softplus(rho) + 1e-6 > 0 and nu: the alpha-divergence dual variables (scalars)."""

    def __init__(self, lam: float, nu: float):
        super().__init__()
        excess = lam - LAMBDA_MIN
        self.rho = nn.Parameter(torch.tensor(excess + math.log(-math.expm1(-excess))))   # softplus^-1, stably
        self.nu = nn.Parameter(torch.tensor(float(nu)))

    @property
    def lam(self) -> torch.Tensor:
        return F.softplus(self.rho) + LAMBDA_MIN


def dual_objective(losses: torch.Tensor, costs: torch.Tensor, *, divergence: str, radius: float, alpha: float,
                   kappa: float, variables: DualVariables, stay: Optional[torch.Tensor] = None):
    """``(J, w, lambda)`` under ``divergence``: :func:`alpha_dual` at the trained ``variables`` (``alpha``),
    or :func:`kl_dual` at this batch's :func:`kl_optimal_lambda` (``kl``; ``variables`` unused)."""
    if divergence == "alpha":
        lam = variables.lam
        J, w = alpha_dual(losses, costs, lam, variables.nu, radius=radius, alpha=alpha)
        return J, w, lam
    lam = kl_optimal_lambda(losses, costs, radius=radius, kappa=kappa, stay=stay)
    J, w = kl_dual(losses, costs, lam, radius=radius, kappa=kappa, stay=stay)
    return J, w, lam


# --------------------------------------------------------------------------------------------------
# Transport under the soft UDR cost


def udr_excess(delta: torch.Tensor, eps: float) -> torch.Tensor:
    """(delta - eps sign delta) 1[|delta| >= eps] = delta - clip(delta, -eps, eps): the part outside the ball."""
    return delta - delta.clamp(-eps, eps)


def udr_cost(x_adv: torch.Tensor, x: torch.Tensor, eps: float, weight: float) -> torch.Tensor:
    """The UDR soft-ball cost per example, weight * 0.5 ||udr_excess(x_adv - x)||^2, (N,); 0 inside the ball."""
    return weight * 0.5 * udr_excess(x_adv - x, eps).flatten(1).pow(2).sum(1)


def udr_attack(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, eps: float, steps: int,
               step_size: float, pull: torch.Tensor, loss_fn=ce_loss,
               init: Optional[torch.Tensor] = None) -> torch.Tensor:
    r"""The transport step under the UDR cost (L-inf): sign ascent on the loss, pulled back to the ball.

    A sign step on the loss, then a proximal step on the cost :math:`\frac{\lambda}{\tau} \frac12
    \|e\|^2` of the part :math:`e = \delta - \mathrm{clip}(\delta, -\varepsilon, \varepsilon)`
    outside the ball, with :math:`h = a \lambda / \tau` (``pull``):

    .. math::
        \delta' = \delta + a\, \mathrm{sign} \nabla_\delta \ell, \qquad
        \delta \leftarrow \mathrm{clip}(\delta', -\varepsilon, \varepsilon) + \frac{e(\delta')}{1 + h}

    then ``|delta| <= UDR_CAP * eps`` and ``x + delta`` in [0, 1]. A pixel that keeps its gradient sign
    settles tau / lambda outside the ball, as with the code's explicit step
    :math:`\delta + a\,\mathrm{sign}\nabla\ell - h\, e(\delta)`, which overshoots the ball's
    surface once h > 1 and no longer settles past h = 2; the proximal step is stable for every lambda
    and tends to PGD's projection as lambda -> infinity.

    Args:
        x, target: clean inputs (N, C, H, W) in [0, 1] and what ``loss_fn(logits, target)`` needs.
        pull: h >= 0, a scalar tensor; ``init``: the start (None: uniform in the eps-ball).

    Returns:
        (N, C, H, W) in [0, 1], within UDR_CAP * eps of ``x``.
    """
    x = x.detach()
    cap = UDR_CAP * eps
    start = random_start(x, eps, "Linf") if init is None else init.detach()

    def move(x_adv, grad, x):
        delta = x_adv - x + step_size * grad.sign()
        delta = delta.clamp(-eps, eps) + udr_excess(delta, eps) / (1 + pull)
        return (x + delta.clamp(-cap, cap)).clamp(0.0, 1.0)

    return ascent(model, (x + (start - x).clamp(-cap, cap)).clamp(0.0, 1.0), x, target, steps=steps, move=move,
                  loss_fn=loss_fn)
