# SPDX-License-Identifier: Apache-2.0
"""ERM: standard training on clean inputs, the undefended reference row.

.. math:: \min_\theta \; \mathbb{E}_{(x,y)} \, \ell(f_\theta(x), y)

See Also: ``pgd_at`` for its adversarial counterpart.
"""
from __future__ import annotations

import torch.nn.functional as F

from otarena.methods.common.method import Method


class Erm(Method):
    paper = "Empirical risk minimization (no defence)"

    def passes(self):
        return 1.0

    def loss(self, x, y, x_adv):
        return F.cross_entropy(self.model(x), y), {}
