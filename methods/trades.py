# SPDX-License-Identifier: Apache-2.0
"""TRADES: a surrogate of the robust error split into natural error plus a boundary term.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness
and Accuracy", ICML 2019, arXiv:1901.08573. Implements the objective of their Eq. (5)
(methods-spec 1.2), with ``trades_beta`` = 1/lambda:

.. math::
    \min_\theta \; \mathbb{E} \Big[ \ell(f_\theta(x), y) + \beta \max_{x' \in B(x,\varepsilon)}
        \mathrm{KL}\big(p_\theta(x) \,\|\, p_\theta(x')\big) \Big]

Deviations:
    - p(x) for the attack is computed once per batch and detached, whereas the official
      yaodongyu/TRADES loop recomputes it at every attack step (same result, fewer passes).

See Also: ``pgd_at``, ``mart``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.common.attacks import pgd
from methods.common.method import Method
from methods.common.train import TRAIN_SPACE
from methods.space import Float


@dataclass(frozen=True)
class Config:
    trades_beta: float = 6.0
    """beta (= 1/lambda in the paper): weight of the KL boundary term."""


def kl_per_example(log_p_adv: torch.Tensor, p_clean: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p_adv) per example, (N,)."""
    return F.kl_div(log_p_adv, p_clean, reduction="none").sum(1)


def trades_loss_per_example(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                            beta: float) -> torch.Tensor:
    """Eq. (5) of TRADES per example, (N,): CE(f(x), y) + beta KL(p(x) || p(x')); its mean is ``Trades.loss``."""
    return F.cross_entropy(logits, y, reduction="none") + beta * kl_per_example(
        F.log_softmax(logits_adv, 1), F.softmax(logits, 1))


def trades_attack(model, x, p_clean, threat):
    """The TRADES inner maximization: PGD on KL(p(x) || p(x')) from x + 0.001 N(0, I)."""
    init = x + 0.001 * torch.randn_like(x)
    return pgd(model, x, p_clean, eps=threat.eps, norm=threat.norm, steps=threat.steps,
               step_size=threat.step_size, init=init,
               loss_fn=lambda logits, p: kl_per_example(F.log_softmax(logits, 1), p))


class Trades(Method):
    Config = Config
    SEARCH_SPACE = {"trades_beta": Float(1.0, 12.0, 6.0, log=True, valid=(0.0, 100.0)), "lr": TRAIN_SPACE["lr"]}
    paper = "Zhang et al. 2019, Theoretically Principled Trade-off between Robustness and Accuracy"
    link = "https://arxiv.org/abs/1901.08573"

    def passes(self):
        return self.threat.steps + 2 + 1 / 3      # + the no-grad clean forward that fixes p(x)

    def perturb(self, x, y):
        with torch.no_grad():
            p_clean = F.softmax(self.model(x), 1)
        return trades_attack(self.model, x, p_clean, self.threat)

    def loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = kl_per_example(F.log_softmax(logits_adv, 1), F.softmax(logits, 1)).mean()
        return natural + self.cfg.trades_beta * robust, {"natural": natural.detach(), "kl": robust.detach()}
