# SPDX-License-Identifier: Apache-2.0
r"""Stateless maths the method files share: per-example losses, the TRADES attack, weight-space ascent.

Method files are thin: each holds its ``Config``, search space and update, and takes the maths it
shares with other methods from here (as deel-torchlip's ``functional.py`` serves its layers and
losses), so no method file imports another one for a formula.

Per-example losses return (N,) tensors; a method's batch loss is their mean, and ARMOR_D re-weights
them (``methods.armor``).

References:
    [1] Zhang et al., "Theoretically Principled Trade-off between Robustness and Accuracy",
        ICML 2019, arXiv:1901.08573 (TRADES, Eq. (5)).
    [2] Wang et al., "Improving Adversarial Robustness Requires Revisiting Misclassified
        Examples", ICLR 2020 (MART, Eq. (6) and (8)).
    [3] Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization",
        ICLR 2021, arXiv:2010.01412 (the normalised weight-space ascent of SAM and OT-MDR).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from otarena.methods.common.attacks import ThreatModel, pgd

# --------------------------------------------------------------------------------------------------
# Per-example losses


def kl_per_example(log_p_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) per example, (N,)."""
    return F.kl_div(log_p_adv, p_clean, reduction="none").sum(1)


def kl_to_clean(logits_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || softmax(logits_adv)) per example, (N,): the TRADES attack's loss on logits."""
    return kl_per_example(F.log_softmax(logits_adv, 1), p_clean)


def trades_loss_per_example(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                            beta: float) -> torch.Tensor:
    """Eq. (5) of TRADES per example, (N,): CE(f(x), y) + beta KL(p(x) || p(x')); its mean is ``Trades.loss``."""
    return F.cross_entropy(logits, y, reduction="none") + beta * kl_to_clean(logits_adv, F.softmax(logits, 1))


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (6) of MART: CE plus a margin term on the most likely wrong class, per example."""
    probs = F.softmax(logits_adv, 1)
    wrong = probs.scatter(1, y[:, None], -1.0).max(1).values
    return F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - wrong + 1e-12)


def mart_terms(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-example terms of MART's Eq. (8): boosted CE on x' and the misclassification-weighted KL, (N,)."""
    p_clean = F.softmax(logits, 1)
    true_prob = p_clean.gather(1, y[:, None]).squeeze(1)
    bce = boosted_ce(logits_adv, y)
    return bce, kl_per_example(F.log_softmax(logits_adv, 1), p_clean) * (1.0000001 - true_prob)


def mart_loss_per_example(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """Eq. (8) of MART per example, (N,); its mean is ``Mart.loss``."""
    bce, kl = mart_terms(logits, logits_adv, y)
    return bce + beta * kl


# --------------------------------------------------------------------------------------------------
# The TRADES attack


def trades_start(x: torch.Tensor) -> torch.Tensor:
    """x + 0.001 N(0, I): the start of the TRADES attack (official yaodongyu/TRADES), also MART's."""
    return x + 0.001 * torch.randn_like(x)


def clean_probabilities(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """p(x) = softmax(f(x)), without gradient: the fixed target of the TRADES attack."""
    with torch.no_grad():
        return F.softmax(model(x), 1)


def trades_attack(model: nn.Module, x: torch.Tensor, threat: ThreatModel) -> torch.Tensor:
    """The TRADES inner maximization: PGD on KL(p(x) || p(x')) from :func:`trades_start`.

    p(x) is computed once and detached, whereas the official loop recomputes it at every attack
    step (same result, fewer passes).
    """
    p_clean = clean_probabilities(model, x)
    return pgd(model, x, p_clean, eps=threat.eps, norm=threat.norm, steps=threat.steps,
               step_size=threat.step_size, init=trades_start(x), loss_fn=kl_to_clean)


# --------------------------------------------------------------------------------------------------
# Weight-space ascent (SAM, OT-MDR)


def global_norm(grads: Sequence[Optional[torch.Tensor]]) -> torch.Tensor:
    """One L2 norm over every parameter's gradient (``None`` for an unused parameter), a scalar."""
    # One fused kernel per dtype and device instead of one per parameter: this bookkeeping would
    # otherwise cost a visible share of a step on small models (benchmarks/method_cost.py).
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([g for g in grads if g is not None])))


@torch.no_grad()
def ascend(params: Sequence[torch.Tensor], direction: Sequence[Optional[torch.Tensor]], scale: torch.Tensor,
           noise_std: float) -> None:
    """One ascent step in place: ``p += scale * d + noise_std * N(0, I)`` for each parameter with a direction."""
    moved = [(p, d) for p, d in zip(params, direction) if d is not None]
    if not moved:
        return
    targets, steps = [p for p, _ in moved], [d for _, d in moved]
    torch._foreach_add_(targets, torch._foreach_mul(steps, scale))
    if noise_std > 0:
        torch._foreach_add_(targets, [torch.randn_like(p) for p in targets], alpha=noise_std)
