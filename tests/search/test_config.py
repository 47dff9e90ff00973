# SPDX-License-Identifier: Apache-2.0
"""How a config resolves each method's space: searched, pinned, narrowed, or optional."""
from methods.space import Fixed, Float
from search import config as config_lib

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
