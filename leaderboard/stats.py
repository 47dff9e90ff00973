# SPDX-License-Identifier: Apache-2.0
"""Paired significance between the rows of one table, and the groups of rows it cannot tell apart.

Two rows evaluated on the same test points are compared with an exact McNemar test on their per-example
outcomes (McNemar 1947; the exact form is a two-sided binomial test of the discordant pairs against 1/2):
only the points one row gets right and the other wrong say anything about which is more robust. A table's
rows are compared with the next one down, the p-values Holm-corrected over those adjacent comparisons
(Holm 1979), and a row is *tied* with the next one down when the corrected p-value is not below 5%: the
chains of ties are the table's tied groups.

Rows evaluated on different points (another ``n_ex`` or another hash of the test indices) are never
compared: :func:`tied_groups` says so on such a row instead. Pure Python, no numpy or torch: it runs in
the leaderboard build.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

ALPHA = 0.05
"""The level of the adjacent comparisons, family-wise over a table's comparisons (Holm)."""


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Exact two-sided McNemar p-value from the discordant counts.

    Args:
        only_first: Points the first row gets right and the second wrong.
        only_second: Points the second row gets right and the first wrong.

    Returns:
        ``P(X <= min) + P(X >= max)`` for ``X ~ Binomial(only_first + only_second, 1/2)``, capped at 1;
        1 when there is no discordant pair (nothing tells the rows apart). Computed with exact integers,
        so it is exact for any test-set size.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_first} and {only_second}")
    n, k = only_first + only_second, min(only_first, only_second)
    if 2 * k == n:
        return 1.0
    tail, term = 0, 1  # term = C(n, i)
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, float(Fraction(2 * tail, 1 << n)))


def discordant(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int]:
    """(points only ``first`` gets right, points only ``second`` gets right), on the same points in the same order."""
    if len(first) != len(second):
        raise ValueError(f"outcomes on {len(first)} and {len(second)} points: not the same points")
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    return only_first, only_second


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (Holm 1979), in the order given: reject where adjusted < alpha."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for step, i in enumerate(sorted(range(m), key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - step) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Outcomes:
    """One row's per-example outcomes under the table's ranking attack, and the points they are on."""

    points: str
    """What identifies the test points: ``n_ex`` and the hash of the index list (rows on other points are
    never compared)."""
    correct: Sequence[bool]
    """Per point, in the order of the index list: robust (correct under the whole attack) or not."""


@dataclass(frozen=True)
class Standing:
    """A row's place among the statistically tied groups of its table."""

    group: int | None
    """0 for the top group, 1 for the next, ...; ``None`` for a row that was not compared."""
    first: int = 0
    """The group's ranks: ``first``-``last`` (1-based, within the table)."""
    last: int = 0
    p_next: float | None = None
    """Exact McNemar p-value against the next compared row down, and the same Holm-adjusted."""
    p_next_holm: float | None = None
    reason: str = ""
    """Why the row was not compared (``group is None``), in a sentence."""
    why: str = ""
    """The same in a few words, for a table cell (``other test points``)."""

    @property
    def letter(self) -> str:
        """The group as a letter: a, b, ..., z, aa, ab, ..."""
        if self.group is None:
            return ""
        n, text = self.group, ""
        while True:
            n, r = divmod(n, 26)
            text = chr(ord("a") + r) + text
            if n == 0:
                return text
            n -= 1

    @property
    def ranks(self) -> str:
        """The group's ranks, ``"1-3"``, or ``"2"`` for a row alone in its group; empty when not compared."""
        if self.group is None:
            return ""
        return str(self.first) if self.first == self.last else f"{self.first}\u2013{self.last}"


NO_OUTCOMES = "no per-example results (evaluated before otarena stored them): not compared"
NO_OUTCOMES_WHY = "no per-point outcomes"
OTHER_POINTS_WHY = "other test points"


def tied_groups(rows: Sequence[Outcomes | None], alpha: float = ALPHA) -> list[Standing]:
    """The statistically tied groups of a table's rows, given in rank order.

    The rows compared are those on the table's points: the points most rows were evaluated on (the top
    row's among equally many). Each is compared with the next compared row down (:func:`mcnemar_exact`),
    the p-values Holm-corrected over those comparisons, and a row is tied with the next one down when
    the corrected p-value is not below ``alpha``. A row without outcomes, or on other points, is never
    compared: its standing says why.

    Returns:
        One :class:`Standing` per row, in the order given.
    """
    keys = Counter(r.points for r in rows if r is not None)
    if not keys:
        return [Standing(None, reason=NO_OUTCOMES, why=NO_OUTCOMES_WHY) for _ in rows]
    first_seen = {k: i for i, k in reversed(list(enumerate(r.points if r else None for r in rows)))}
    table_points = max(keys, key=lambda k: (keys[k], -first_seen[k]))
    compared = [i for i, r in enumerate(rows) if r is not None and r.points == table_points]
    raw = [mcnemar_exact(*discordant(rows[a].correct, rows[b].correct)) for a, b in zip(compared, compared[1:])]
    adjusted = holm(raw)
    group_of, group = {}, 0
    for j, i in enumerate(compared):
        group_of[i] = group
        if j < len(adjusted) and adjusted[j] < alpha:
            group += 1
    ranks: dict[int, list[int]] = {}
    for i, g in group_of.items():
        ranks.setdefault(g, []).append(i + 1)
    standings = []
    for i, r in enumerate(rows):
        if r is None:
            standings.append(Standing(None, reason=NO_OUTCOMES, why=NO_OUTCOMES_WHY))
        elif i not in group_of:
            standings.append(Standing(None, reason=f"evaluated on other test points ({r.points}) than the table's "
                                                   f"({table_points}): not compared", why=OTHER_POINTS_WHY))
        else:
            j = compared.index(i)
            g = group_of[i]
            standings.append(Standing(g, min(ranks[g]), max(ranks[g]),
                                      raw[j] if j < len(raw) else None, adjusted[j] if j < len(adjusted) else None))
    return standings


def points_key(n_ex: int, index_hash: str) -> str:
    """The identity of an evaluation's test points, as :attr:`Outcomes.points` holds it."""
    return f"n_ex {n_ex}, indices {index_hash[:12]}"


def format_p(p: float | None) -> str:
    """A p-value for a reader: two significant digits, ``< 1e-4`` below that."""
    if p is None or math.isnan(p):
        return "–"
    return "< 1e-4" if p < 1e-4 else f"{p:.2g}"
