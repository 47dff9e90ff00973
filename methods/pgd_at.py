# SPDX-License-Identifier: Apache-2.0
"""PGD adversarial training.

Madry, Makelov, Schmidt, Tsipras, Vladu, "Towards Deep Learning Models Resistant to Adversarial
Attacks", ICLR 2018, arXiv:1706.06083. Implements the saddle-point problem of Eq. (2.1):

.. math::
    \min_\theta \; \mathbb{E}_{(x,y)} \Big[ \max_{\|\delta\| \le \varepsilon}
        \ell\big(f_\theta(x+\delta), y\big) \Big]

The inner maximum is K steps of PGD from a uniform random start in the eps-ball, on true labels.

Deviations:
    - The attack runs in eval mode (batch-norm statistics are not updated by adversarial inputs);
      the update runs in train mode. Madry et al. attack in train mode; both are common, and this
      choice is the same for every method here.

See Also: ``trades``, ``mart``.
"""
from __future__ import annotations

import torch.nn.functional as F

from otarena.methods.common.attacks import pgd
from otarena.methods.common.method import Method, Paper, hits
from otarena.methods.common.train import TRAIN_SPACE


class PgdAT(Method):
    SEARCH_SPACE = {"lr": TRAIN_SPACE["lr"], "weight_decay": TRAIN_SPACE["weight_decay"]}
    paper = Paper("Towards Deep Learning Models Resistant to Adversarial Attacks",
                  authors="Aleksander Madry, Aleksandar Makelov, Ludwig Schmidt, Dimitris Tsipras, Adrian Vladu",
                  venue="ICLR 2018", link="https://arxiv.org/abs/1706.06083")

    def passes(self):
        return self.threat.steps + 1.0

    def perturb(self, x, y):
        t = self.threat
        return pgd(self.model, x, y, eps=t.eps, norm=t.norm, steps=t.steps, step_size=t.step_size)

    def loss(self, x, y, x_adv):
        logits_adv = self.model(x_adv)
        return F.cross_entropy(logits_adv, y), {"adv_acc": hits(logits_adv, y)}
