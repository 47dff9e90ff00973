# SPDX-License-Identifier: Apache-2.0
"""MART: misclassification-aware adversarial training.

Wang, Zou, Yi, Bailey, Ma, Gu, "Improving Adversarial Robustness Requires Revisiting Misclassified
Examples", ICLR 2020. Implements the per-example loss of their Eq. (8) (methods-spec 1.3):

.. math::
    \mathrm{BCE}(p(x'), y) + \beta \, \mathrm{KL}\big(p(x) \,\|\, p(x')\big) \, (1 - p_y(x)),
    \quad \mathrm{BCE} = -\log p_y(x') - \log\big(1 - \max_{k \ne y} p_k(x')\big)

The attack is PGD on cross-entropy from x + 0.001 N(0, I), as in the official YisenWang/MART.

See Also: ``trades`` (the KL term without the misclassification weight), ``pgd_at``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from methods.common.attacks import pgd
from methods.common.method import Method
from methods.common.train import TRAIN_SPACE
from methods.space import Float
from methods.trades import kl_per_example


@dataclass(frozen=True)
class Config:
    mart_beta: float = 5.0
    """beta: weight of the misclassification-aware KL term (5 for ResNet-18, 6 for WRN)."""


def boosted_ce(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. (6) of MART: CE plus a margin term on the most likely wrong class, per example."""
    probs = F.softmax(logits_adv, 1)
    wrong = probs.scatter(1, y[:, None], -1.0).max(1).values
    return F.cross_entropy(logits_adv, y, reduction="none") - torch.log(1.0001 - wrong + 1e-12)


def mart_terms(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two per-example terms of Eq. (8): boosted CE on x' and the misclassification-weighted KL, each (N,)."""
    p_clean = F.softmax(logits, 1)
    true_prob = p_clean.gather(1, y[:, None]).squeeze(1)
    bce = boosted_ce(logits_adv, y)
    return bce, kl_per_example(F.log_softmax(logits_adv, 1), p_clean) * (1.0000001 - true_prob)


def mart_loss_per_example(logits: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                          beta: float) -> torch.Tensor:
    """Eq. (8) of MART per example, (N,); its mean is ``Mart.loss``."""
    bce, kl = mart_terms(logits, logits_adv, y)
    return bce + beta * kl


class Mart(Method):
    Config = Config
    SEARCH_SPACE = {"mart_beta": Float(1.0, 10.0, 5.0, valid=(0.0, 100.0)), "lr": TRAIN_SPACE["lr"]}
    paper = "Wang et al. 2020, Improving Adversarial Robustness Requires Revisiting Misclassified Examples"
    link = "https://openreview.net/forum?id=rklOg6EFwS"

    def passes(self):
        return self.threat.steps + 2.0

    def perturb(self, x, y):
        t = self.threat
        return pgd(self.model, x, y, eps=t.eps, norm=t.norm, steps=t.steps, step_size=t.step_size,
                   init=x + 0.001 * torch.randn_like(x))

    def loss(self, x, y, x_adv):
        logits = self.model(x)
        logits_adv = self.model(x_adv)
        bce, kl = (term.mean() for term in mart_terms(logits, logits_adv, y))
        return bce + self.cfg.mart_beta * kl, {"bce": bce.detach(), "kl": kl.detach()}
