# SPDX-License-Identifier: Apache-2.0
"""ERM: standard training on clean inputs, the undefended reference row.

.. math:: \min_\theta \; \mathbb{E}_{(x,y)} \, \ell(f_\theta(x), y)

See Also: ``pgd_at`` for its adversarial counterpart.
"""
from __future__ import annotations

import torch.nn.functional as F

from otarena.methods.common.method import Method, Paper


class Erm(Method):
    # No paper: RobustBench's own undefended entry has no authors and the venue "N/A".
    paper = Paper("Empirical risk minimization (no defence)", venue="N/A")

    def passes(self):
        return 1.0

    def loss(self, x, y, x_adv):
        return F.cross_entropy(self.model(x), y), {}
