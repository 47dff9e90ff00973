# SPDX-License-Identifier: Apache-2.0
"""Hyperparameter importance (search/importance.py) on synthetic trial tables where we know which knob decides.

Optuna's PED-ANOVA over an in-memory study built with the search's direction: a parameter that alone decides
the result ranks first whether the metric is maximized or minimized, and where the top of a maximized metric
and the top of a minimized one are decided by different knobs, the direction picks the right one (the mistake
of optuna-dashboard #1329 would swap them). Real Ray results, a real MLflow store; a second or so in all.
"""
from __future__ import annotations

import random

import pytest
from mlflow import MlflowClient
from ray.tune import Result

from otarena.leaderboard import tags as tag
from otarena.methods.space import Choice, Fixed, Float, Int
from otarena.search import importance
from otarena.search.tracking import Tracker

SPACE = {"x": Float(0.0, 1.0, 0.5), "lr": Float(1e-3, 1.0, 0.1, log=True), "steps": Int(1, 10, 5),
         "opt": Choice(("sgd", "adam", "lamb"), "sgd"), "epochs": Fixed(3)}


def _draws(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"x": rng.random(), "lr": 10 ** rng.uniform(-3, 0), "steps": rng.randint(1, 10),
             "opt": rng.choice(("sgd", "adam", "lamb"))} for _ in range(n)]


@pytest.mark.parametrize("direction", ["maximize", "minimize"])
@pytest.mark.parametrize("n", [importance.MIN_TRIALS, 40])
def test_the_one_deciding_parameter_ranks_first(direction, n):
    draws = _draws(n)
    found = importance.importance([(p, p["x"]) for p in draws], SPACE, direction=direction)
    assert found.reason is None and found.n_trials == n
    assert list(found.values)[0] == "x", found.values
    assert set(found.values) == {"x", "lr", "steps", "opt"}  # the searched ones, never the fixed
    assert sum(found.values.values()) == pytest.approx(1.0)
    if n >= 40:  # with the fewest trials a knob that decides nothing may by chance come close second
        assert found.values["x"] > 0.9
    assert list(found.values.values()) == sorted(found.values.values(), reverse=True)


def test_the_direction_picks_the_knob_that_decides_the_top():
    """x alone lifts a trial to the top of the values; lr alone drops it to the bottom. Maximized, x matters;
    minimized, lr does: an evaluator that read a maximized metric as minimized would name lr."""
    draws, noise = _draws(40, seed=1), random.Random(3)

    def value(p):  # the noise only breaks ties, knob-free
        return (1.0 if p["x"] > 0.8 else 0.0) - (1.0 if p["lr"] > 0.1 else 0.0) + 0.01 * noise.random()

    table = [(p, value(p)) for p in draws]
    assert list(importance.importance(table, SPACE, direction="maximize").values)[0] == "x"
    assert list(importance.importance(table, SPACE, direction="minimize").values)[0] == "lr"


def test_too_few_trials_or_nothing_searched_give_a_reason():
    few = importance.importance([(p, p["x"]) for p in _draws(importance.MIN_TRIALS - 1)], SPACE)
    assert not few.values and few.reason.startswith(f"too few completed trials: {importance.MIN_TRIALS - 1},")
    assert "none (too few completed trials" in few.line()
    flat = importance.importance([(p, 0.5) for p in _draws(20)], SPACE)
    assert not flat.values and "same val/best_pgd_acc" in flat.reason
    nothing = importance.importance([({}, 0.5)] * 20, {"epochs": Fixed(3)})
    assert nothing.reason == "no hyperparameter was searched"


def _result(params: dict, value: float, epochs: int, error=None) -> Result:
    return Result(metrics={"config": params, "val/best_pgd_acc": value, "val/best_clean_acc": 1 - value,
                           "training_iteration": epochs}, checkpoint=None, error=error, path="unused")


def test_a_search_counts_its_completed_trials_only():
    """From Ray's results: pruned (fewer epochs) and failed trials are no part of the table; the objective's
    per-trial value is its best epoch's."""
    n = importance.MIN_TRIALS
    draws = _draws(n + 4, seed=2)
    results = [_result(p, p["x"], 4) for p in draws[:n]]
    results += [_result(p, 1.0 - p["x"], 1) for p in draws[n:n + 3]]                   # pruned at the first rung
    results.append(_result(draws[n + 3], 0.99, 4, error=RuntimeError("out of memory")))  # failed
    found = importance.of_search(results, SPACE, max_epochs=4)
    assert found.n_trials == n and found.metric == "val/best_pgd_acc" and list(found.values)[0] == "x"
    clean = importance.of_search(results, SPACE, max_epochs=4, objective="val/clean_acc")
    assert clean.metric == "val/best_clean_acc" and list(clean.values)[0] == "x"
    assert importance.of_search(results[1:], SPACE, max_epochs=4).reason == (
        f"too few completed trials: {n - 1} of {n + 3} trials, the rest pruned or failed, at least {n} needed")


def test_recorded_on_the_parent_run(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "importance")
    with_values = tracker.start_search("with", {}, {})
    without = tracker.start_search("without", {}, {})
    found = importance.importance([(p, p["x"]) for p in _draws(20)], SPACE)
    found.record(tracker, with_values)
    importance.importance([(p, p["x"]) for p in _draws(3)], SPACE).record(tracker, without)
    client = MlflowClient(uri)
    run = client.get_run(with_values).data
    assert {k: v for k, v in run.metrics.items() if k.startswith("importance/")} == pytest.approx(
        {f"importance/{k}": v for k, v in found.values.items()})
    assert run.params[importance.EVALUATOR_PARAM].startswith("optuna PED-ANOVA (target_quantile=0.25")
    assert tag.IMPORTANCE_REASON not in run.tags
    run = client.get_run(without).data
    assert not any(k.startswith("importance/") for k in run.metrics)
    assert run.tags[tag.IMPORTANCE_REASON].startswith("too few completed trials: 3,")
