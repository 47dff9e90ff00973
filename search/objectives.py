# SPDX-License-Identifier: Apache-2.0
"""What a search maximizes, the constraints it respects and the rule that picks the trials to evaluate.

A search maximizes one or more validation metrics (``objectives``), each trial scored by its best epoch's
value (``val/best_pgd_acc``, ``val/best_clean_acc``: the epoch whose weights it keeps). With several, no
trial is "the best": the Pareto set is every trial that no other beats on one objective without losing
on another (docs/mlflow-schema.md, ``search/pareto.json``). Here are the pure pieces: dominance,
non-dominated sorting into fronts and crowding distance (Deb et al., "A fast and elitist multiobjective
genetic algorithm: NSGA-II", IEEE TEC 2002, Sections III-A and III-B), constraints in Optuna's form (a
value <= 0 is feasible: ``Trial.set_constraint``), and the selection rule of ``final_eval.select``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional, Sequence

OBJECTIVE_METRICS = ("val/pgd_acc", "val/clean_acc")
"""The validation metrics the trainable reports every epoch together with their best epoch's value
(``search/trainable.py``): what an objective, a constraint or a selection rule may name."""
DEFAULT_OBJECTIVES = ("val/pgd_acc",)


def best_key(metric: str) -> str:
    """A trial's value of an objective: its best epoch's (``val/pgd_acc`` -> ``val/best_pgd_acc``)."""
    return metric.replace("val/", "val/best_", 1)


def check_metric(metric: str, where: str = "") -> None:
    if metric not in OBJECTIVE_METRICS:
        raise ValueError(f"{_at(where)}{metric!r} is not a validation metric a trial reports; "
                         f"choose from {list(OBJECTIVE_METRICS)}")


def _at(where: str) -> str:
    return f"{where}: " if where else ""


# --- Pareto dominance, fronts and crowding (all objectives maximized) ---

def _value(x: float) -> float:
    """NaN (a trial that never scored) ranks below every number."""
    return -math.inf if x is None or math.isnan(x) else x


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` at least as good as ``b`` on every objective and better on one (maximizing)."""
    a, b = [_value(x) for x in a], [_value(x) for x in b]
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def non_dominated_fronts(points: Sequence[Sequence[float]]) -> list[list[int]]:
    """Indices of ``points`` by front: the first front is dominated by none, the second only by the first, ...
    (NSGA-II's fast non-dominated sort; each front in index order)."""
    n = len(points)
    beaten_by = [0] * n
    beats: list[list[int]] = [[] for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            if dominates(points[i], points[j]):
                beats[i].append(j)
                beaten_by[j] += 1
            elif dominates(points[j], points[i]):
                beats[j].append(i)
                beaten_by[i] += 1
    fronts, current = [], [i for i in range(n) if beaten_by[i] == 0]
    while current:
        fronts.append(sorted(current))
        following = []
        for i in current:
            for j in beats[i]:
                beaten_by[j] -= 1
                if beaten_by[j] == 0:
                    following.append(j)
        current = following
    return fronts


def crowding_distance(points: Sequence[Sequence[float]], front: Sequence[int]) -> dict[int, float]:
    """Per index of ``front``: NSGA-II's crowding distance, the sum over objectives of the gap between its two
    neighbours on that objective, as a share of the front's range. The two ends of each objective get
    infinity, so that a front's extremes are kept first; a front of one or two points is all ends."""
    distance = {i: 0.0 for i in front}
    if len(front) <= 2:
        return {i: math.inf for i in front}
    for k in range(len(points[front[0]])):
        ordered = sorted(front, key=lambda i: _value(points[i][k]))
        low, high = _value(points[ordered[0]][k]), _value(points[ordered[-1]][k])
        distance[ordered[0]] = distance[ordered[-1]] = math.inf
        span = high - low
        if not math.isfinite(span) or span == 0:
            continue
        for before, i, after in zip(ordered, ordered[1:], ordered[2:]):
            distance[i] += (_value(points[after][k]) - _value(points[before][k])) / span
    return distance


def sort_key(points: Sequence[Sequence[float]]) -> list[tuple[int, float]]:
    """Per point, a key that orders the points best first: its front, then crowding distance (larger first)."""
    key: list[tuple[int, float]] = [(0, 0.0)] * len(points)
    for rank, front in enumerate(non_dominated_fronts(points)):
        for i, distance in crowding_distance(points, front).items():
            key[i] = (rank, -distance)
    return key


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates (equal points are all kept)."""
    fronts = non_dominated_fronts(points)
    return fronts[0] if fronts else []


# --- constraints and the selection rule ---

_CONDITION = re.compile(r"^\s*(?P<metric>\S+)\s*(?P<op>>=|<=)\s*(?P<bound>[-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class Condition:
    """``<metric> >= <bound>`` or ``<metric> <= <bound>`` on a trial's best-epoch validation value."""

    metric: str
    op: str
    bound: float

    @classmethod
    def parse(cls, text: str, where: str = "") -> "Condition":
        match = _CONDITION.match(str(text))
        if not match:
            raise ValueError(f"{_at(where)}expected '<metric> >= <number>' or '<metric> <= <number>', got {text!r}")
        try:
            bound = float(match["bound"])
        except ValueError:
            raise ValueError(f"{_at(where)}{match['bound']!r} is not a number") from None
        check_metric(match["metric"], where)
        return cls(match["metric"], match["op"], bound)

    def excess(self, value: Optional[float]) -> float:
        """Optuna's constraint value for a metric's value: <= 0 when met, else by how much it is missed; a value
        that is missing or NaN misses it by 1 (a whole accuracy range)."""
        if value is None or math.isnan(value):
            return 1.0
        return (self.bound - value) if self.op == ">=" else (value - self.bound)

    def violation(self, metrics: dict) -> float:
        """:meth:`excess` of a trial's best-epoch value (``val/best_*``)."""
        return self.excess(metrics.get(best_key(self.metric)))

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.bound:g}"


def _others(maximize: str, objectives: Sequence[str]) -> tuple[str, ...]:
    """The tie-breakers: the search's other objectives, then the other reported metrics (a single-objective
    search of validation PGD accuracy breaks ties by clean accuracy, as it always has)."""
    return tuple(dict.fromkeys(m for m in (*objectives, *OBJECTIVE_METRICS) if m != maximize))


_RULE = re.compile(r"^\s*max\s+(?P<metric>\S+)(\s+where\s+(?P<where>.+))?$", re.IGNORECASE)


@dataclass(frozen=True)
class Selection:
    """Which trials are evaluated on the test split, chosen on validation only.

    ``maximize``: the metric the pick maximizes (ties: the search's other objectives, in order); ``where``:
    conditions the pick must meet (``final_eval.select``'s, else the config's ``constraints``). When no trial
    meets them, the pick is the trial that misses them by the least (then by ``maximize``), and the rule in
    words says so (:meth:`describe`)."""

    maximize: str
    tiebreak: tuple[str, ...] = ()
    where: tuple[Condition, ...] = ()

    @classmethod
    def parse(cls, rule: Optional[str], objectives: Sequence[str], constraints: Sequence[str] = ()) -> "Selection":
        """``final_eval.select`` (``"max val/pgd_acc where val/clean_acc >= 0.8"``, several conditions joined by
        ``and``), or by default the first objective under the config's constraints."""
        if rule is None:
            conditions = tuple(Condition.parse(c, "constraints") for c in constraints)
            return cls(objectives[0], _others(objectives[0], objectives), conditions)
        match = _RULE.match(rule)
        if not match:
            raise ValueError(f"expected 'max <metric>' or 'max <metric> where <metric> >= "
                             f"<number>', got {rule!r}")
        check_metric(match["metric"])
        parts = re.split(r"\s+and\s+", match["where"].strip(), flags=re.IGNORECASE) if match["where"] else []
        conditions = tuple(Condition.parse(part) for part in parts)
        return cls(match["metric"], _others(match["metric"], objectives), conditions)

    def describe(self, met: bool = True) -> str:
        """The rule in words (``otarena.selection_rule``)."""
        text = f"highest {self.maximize}" + (f" with {' and '.join(map(str, self.where))}" if self.where else "")
        return text if met else f"{text}; no trial met it: the closest to it"

    def missed_by(self, metrics: dict) -> float:
        return sum(max(0.0, c.violation(metrics)) for c in self.where)

    def order(self, metrics: Sequence[dict]) -> tuple[list[int], bool]:
        """Indices of ``metrics`` best first by this rule, and whether the first meets its conditions."""
        def key(i: int) -> tuple:
            m = metrics[i]
            return (self.missed_by(m), *(-_value(m.get(best_key(k), math.nan)) for k in (self.maximize,
                                                                                         *self.tiebreak)))
        ordered = sorted(range(len(metrics)), key=key)
        return ordered, bool(ordered) and self.missed_by(metrics[ordered[0]]) == 0
