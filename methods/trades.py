# SPDX-License-Identifier: Apache-2.0
"""TRADES: a surrogate of the robust error split into natural error plus a boundary term.

Zhang, Yu, Jiao, Xing, El Ghaoui, Jordan, "Theoretically Principled Trade-off between Robustness
and Accuracy", ICML 2019, arXiv:1901.08573. Implements the objective of their Eq. (5)
with ``trades_beta`` = 1/lambda:

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

import torch.nn.functional as F

from otarena.methods.common.functional import kl_to_clean, trades_attack
from otarena.methods.common.method import Method, Paper
from otarena.methods.common.train import TRAIN_SPACE
from otarena.methods.space import Float


@dataclass(frozen=True)
class Config:
    trades_beta: float = 6.0
    """beta (= 1/lambda in the paper): weight of the KL boundary term."""


class Trades(Method):
    Config = Config
    SEARCH_SPACE = {"trades_beta": Float(1.0, 12.0, 6.0, log=True, valid=(0.0, 100.0)), "lr": TRAIN_SPACE["lr"]}
    paper = Paper("Theoretically Principled Trade-off between Robustness and Accuracy",
                  authors="Hongyang Zhang, Yaodong Yu, Jiantao Jiao, Eric P. Xing, Laurent El Ghaoui, Michael I. Jordan",
                  venue="ICML 2019", link="https://arxiv.org/abs/1901.08573")

    def passes(self):
        return self.threat.steps + 2 + 1 / 3      # + the no-grad clean forward that fixes p(x)

    def perturb(self, x, y):
        return trades_attack(self.model, x, self.threat)

    def loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        natural = F.cross_entropy(logits, y)
        robust = kl_to_clean(logits_adv, F.softmax(logits, 1)).mean()
        return natural + self.cfg.trades_beta * robust, {"natural": natural.detach(), "kl": robust.detach()}
