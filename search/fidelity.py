# SPDX-License-Identifier: Apache-2.0
"""Rank fidelity: does a rung's early validation score rank the trials as their final result does?

ASHA prunes a trial at a rung (epoch ``grace``, ``grace * eta``, ...) on its validation PGD accuracy
there. That is only sound when the ranking at the rung agrees with the final ranking. Rice et al.
("Overfitting in adversarially robust deep learning", ICML 2020) trained adversarially robust
models whose order before the learning-rate decay was unrelated, or reversed, to their final order.

Per rung, among the trials that reached ``max_epochs``: Spearman's rank correlation between each
trial's validation metric at the rung epoch and its final selection metric (the best-epoch
validation PGD accuracy). Ties take their average rank, and rho is the Pearson correlation of those
ranks (the standard tie-corrected Spearman rho). What is logged where: ``docs/mlflow-schema.md``.

Pure Python (the rungs come from ``methods.common.train.rung_milestones`` when asked): the search
(``search/run.py``) and ``benchmarks/search_efficiency.py`` both use it without Ray or MLflow.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Hashable, Iterable, Mapping, Optional, Sequence

MIN_TRIALS = 4
"""Trials (that reached max_epochs) a rung needs for a rho. With n trials a ranking agrees perfectly
with the final one by chance with probability 1/n!: 1/6 (17%) for 3 trials, 1/24 (4%) for 4. Four
is the fewest for which even a perfect agreement says more than chance at the 5% level."""

WARN_BELOW = 0.5
"""A rung whose rho is below this ranks the trials too unlike their final result to prune on it."""

METRIC_PREFIX = "fidelity/rung_"
"""Parent-run metric ``fidelity/rung_<epoch>``: the rho at that rung (docs/mlflow-schema.md)."""


@dataclass(frozen=True)
class RungFidelity:
    """One rung's rank fidelity: ``rho``, or ``None`` with the ``reason`` it has none."""

    epoch: int
    n_trials: int
    """Trials that reached max_epochs and have a value at this rung: the ones rho is computed over."""
    rho: Optional[float] = None
    reason: Optional[str] = None

    @property
    def metric(self) -> str:
        return f"{METRIC_PREFIX}{self.epoch}"

    @property
    def low(self) -> bool:
        return self.rho is not None and self.rho < WARN_BELOW

    def line(self) -> str:
        """One line for the search's log: the rho or why there is none, and the warning when it is low."""
        if self.rho is None:
            return f"rank fidelity at rung epoch {self.epoch}: none ({self.reason})"
        text = f"rank fidelity at rung epoch {self.epoch}: Spearman rho {self.rho:+.2f} over {self.n_trials} trials"
        if self.low:
            text = (f"WARNING: {text}, below {WARN_BELOW}: the ranking at epoch {self.epoch} is a poor guide to the "
                    f"final one, so pruning there may drop the best trials")
        return text


def rungs(grace_epochs: int, reduction_factor: int, max_epochs: int) -> list[int]:
    """ASHA's milestones before the end: grace, grace * eta, grace * eta^2, ... below max_epochs.

    A FIFO search has the same milestones from its budget, so that its fidelity says what ASHA
    would have pruned on.
    """
    from otarena.methods.common.train import rung_milestones  # the one definition (rung_cosine's cycles)

    return rung_milestones(max_epochs, grace_epochs, reduction_factor)[:-1]


def rank_fidelity(curves: Mapping[Hashable, Mapping[int, float]], finals: Mapping[Hashable, float],
                  rung_epochs: Iterable[int]) -> list[RungFidelity]:
    """One ``RungFidelity`` per rung epoch.

    ``curves``: per trial, its validation metric at each epoch it trained (at least the rung epochs).
    ``finals``: the final selection metric of each trial that reached max_epochs, and only those:
    a pruned trial has no final result to compare with.
    """
    out = []
    for epoch in rung_epochs:
        pairs = [(curves[t][epoch], final) for t, final in finals.items()
                 if t in curves and epoch in curves[t] and _number(curves[t][epoch]) and _number(final)]
        n = len(pairs)
        if n < MIN_TRIALS:
            out.append(RungFidelity(epoch, n, reason=f"too few trials: {n} reached max_epochs, "
                                                     f"at least {MIN_TRIALS} needed"))
            continue
        rho = spearman([a for a, _ in pairs], [b for _, b in pairs])
        if rho is None:
            same = "rung" if len({a for a, _ in pairs}) == 1 else "final"
            out.append(RungFidelity(epoch, n, reason=f"no ranking: every trial has the same {same} value"))
        else:
            out.append(RungFidelity(epoch, n, rho=rho))
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    """Spearman's rho with average ranks for ties; ``None`` when either side has a single value."""
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx, vy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if vx == 0 or vy == 0:
        return None
    return cov / math.sqrt(vx * vy)


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n, tied values sharing the mean of the ranks they span: [10, 20, 20, 30] -> [1, 2.5, 2.5, 4]."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            ranks[i] = (start + end) / 2 + 1
        start = end + 1
    return ranks


def _number(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
