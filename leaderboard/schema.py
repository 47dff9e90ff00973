# SPDX-License-Identifier: Apache-2.0
"""Typed leaderboard records and the RobustBench-like rules that turn them into tables.

A :class:`Row` is one evaluated trial run as read from MLflow by :mod:`leaderboard.collect`.
Numbers stay floats (accuracies as fractions in [0, 1]); they are formatted only in
:mod:`leaderboard.render`.

The two orderings the rules need are declared once, here:

* :func:`selection_key` picks the one trial that represents a (method, architecture) in a table.
  It looks at validation metrics only: choosing by test numbers would leak the test set into
  model selection and overstate robustness.
* :func:`rank_key` orders the representatives by the table's ranking metric, averaged over training
  seeds when the configuration was confirmed with several: test AutoAttack accuracy (RobustBench's
  rule); for rows evaluated without AutoAttack, PGD accuracy in a table of their own; for a
  certified method whose config asks for it, certified accuracy (:attr:`Row.ranking`).

Flags are the evaluation layer's caveats about a row. :func:`is_warning` splits them into
warnings (the evaluation of this model may be wrong: gradient masking, an AutoAttack setting
that does not apply, an unsound certificate) and notes (the numbers are right but imprecise: few
test images, one training seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from otarena.leaderboard.stats import Standing

ACCURACIES = ("clean_acc", "pgd_acc", "aa_acc", "certified_acc")
"""The test accuracies a row carries, each with a 95% CI and, over several seeds, a mean and std."""

NO_AUTOATTACK = "no-autoattack"
"""The flag of a row evaluated without AutoAttack (``final_eval.autoattack: null``): ranked by PGD."""

ROBUST_OVERFITTING, CATASTROPHIC_OVERFITTING = "robust-overfitting", "catastrophic-overfitting"
"""Notes on how the selected trial's validation curve ended (``final_eval.thresholds``): its last epoch far
below its best in PGD accuracy, or, for single-step training, FGSM accuracy far above PGD's."""

NOTE_FLAGS = frozenset({"small-sample", "single-seed", NO_AUTOATTACK, ROBUST_OVERFITTING, CATASTROPHIC_OVERFITTING})
"""Flags about how far a number can be taken (statistical precision, a weaker ranking attack, how training
ended: the best epoch is what is scored), not about whether it is right. Every other flag is a warning
(see :func:`is_warning`)."""

RANKINGS = ("aa_acc", "certified_acc", "pgd_acc")
"""The metrics a table can be ranked by, in the order a threat model's tables come: AutoAttack
(RobustBench's board), certified accuracy (a certified method's rows, when its config asks), PGD (rows
evaluated without AutoAttack). Rows ranked by different metrics never share a table."""


@dataclass(frozen=True)
class Row:
    """One evaluated trial run: a candidate leaderboard entry.

    Accuracies are fractions in [0, 1]; ``None`` marks a metric the run did not log (older stores
    log no CIs, seed counts, means or flag reasons: the defaults then describe them exactly).
    """

    run_id: str
    experiment_id: str
    dataset: str
    norm: str
    eps: float
    method: str
    arch: str
    aa_acc: float | None = None
    """Test AutoAttack accuracy: the ranking metric; ``None`` when the search ran without AutoAttack."""
    aa_acc_deterministic: float | None = None
    """A randomized model only: the AutoAttack cascade's number without EOT (``test/aa_acc_deterministic``),
    shown beside ``aa_acc``, which is then the EOT number and ranks the row."""
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
    clean_ci: tuple[float, float] | None = None
    """95% Wilson confidence interval (low, high) of ``clean_acc`` over the ``n_ex`` test images."""
    pgd_ci: tuple[float, float] | None = None
    aa_ci: tuple[float, float] | None = None
    certified_ci: tuple[float, float] | None = None
    n_seeds: int = 1
    """Training seeds the configuration was trained with, this trial included."""
    test_points: str = ""
    """``<n_ex>:<index hash>`` when the evaluation stored its per-point outcomes (tag ``otarena.test_points``):
    rows with other values were evaluated on other points and are never compared."""
    per_example_hash: str = ""
    """The hash of those outcomes (tag ``otarena.per_example_hash``): with the run id, their cache key."""
    standing: Standing | None = None
    """Its tied group in its table (:func:`leaderboard.stats.tied_groups`): set by the build, which reads the
    per-point outcomes only for the rows it compares (:mod:`leaderboard.per_example`)."""
    clean_acc_mean: float | None = None
    """Mean over the ``n_seeds`` seeds (only when ``n_seeds >= 2``); ``clean_acc`` stays this trial's own."""
    clean_acc_std: float | None = None
    pgd_acc_mean: float | None = None
    pgd_acc_std: float | None = None
    aa_acc_mean: float | None = None
    aa_acc_std: float | None = None
    certified_acc_mean: float | None = None
    certified_acc_std: float | None = None
    flag_reasons: tuple[tuple[str, str], ...] = ()
    """(flag, one-line reason) pairs, in ``flags`` order, for the flags that came with a reason."""
    device_hours: float | None = None
    """Search cost: device-hours (trial wall-clock hours times the devices each trial held)."""
    epoch_device_s: float | None = None
    """Training cost of this trial alone (``cost/epoch_device_s``): device-seconds per epoch, validation included."""
    train_device_hours: float | None = None
    """Training cost of this trial alone (``cost/train_device_hours``): device-hours over all its epochs."""
    images_per_s: float | None = None
    """This trial's measured training throughput (``cost/images_per_s``): training images per second."""
    paper: str | None = None
    """The method's paper (tag ``otarena.paper``), and its link (``otarena.paper_link``)."""
    paper_link: str | None = None
    paper_title: str | None = None
    """The paper's title alone, authors and venue (tags ``otarena.paper_title``, ``_authors``, ``_venue``)."""
    paper_authors: str | None = None
    paper_venue: str | None = None
    rank_by: str = ""
    """``certified_acc`` when the run asks to be ranked by certified accuracy (tag ``otarena.rank_by``)."""
    eps_sweep: "EpsSweep | None" = None
    """Robust accuracy against eps from the final evaluation (tag ``otarena.eps_sweep``)."""
    overfit_gap: float | None = None
    """Robust overfitting: best minus last epoch's validation PGD accuracy (``val/overfit_gap``)."""
    default_clean_acc: float | None = None
    """What tuning bought: the test numbers of the search's paper-default trial (``default/*``), by the same
    protocol as this row's; ``default_run_id`` holds that evaluation (tag ``otarena.default_run``)."""
    default_pgd_acc: float | None = None
    default_aa_acc: float | None = None
    default_epochs: float | None = None
    """Epochs the default trial trained (fewer than the row's when ASHA stopped it early)."""
    default_run_id: str = ""
    default_p: float | None = None
    """Exact McNemar p-value of the default against this row on the same test points (``default/mcnemar_p``)."""
    run_name: str = ""
    """The MLflow run name: user text, escaped in every output."""
    experiment_name: str = ""
    selection_rule: str = ""
    """The rule, in words, that chose this row among its search's trials on validation
    (``otarena.selection_rule``, the trial's or else its search's); empty in stores written before it."""
    selection_rank: int = 1
    """Its place in that rule's order among its search's evaluated trials (``otarena.selection_rank``), 1 for
    the rule's pick."""

    def headline(self, metric: str) -> float | None:
        """The number a reader should take for ``metric`` (one of :data:`ACCURACIES`).

        The mean over seeds when the configuration was trained with several (one seed's number
        is one draw of a noisy quantity), else this trial's own number.
        """
        mean = getattr(self, f"{metric}_mean") if self.n_seeds >= 2 else None
        return getattr(self, metric) if mean is None else mean

    @property
    def ranking(self) -> str:
        """The metric this row is ranked by (one of :data:`RANKINGS`): certified accuracy when the run asks
        for it and has one, else AutoAttack when it ran, else PGD."""
        if self.rank_by == "certified_acc" and self.certified_acc is not None:
            return "certified_acc"
        return "aa_acc" if self.aa_acc is not None else "pgd_acc"

    @property
    def tuning(self) -> tuple[str, float, float] | None:
        """What tuning bought: (metric, the paper defaults' test accuracy, this row's own), AutoAttack where both
        have it, else PGD; ``None`` without a default evaluation."""
        for metric in ("aa_acc", "pgd_acc"):
            default, tuned = getattr(self, f"default_{metric}"), getattr(self, metric)
            if default is not None and tuned is not None:
                return metric, default, tuned
        return None

    @property
    def warnings(self) -> tuple[str, ...]:
        """The flags that question the evaluation itself (:func:`is_warning`)."""
        return tuple(f for f in self.flags if is_warning(f))

    @property
    def notes(self) -> tuple[str, ...]:
        """The flags about statistical precision only."""
        return tuple(f for f in self.flags if not is_warning(f))


@dataclass(frozen=True)
class EpsSweep:
    """PGD accuracy at growing radii (fractions), and the chance bound no classifier can beat at the last."""

    eps: tuple[float, ...]
    pgd_acc: tuple[float, ...]
    """White-box PGD-``steps``: a curve that stays flat at large eps betrays gradient masking."""
    robust_acc: tuple[float, ...]
    """PGD plus the gradient-free grey-image candidate: reaches ``chance_bound`` at the last radius."""
    chance_bound: float
    steps: int = 0


@dataclass(frozen=True)
class TrialPoint:
    """Any trial of a search, evaluated or not: what the sensitivity, progress and Pareto plots show."""

    run_id: str
    experiment_id: str
    parent_id: str
    dataset: str
    norm: str
    eps: float
    method: str
    arch: str
    outcome: str
    """``completed``, ``pruned`` or ``failed``."""
    val_pgd_acc: float | None
    """Best validation PGD accuracy (what the search maximizes)."""
    epochs: float | None
    """Epochs trained: its share of the search's trial-epochs."""
    end_time: int | None
    """When the run ended (ms since the epoch); orders the search's progress."""
    hparams: tuple[tuple[str, str], ...] = ()
    """The searched hyperparameters as (name, value as logged)."""
    clean_acc: float | None = None
    """Test numbers, only for evaluated trials (the Pareto plot)."""
    aa_acc: float | None = None
    val_clean_acc: float | None = None
    """Best-epoch validation clean accuracy: with ``val_pgd_acc``, the trial on the validation trade-off plot."""
    pareto: bool = False
    """In its multi-objective search's Pareto set on validation (``otarena.pareto``)."""


@dataclass(frozen=True)
class Fidelity:
    """A search's rank fidelity at one ASHA rung, from its parent run (docs/mlflow-schema.md)."""

    parent_id: str
    epoch: int
    rho: float | None
    """Spearman's rho between the trials' validation PGD accuracy at this epoch and their final one."""
    reason: str = ""
    """Why there is no ``rho`` (too few trials reached max_epochs, no spread)."""


@dataclass(frozen=True)
class Importance:
    """Which knobs matter for one search: each searched hyperparameter's importance for its selection metric, from
    its parent run (``importance/<param>``, docs/mlflow-schema.md), or the reason it has none."""

    parent_id: str
    method: str
    arch: str
    values: tuple[tuple[str, float], ...] = ()
    """(hyperparameter, fraction), the fractions summing to 1, largest first."""
    reason: str = ""
    evaluator: str = ""
    """How they were computed (``search.importance_evaluator``)."""


@dataclass(frozen=True)
class Campaign:
    """Everything a leaderboard build read: the candidate rows and every trial of their searches."""

    rows: tuple[Row, ...]
    trials: tuple[TrialPoint, ...]
    reproductions: tuple[dict, ...] = ()
    """The claimed-against-measured tables of ``otarena reproduce`` (:mod:`leaderboard.reproductions`)."""
    fidelity: tuple[Fidelity, ...] = ()
    """Every search's rank fidelity per rung, shown with its search-progress line."""
    importance: tuple[Importance, ...] = ()
    """Every search's hyperparameter importances (or why it has none), shown beside its sensitivity plots."""


def is_warning(flag: str) -> bool:
    """Whether a flag questions the model's evaluation (``masking:*``, ``aa-check:*``,
    ``unsound-certificate``) rather than only its precision (``small-sample``, ``single-seed``).

    A flag name this module does not know is a warning: the evaluation layer may add flags before
    the leaderboard learns them, and showing a new caveat too loudly is the safer mistake than
    hiding one.
    """
    return flag not in NOTE_FLAGS


@dataclass(frozen=True)
class Table:
    """One leaderboard table: the entries of a (dataset, norm, eps) threat model ranked by one metric."""

    dataset: str
    norm: str
    eps: float
    rows: tuple[Row, ...]
    ranking: str = "aa_acc"
    """The metric the rows are ranked by (:data:`RANKINGS`)."""


def _desc(x: float | None) -> float:
    """Sort key for "larger is better"; a missing value sorts last."""
    return math.inf if x is None else -x


def selection_key(row: Row) -> tuple:
    """Which trial represents its (method, arch): smallest key wins.

    Only a search's pick by its own selection rule competes (``selection_rank`` 1: with ``top_k > 1`` or the
    Pareto set evaluated, the rule may prefer a trial of lower validation PGD accuracy, e.g. one meeting a
    clean-accuracy condition); then best validation PGD accuracy, then best validation clean accuracy, then
    run id so that the choice is deterministic. Never a test metric.
    """
    return (row.selection_rank > 1, _desc(row.val_pgd_acc), _desc(row.val_clean_acc), row.run_id)


def rank_key(row: Row, ranking: str = "aa_acc") -> tuple:
    """Order within a table: the ranking metric (AutoAttack accuracy by default), then clean accuracy,
    both descending.

    Both are :meth:`Row.headline` numbers: the mean over seeds when there are several, so that a
    configuration confirmed on several seeds is ranked by what it reproducibly reaches rather
    than by its luckiest (or unluckiest) seed.
    """
    return (_desc(row.headline(ranking)), _desc(row.headline("clean_acc")), row.method, row.arch, row.run_id)


def tabulate(rows: list[Row]) -> list[Table]:
    """Apply the leaderboard rules to candidate rows.

    Args:
        rows: Evaluated trial runs, e.g. from :func:`leaderboard.collect.collect`.

    Returns:
        One table per (dataset, norm, eps) and ranking metric (:attr:`Row.ranking`), sorted by those
        (:data:`RANKINGS` order); in each, one row per (method, arch), chosen by :func:`selection_key`
        among all the threat model's rows and ordered by :func:`rank_key`. A row evaluated without
        AutoAttack is never ranked against one evaluated with it: it goes to its threat model's PGD
        table, after the AutoAttack one.
    """
    best: dict[tuple, Row] = {}
    for row in rows:
        key = (row.dataset, row.norm, row.eps, row.method, row.arch)
        if key not in best or selection_key(row) < selection_key(best[key]):
            best[key] = row
    groups: dict[tuple, list[Row]] = defaultdict(list)
    for row in best.values():
        groups[(row.dataset, row.norm, row.eps, RANKINGS.index(row.ranking))].append(row)
    return [Table(dataset, norm, eps, rows=tuple(sorted(rs, key=lambda r: rank_key(r, RANKINGS[k]))),
                  ranking=RANKINGS[k])
            for (dataset, norm, eps, k), rs in sorted(groups.items())]
