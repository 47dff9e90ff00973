# SPDX-License-Identifier: Apache-2.0
"""leaderboard.stats: the exact McNemar test, Holm's correction and the tied groups of a table."""
from __future__ import annotations

import random

import pytest
from scipy.stats import binomtest

from otarena.leaderboard.stats import Outcomes, discordant, holm, mcnemar_exact, tied_groups


def test_mcnemar_against_a_hand_worked_table():
    # 2x2 table of 20 points: both right 8, only A right 9, only B right 1, both wrong 2.
    a = [True] * 8 + [True] * 9 + [False] * 1 + [False] * 2
    b = [True] * 8 + [False] * 9 + [True] * 1 + [False] * 2
    assert discordant(a, b) == (9, 1)
    # By hand: 2 * P(X <= 1), X ~ Bin(10, 1/2) = 2 * (1 + 10) / 1024 = 22 / 1024.
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9) == 22 / 1024
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(3, 3) == 1.0 and mcnemar_exact(0, 1) == 1.0


@pytest.mark.parametrize("counts", [(0, 5), (3, 10), (17, 30), (100, 140), (2000, 2150), (4999, 5001)])
def test_mcnemar_is_the_binomial_test_of_the_discordant_pairs(counts):
    only_a, only_b = counts
    assert mcnemar_exact(only_a, only_b) == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, rel=1e-9)


def test_holm_step_down():
    # Sorted 0.01, 0.03, 0.04 times 3, 2, 1, kept monotone: 0.03, 0.06, 0.06.
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([]) == [] and holm([0.9, 0.8]) == [1.0, 1.0]


def _rows(robust_counts, n=1000, points="n_ex 1000, indices abc", seed=0):
    """Rows whose robust points are nested (a stronger row keeps every point a weaker one keeps), so that
    every discordant pair favours the row above: the test sees exactly the difference in counts."""
    order = list(range(n))
    random.Random(seed).shuffle(order)
    rows = []
    for count in robust_counts:
        kept = set(order[:count])
        rows.append(Outcomes(points, [i in kept for i in range(n)]))
    return rows


def test_tied_groups_on_a_synthetic_table():
    # 500, 495, 490: 5 discordant pairs each, p = 0.0625: tied. 490 -> 400: 90 pairs, p ~ 1e-27. 400 -> 398: tied.
    standings = tied_groups(_rows([500, 495, 490, 400, 398]))
    assert [s.group for s in standings] == [0, 0, 0, 1, 1]
    assert [s.ranks for s in standings] == ["1–3", "1–3", "1–3", "4–5", "4–5"]
    assert [s.letter for s in standings] == ["a", "a", "a", "b", "b"]
    assert standings[0].p_next == mcnemar_exact(5, 0)
    assert standings[-1].p_next is None and standings[-1].p_next_holm is None
    # Holm over the four adjacent comparisons: the smallest p is multiplied by 4.
    assert standings[2].p_next_holm == pytest.approx(min(1.0, 4 * mcnemar_exact(90, 0)))


def test_holm_can_tie_what_a_single_comparison_would_separate():
    # 9 discordant pairs: p = 2 / 512 ~ 0.0039, significant alone, and after Holm over 2 comparisons (0.0078);
    # over 14 comparisons (0.055) it is not.
    two = tied_groups(_rows([509, 500, 500]))
    assert [s.group for s in two] == [0, 1, 1]
    many = tied_groups(_rows([509, 500] + [500] * 13))
    assert {s.group for s in many} == {0}


def test_rows_on_different_points_are_never_compared():
    rows = _rows([500, 495, 300])
    other = _rows([900], points="n_ex 1000, indices def")[0]
    smaller = Outcomes("n_ex 200, indices abc", [True] * 200)
    standings = tied_groups([rows[0], other, rows[1], smaller, None, rows[2]])
    assert [s.group for s in standings] == [0, None, 0, None, None, 1]
    assert "other test points (n_ex 1000, indices def)" in standings[1].reason
    assert "not compared" in standings[1].reason and "n_ex 200" in standings[3].reason
    assert "no per-example results" in standings[4].reason
    # Ranks are the table's: the tied pair holds ranks 1 and 3.
    assert standings[0].ranks == "1–3" and standings[5].ranks == "6"
    # A row alone on its points is in no group, even at the top.
    assert tied_groups([other, rows[0], rows[1]])[0].group is None
    with pytest.raises(ValueError, match="not the same points"):
        discordant([True] * 3, [True] * 4)
