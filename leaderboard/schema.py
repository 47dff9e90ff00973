# SPDX-License-Identifier: Apache-2.0
"""Typed leaderboard records and the RobustBench-like rules that turn them into tables.

A :class:`Row` is one evaluated trial run as read from MLflow by :mod:`leaderboard.collect`.
Numbers stay floats (accuracies as fractions in [0, 1]); they are formatted only in
:mod:`leaderboard.render`.

The two orderings the rules need are declared once, here:

* :func:`selection_key` picks the one trial that represents a (method, architecture) in a table.
  It looks at validation metrics only: choosing by test numbers would leak the test set into
  model selection and overstate robustness.
* :func:`rank_key` orders the representatives by test AutoAttack accuracy (RobustBench's rule).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """One evaluated trial run: a candidate leaderboard entry.

    Accuracies are fractions in [0, 1]; ``None`` marks a metric the run did not log.
    """

    run_id: str
    experiment_id: str
    dataset: str
    norm: str
    eps: float
    method: str
    arch: str
    aa_acc: float
    """Test AutoAttack accuracy: the ranking metric."""
    clean_acc: float | None = None
    pgd_acc: float | None = None
    certified_acc: float | None = None
    """Test accuracy certified at eps (Lipschitz nets), when the method provides it."""
    val_pgd_acc: float | None = None
    """Best validation PGD accuracy: the selection metric."""
    val_clean_acc: float | None = None
    epochs: float | None = None
    n_ex: float | None = None
    hparams: tuple[tuple[str, str], ...] = ()
    """The searched hyperparameters as (name, value as logged) pairs."""
    flags: tuple[str, ...] = ()
    trials: float | None = None
    """Search cost: trials run by the search this trial belongs to."""
    trial_epochs: float | None = None
    """Search cost: epochs trained, summed over that search's trials."""


@dataclass(frozen=True)
class Table:
    """One leaderboard table: the ranked entries for a (dataset, norm, eps) threat model."""

    dataset: str
    norm: str
    eps: float
    rows: tuple[Row, ...]


def _desc(x: float | None) -> float:
    """Sort key for "larger is better"; a missing value sorts last."""
    return math.inf if x is None else -x


def selection_key(row: Row) -> tuple:
    """Which trial represents its (method, arch): smallest key wins.

    Best validation PGD accuracy, then best validation clean accuracy, then run id so that the
    choice is deterministic. Never a test metric.
    """
    return (_desc(row.val_pgd_acc), _desc(row.val_clean_acc), row.run_id)


def rank_key(row: Row) -> tuple:
    """Order within a table: AutoAttack accuracy, then clean accuracy, both descending."""
    return (-row.aa_acc, _desc(row.clean_acc), row.method, row.arch, row.run_id)


def tabulate(rows: list[Row]) -> list[Table]:
    """Apply the leaderboard rules to candidate rows.

    Args:
        rows: Evaluated trial runs, e.g. from :func:`leaderboard.collect.collect`.

    Returns:
        One table per (dataset, norm, eps), sorted by those; in each, one row per
        (method, arch), chosen by :func:`selection_key` and ordered by :func:`rank_key`.
    """
    best: dict[tuple, Row] = {}
    for row in rows:
        key = (row.dataset, row.norm, row.eps, row.method, row.arch)
        if key not in best or selection_key(row) < selection_key(best[key]):
            best[key] = row
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in best.values():
        groups[(row.dataset, row.norm, row.eps)].append(row)
    return [Table(*g, rows=tuple(sorted(rs, key=rank_key))) for g, rs in sorted(groups.items())]
