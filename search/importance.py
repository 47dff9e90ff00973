# SPDX-License-Identifier: Apache-2.0
"""Which knobs matter: the importance of each searched hyperparameter for a search's selection metric.

Computed from the trial table (each completed trial's params and its value of the selection metric) with
Optuna's PED-ANOVA (Watanabe et al., "PED-ANOVA: Efficiently Quantifying Hyperparameter Importance in
Arbitrary Subspaces", IJCAI 2023; ``optuna.importance.PedAnovaImportanceEvaluator``, Optuna's default): a
parameter matters in proportion to how far its distribution among the top-quantile trials departs from its
distribution among all of them. Which trials are the top depends on the direction, so the table becomes an
in-memory study created with the search's direction (``optuna.create_study(direction=...)``), one
``optuna.trial.create_trial`` per trial, with the distributions the method declared (``search/spaces.py``):
a maximized metric keeps its highest values on top. (optuna-dashboard's importance view ranks a maximized
objective as if it were minimized, optuna-dashboard #1329.)

What is logged where (``importance/<param>``, ``search.importance_evaluator``, ``otarena.importance_reason``):
``docs/mlflow-schema.md``. Optuna only, no Ray or MLflow: the tracker is any object with the Tracker's
``log_metrics``/``log_params``/``set_tags``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import optuna

from otarena.leaderboard import tags as tag
from otarena.methods.space import Choice, Float, Int
from otarena.search import spaces
from otarena.search.objectives import best_key

MIN_TOP = 5
"""Trials the top quantile holds at least: Optuna's PED-ANOVA documentation asks for at least 5 above the
target quantile to stabilise the analysis."""
TARGET_QUANTILE = 0.1
"""The top quantile PED-ANOVA contrasts with all trials (the paper's gamma', Optuna's default), widened to
``MIN_TOP`` trials in a smaller search."""
MIN_TRIALS = 15
"""Completed trials needed. In a synthetic table of four knobs where one alone decides the value (the test's),
that knob ranked first for both directions in 82% of random tables of 10 trials, 92% of 12 and 99% of 15
(measured over 40 and 200 tables): with fewer, the bars would too often name a knob that decides nothing."""
METRIC_PREFIX = "importance/"
EVALUATOR_PARAM = "search.importance_evaluator"


@dataclass(frozen=True)
class Importance:
    """A search's hyperparameter importances for ``metric`` (fractions summing to 1, largest first), or the
    ``reason`` there are none."""

    metric: str
    direction: str
    n_trials: int
    """Completed trials the importances were computed from."""
    values: dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None
    evaluator: str = ""

    def metrics(self) -> dict[str, float]:
        return {f"{METRIC_PREFIX}{name}": value for name, value in self.values.items()}

    def line(self) -> str:
        """One line for the search's log: which knobs matter, or why that is not known."""
        if self.reason:
            return f"hyperparameter importance for {self.metric}: none ({self.reason})"
        shown = ", ".join(f"{name} {value:.0%}" for name, value in self.values.items())
        return f"which knobs matter for {self.metric} ({self.n_trials} completed trials, PED-ANOVA): {shown}"

    def record(self, tracker, run_id: str) -> None:
        """Onto a search's parent run: the metrics and the evaluator, or the reason."""
        if self.reason:
            tracker.set_tags(run_id, {tag.IMPORTANCE_REASON: self.reason})
        else:
            tracker.log_metrics(run_id, self.metrics())
            tracker.log_params(run_id, {EVALUATOR_PARAM: self.evaluator})


def distribution(domain: Any) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution of a searched domain, as ``spaces.DefineByRun`` suggests it."""
    if isinstance(domain, Float):
        return optuna.distributions.FloatDistribution(domain.low, domain.high, log=domain.log)
    if isinstance(domain, Int):
        return optuna.distributions.IntDistribution(domain.low, domain.high, log=domain.log)
    if isinstance(domain, Choice):
        return optuna.distributions.CategoricalDistribution(list(domain.options))
    raise TypeError(f"not a searched domain: {domain!r}")


def importance(table: Iterable[tuple[Mapping[str, Any], float]], space: Mapping[str, Any], *,
               metric: str = "val/best_pgd_acc", direction: str = "maximize", of: str = "") -> Importance:
    """The importances of the searched parameters of ``space`` for ``metric`` from a trial table.

    ``table``: one (params, value) pair per *completed* trial. A trial whose value is not a finite number, or
    whose params lie outside the space (a space changed since), is left out. ``of``: what the reason for too
    few trials adds after their number (`` of 16 trials, the rest pruned or failed``).
    """
    domains = spaces.searched(dict(space))
    if not domains:
        return Importance(metric, direction, 0, reason="no hyperparameter was searched")
    dists = {name: distribution(d) for name, d in domains.items()}
    trials = []
    for params, value in table:
        if not isinstance(value, (int, float)) or not math.isfinite(value) or \
                any(name not in params for name in dists):
            continue
        try:
            trials.append(optuna.trial.create_trial(
                params={name: params[name] for name in dists}, distributions=dists, value=float(value)))
        except ValueError:  # a value outside its distribution
            continue
    n = len(trials)
    if n < MIN_TRIALS:
        return Importance(metric, direction, n, reason=f"too few completed trials: {n}{of}, at least {MIN_TRIALS} "
                                                       f"needed")
    if len({t.value for t in trials}) == 1:
        return Importance(metric, direction, n, reason=f"every completed trial has the same {metric}")
    quantile = max(TARGET_QUANTILE, MIN_TOP / n)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory" line per search
    try:
        study = optuna.create_study(direction=direction, storage=optuna.storages.InMemoryStorage())
        study.add_trials(trials)
        with warnings.catch_warnings():  # "importances will be equal" and the like: the sum below says it
            warnings.simplefilter("ignore")
            raw = optuna.importance.get_param_importances(study, evaluator=evaluator, normalize=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    total = sum(raw.values())
    if not total > 0:
        return Importance(metric, direction, n, reason="no parameter's distribution differs between the top "
                                                       "trials and the rest")
    values = dict(sorted(((name, raw.get(name, 0.0) / total) for name in dists), key=lambda kv: (-kv[1], kv[0])))
    return Importance(metric, direction, n, values,
                      evaluator=f"optuna PED-ANOVA (target_quantile={quantile:.3g}, {direction} {metric})")


def of_search(results: list, space: Mapping[str, Any], *, max_epochs: int,
              objective: str = "val/pgd_acc") -> Importance:
    """The importances of one search from Ray's results (every trial of a resumed search too): the completed
    trials, those that trained ``max_epochs`` without error, with their best-epoch value of ``objective``
    (maximized, as every objective otarena searches)."""
    metric = best_key(objective)
    table = [(r.config or {}, r.metrics.get(metric)) for r in results
             if r.error is None and r.metrics and int(r.metrics.get("training_iteration", 0)) >= max_epochs]
    rest = len(results) - len(table)
    return importance(table, space, metric=metric, direction="maximize",
                      of=f" of {len(results)} trials, the rest pruned or failed" if rest else "")
