# SPDX-License-Identifier: Apache-2.0
"""MART: misclassification-aware adversarial training.

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", ICLR 2020. Implements the per-example loss of their Eq. (8)
(``methods.common.functional.mart_terms``):

.. math::
    \mathrm{BCE}(p(x'), y) + \beta \, \mathrm{KL}\big(p(x) \,\|\, p(x')\big) \, (1 - p_y(x)),
    \quad \mathrm{BCE} = -\log p_y(x') - \log\big(1 - \max_{k \ne y} p_k(x')\big)

The attack is PGD on cross-entropy from x + 0.001 N(0, I), as in the official YisenWang/MART.

See Also: ``trades`` (the KL term without the misclassification weight), ``pgd_at``.
"""
from __future__ import annotations

from dataclasses import dataclass

from otarena.methods.common.attacks import pgd
from otarena.methods.common.functional import mart_terms, trades_start
from otarena.methods.common.method import Method, Paper
from otarena.methods.common.train import TRAIN_SPACE
from otarena.methods.space import Float


@dataclass(frozen=True)
class Config:
    mart_beta: float = 5.0
    """beta: weight of the misclassification-aware KL term (5 for ResNet-18, 6 for WRN)."""


class Mart(Method):
    Config = Config
    SEARCH_SPACE = {"mart_beta": Float(1.0, 10.0, 5.0, valid=(0.0, 100.0)), "lr": TRAIN_SPACE["lr"]}
    paper = Paper("Improving Adversarial Robustness Requires Revisiting Misclassified Examples",
                  authors="Yisen Wang, Difan Zou, Jinfeng Yi, James Bailey, Xingjun Ma, Quanquan Gu",
                  venue="ICLR 2020", link="https://openreview.net/forum?id=rklOg6EFwS")

    def passes(self):
        return self.threat.steps + 2.0

    def perturb(self, x, y):
        t = self.threat
        return pgd(self.model, x, y, eps=t.eps, norm=t.norm, steps=t.steps, step_size=t.step_size,
                   init=trades_start(x))

    def loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        bce, kl = (term.mean() for term in mart_terms(logits, logits_adv, y))
        return bce + self.cfg.mart_beta * kl, {"bce": bce.detach(), "kl": kl.detach()}
