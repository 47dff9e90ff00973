# SPDX-License-Identifier: Apache-2.0
"""TPE's start-up draws: a seed of their own per method, reproducible, and never next to the default.

The first trial of a search is the method's default; with one sampler seed for every method, the
second trial of every method drew the same point (lr = 0.002055 beside the default 0.002 with seed 0).
"""
import optuna
import pytest

from otarena.search import config as config_lib
from otarena.search import spaces

BASE = {"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "budget": {"trials": 8, "max_epochs": 3},
        "methods": ["pgd_at", "trades", "mart"], "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "train": {"optimizer": "adam", "lr": 0.002}}


def _startup_draws(method: str, seed: int = 0, trials: int = 8) -> list[dict]:
    """The points a search of ``method`` asks for while no trial has finished: all start-up draws."""
    space = config_lib.parse({**BASE, "seed": seed}).spaces()[method]
    study = optuna.create_study(direction="maximize",
                                sampler=spaces.sampler(space, seed=seed, method=method, trials=trials))
    study.enqueue_trial(spaces.defaults(space))   # what search/run.py gives as points_to_evaluate
    asked = [study.ask() for _ in range(trials)]
    for trial in asked:
        spaces.DefineByRun(space)(trial)
    assert asked[0].params == spaces.defaults(space)
    return [trial.params for trial in asked[1:]]


def test_methods_draw_different_start_up_points():
    draws = {method: _startup_draws(method) for method in ("pgd_at", "trades", "mart")}
    lrs = {method: [point["lr"] for point in points] for method, points in draws.items()}
    assert lrs["pgd_at"] != lrs["trades"] != lrs["mart"] != lrs["pgd_at"]
    assert len({values[0] for values in lrs.values()}) == 3   # the second trial above all


def test_the_same_seed_gives_the_same_draws_and_another_seed_others():
    assert _startup_draws("trades", seed=0) == _startup_draws("trades", seed=0)
    assert _startup_draws("trades", seed=0) != _startup_draws("trades", seed=1)
    assert spaces.method_seed(0, "trades") == spaces.method_seed(0, "trades") != spaces.method_seed(0, "mart")


@pytest.mark.parametrize("method", ["pgd_at", "trades", "mart"])
def test_no_start_up_draw_is_near_the_default(method):
    space = config_lib.parse(BASE).spaces()[method]
    searched = spaces.searched(space)
    for point in _startup_draws(method, trials=200):
        for name, value in point.items():
            assert not spaces.near_default(value, searched[name]), (name, value, searched[name].default)
    lr = searched["lr"]
    assert spaces.near_default(0.002055, lr) and not spaces.near_default(0.0025, lr)


def test_after_the_start_up_tpe_samples_as_usual():
    space = config_lib.parse(BASE).spaces()["trades"]
    sampler = spaces.sampler(space, seed=0, method="trades", trials=4)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lambda trial: (spaces.DefineByRun(space)(trial), -abs(trial.params["lr"] - 0.002))[1], n_trials=6)
    assert len(study.trials) == 6 and sampler.n_startup_trials == 2
