# SPDX-License-Identifier: Apache-2.0
"""A search pins ``rung_cosine``'s rungs to its budget, and ``ema_decay`` is searchable like the other train knobs."""
import pytest

from otarena.methods.space import Fixed, Float
from otarena.search import config as config_lib

BASE = {"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["pgd_at"],
        "budget": {"trials": 2, "max_epochs": 9, "grace_epochs": 1, "reduction_factor": 3}}


def _space(**extra):
    return config_lib.parse({**BASE, **extra}).spaces()["pgd_at"]


def test_the_rungs_of_rung_cosine_are_the_budgets():
    space = _space(train={"schedule": "rung_cosine"})
    assert space["schedule"] == Fixed("rung_cosine")
    assert space["rung_grace_epochs"] == Fixed(1) and space["rung_reduction_factor"] == Fixed(3)
    assert space["epochs"] == Fixed(9)


@pytest.mark.parametrize("name, budget", [("rung_grace_epochs", "budget.grace_epochs"),
                                          ("rung_reduction_factor", "budget.reduction_factor")])
def test_the_rungs_are_not_set_under_train(name, budget):
    with pytest.raises(config_lib.ConfigError, match=f"train.{name}: set it with {budget}"):
        _space(train={name: 2})


def test_ema_decay_is_on_by_default_and_searchable():
    assert _space()["ema_decay"] == Fixed(0.99)
    assert _space(train={"ema_decay": 0.0})["ema_decay"] == Fixed(0.0)
    space = _space(space={"pgd_at": {"ema_decay": {"low": 0.9, "high": 0.999, "default": 0.99}}})
    assert isinstance(space["ema_decay"], Float) and (space["ema_decay"].low, space["ema_decay"].high) == (0.9, 0.999)
    assert _space(train={"ema_decay": 0.99})["ema_decay"] == Fixed(0.99)


@pytest.mark.parametrize("epochs, grace", [(10, 2), (1, 1)])
def test_otarena_train_takes_the_budgets_rungs(epochs, grace):
    """Without a config, ``otarena train --epochs N`` has the budget's default rungs (grace 2, capped at N)."""
    from otarena.search.cli import _train_config, build_parser

    args = build_parser().parse_args(["train", "--method", "pgd_at", "--epochs", str(epochs),
                                      "--set", "schedule=rung_cosine"])
    _, hparams = _train_config(args)
    assert (hparams["epochs"], hparams["rung_grace_epochs"], hparams["rung_reduction_factor"]) == (epochs, grace, 3)
