# SPDX-License-Identifier: Apache-2.0
"""How a config resolves each method's space: searched, pinned, narrowed, or optional."""
from pathlib import Path

import pytest

from otarena.methods.space import Fixed, Float
from otarena.search import config as config_lib

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = {"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "budget": {"trials": 2, "max_epochs": 3}}


def _space(method, **extra):
    return config_lib.parse({**BASE, "methods": [method], **extra}).spaces()[method]


def test_declared_space_is_searched_and_the_rest_pinned():
    space = _space("trades", train={"optimizer": "adam"})
    assert isinstance(space["trades_beta"], Float) and isinstance(space["lr"], Float)
    assert space["optimizer"] == Fixed("adam")
    assert space["epochs"] == Fixed(3) and space["seed"] == Fixed(0)


def test_common_override_applies_to_every_method_that_has_the_knob():
    cfg = config_lib.parse({**BASE, "methods": ["erm", "trades"],
                            "space": {"common": {"lr": {"low": 1e-3, "high": 1e-2}}}})
    for method in ("erm", "trades"):
        lr = cfg.spaces()[method]["lr"]
        assert isinstance(lr, Float) and (lr.low, lr.high) == (1e-3, 1e-2)


def test_optional_parameter_keeps_its_config_default_unless_searched():
    assert _space("langevin")["langevin_lambda"] == Fixed(None)
    space = _space("langevin", space={"langevin": {"langevin_lambda": {"low": 1, "high": 100},
                                                   "langevin_sigma": 0.0}})
    assert isinstance(space["langevin_lambda"], Float) and space["langevin_sigma"] == Fixed(0.0)


def test_a_train_value_searched_by_a_range_is_its_default():
    space = _space("trades", train={"lr": 0.1}, space={"common": {"lr": {"low": 0.01, "high": 0.2, "log": True}}})
    assert space["lr"] == Float(0.01, 0.2, 0.1, log=True, valid=space["lr"].valid)   # not the shared 0.05
    raw = {**config_lib.read_mapping(str(CONFIGS / "cifar10-preact.yaml")), "download": True}   # no CIFAR files here
    cifar = config_lib.parse(raw, local=False).spaces()
    assert {m: s["lr"].default for m, s in cifar.items()} == {"pgd_at": 0.1, "trades": 0.1, "mart": 0.1}
    assert cifar["mart"]["lr"].contains(0.01)   # MART's ResNet-18 lr


@pytest.mark.parametrize("space,match", [
    ({"common": {"lr": {"low": 0.02, "high": 0.05}}}, r"space.common.lr: the range .* excludes train.lr = 0.1"),
    ({"trades": {"lr": {"low": 0.01, "high": 0.2, "default": 0.05}}}, r"space.trades.lr: default 0.05 disagrees"),
])
def test_a_train_value_outside_its_range_or_default_is_a_one_line_error(space, match):
    with pytest.raises(config_lib.ConfigError, match=match) as err:
        _space("trades", train={"lr": 0.1}, space=space)
    assert "\n" not in str(err.value)


def test_attack_step_size_is_fixed_unless_a_config_searches_it():
    assert _space("pgd_at")["attack_step_size"] == Fixed(None)   # 2.5 eps / K
    assert _space("pgd_at", train={"attack_step_size": None})["attack_step_size"] == Fixed(None)
    step = _space("pgd_at", space={"common": {"attack_step_size": {"low": 1.5 / 255, "high": 2.5 / 255}}})
    assert isinstance(step["attack_step_size"], Float) and step["attack_step_size"].default == 2 / 255
    step = _space("pgd_at", train={"attack_step_size": 0.05},
                  space={"pgd_at": {"attack_step_size": {"low": 0.025, "high": 0.1}}})["attack_step_size"]
    assert (step.low, step.high, step.default) == (0.025, 0.1, 0.05)


def test_a_searched_default_follows_the_config_given_the_fixed_values():
    assert _space("armor_trades")["armor_radius"].default == 0.5
    kl = _space("armor_trades", space={"armor_trades": {"armor_divergence": "kl"}})["armor_radius"]
    assert isinstance(kl, Float) and kl.default == 0.02   # the code's KL radius, not alpha-div's 0.5
    chosen = _space("armor_trades",
                    space={"armor_trades": {"armor_divergence": "kl", "armor_radius": {"default": 0.2}}})
    assert chosen["armor_radius"].default == 0.2


def test_the_demo_searches_the_papers_langevin_lambda_and_got_beta():
    spaces = config_lib.parse(config_lib.read_mapping(str(CONFIGS / "demo.yaml"))).spaces()
    lam = spaces["langevin"]["langevin_lambda"]   # the paper's lambda * eps = 3 at eps 0.2, first
    assert isinstance(lam, Float) and lam.log and lam.default == 15.0 and lam.contains(150.0)
    assert spaces["langevin"]["langevin_sigma"] == Fixed(0.015)   # lambda sets sigma
    assert spaces["got_trades_lm"]["got_beta"].contains(10.0)     # the paper's beta trains on digits
