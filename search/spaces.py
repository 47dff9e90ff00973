# SPDX-License-Identifier: Apache-2.0
"""Translate a method's declared space (``methods.space``) into Optuna's define-by-run calls.

Define-by-run keeps the translation to a few lines and lets Optuna's TPE see each parameter with
its log scale, as the method declared it.
"""
from __future__ import annotations

from typing import Any

from otarena.methods.space import Choice, Fixed, Float, Int


def searched(space: dict[str, Any]) -> dict[str, Any]:
    """The parameters Optuna chooses (everything not ``Fixed``)."""
    return {name: d for name, d in space.items() if isinstance(d, (Float, Int, Choice))}


def fixed(space: dict[str, Any]) -> dict[str, Any]:
    return {name: d.value for name, d in space.items() if isinstance(d, Fixed)}


def defaults(space: dict[str, Any]) -> dict[str, Any]:
    """The paper defaults of the searched parameters: the first trial of every search."""
    return {name: d.default for name, d in searched(space).items()}


class DefineByRun:
    """An OptunaSearch ``space`` callable that suggests the searched parameters.

    A class rather than a closure, so that Ray can pickle the searcher into its experiment state
    (which ``Tuner.restore`` reads back).
    """

    def __init__(self, space: dict[str, Any]):
        self.domains = searched(space)

    def __call__(self, trial) -> None:
        for name, d in self.domains.items():
            if isinstance(d, Float):
                trial.suggest_float(name, d.low, d.high, log=d.log)
            elif isinstance(d, Int):
                trial.suggest_int(name, d.low, d.high, log=d.log)
            else:
                trial.suggest_categorical(name, list(d.options))
