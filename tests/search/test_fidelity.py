# SPDX-License-Identifier: Apache-2.0
"""Rank fidelity (search/fidelity.py) against examples worked by hand."""
import pytest

from otarena.search.fidelity import MIN_TRIALS, average_ranks, rank_fidelity, rungs, spearman


def test_rungs_are_ashas_milestones_before_the_end():
    assert rungs(2, 3, 10) == [2, 6]
    assert rungs(1, 2, 3) == [1, 2]
    assert rungs(1, 3, 2) == [1]
    assert rungs(4, 2, 4) == []   # grace = max_epochs: nothing is ever pruned


def test_ties_take_their_average_rank():
    assert average_ranks([0.1, 0.3, 0.3, 0.5, 0.2]) == [1, 3.5, 3.5, 5, 2]
    assert average_ranks([0.4, 0.6, 0.5, 0.7, 0.4]) == [1.5, 4, 3, 5, 1.5]


def test_spearman_with_ties_worked_by_hand():
    # Ranks [1, 3.5, 3.5, 5, 2] and [1.5, 4, 3, 5, 1.5], both of mean 3: deviations [-2, .5, .5, 2, -1] and
    # [-1.5, 1, 0, 2, -1.5]; covariance sum 3 + .5 + 0 + 4 + 1.5 = 9, variance sums 9.5 and 9.5: rho = 18/19.
    curves = {"a": {1: 0.1, 2: 0.4}, "b": {1: 0.3, 2: 0.5}, "c": {1: 0.3, 2: 0.6}, "d": {1: 0.5, 2: 0.6},
              "e": {1: 0.2, 2: 0.1}}
    finals = {"a": 0.4, "b": 0.6, "c": 0.5, "d": 0.7, "e": 0.4}
    first, second = rank_fidelity(curves, finals, [1, 2])
    assert (first.epoch, first.n_trials, first.reason) == (1, 5, None)
    assert first.rho == pytest.approx(18 / 19)
    assert first.metric == "fidelity/rung_1" and not first.low
    assert "+0.95 over 5 trials" in first.line() and "WARNING" not in first.line()
    # Epoch 2: ranks [2, 3, 4.5, 4.5, 1], deviations [-1, 0, 1.5, 1.5, -2]; covariance sum 1.5 + 0 + 0 + 3 + 3
    # = 7.5, variance sums 9.5 and 9.5: rho = 15/19.
    assert second.rho == pytest.approx(15 / 19)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == -1


def test_a_low_rung_warns_naming_it():
    curves = {t: {3: v} for t, v in zip("abcd", [0.4, 0.3, 0.2, 0.1])}
    (low,) = rank_fidelity(curves, {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, [3])
    assert low.rho == -1 and low.low
    assert low.line().startswith("WARNING: rank fidelity at rung epoch 3: Spearman rho -1.00")


def test_too_few_trials_give_a_reason_not_a_number():
    # Five trials, but only three reached max_epochs (pruned ones have no final value) and one of them
    # has no value at the rung: two count.
    curves = {"a": {1: 0.1}, "b": {1: 0.2}, "c": {}, "d": {1: 0.4}, "e": {1: 0.5}}
    (rung,) = rank_fidelity(curves, {"a": 0.3, "b": 0.2, "c": 0.5}, [1])
    assert rung.rho is None and rung.n_trials == 2
    assert rung.reason == f"too few trials: 2 reached max_epochs, at least {MIN_TRIALS} needed"
    assert rung.line() == f"rank fidelity at rung epoch 1: none ({rung.reason})"


def test_no_spread_gives_a_reason():
    curves = {t: {1: 0.0} for t in "abcd"}
    (rung,) = rank_fidelity(curves, {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.4}, [1])
    assert rung.rho is None and rung.reason == "no ranking: every trial has the same rung value"
