# SPDX-License-Identifier: Apache-2.0
"""Translate a method's declared space (``methods.space``) into Optuna's define-by-run calls.

Define-by-run keeps the translation to a few lines and lets Optuna's TPE see each parameter with
its log scale, as the method declared it.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import optuna

from otarena.methods.space import Choice, Fixed, Float, Int

STARTUP_GAP = 0.05
"""How close to the default a start-up draw may come, as a fraction of each range (of its log for a
log range): the default is the first trial already, a draw next to it would repeat that trial."""


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


def method_seed(seed: int, method: str) -> int:
    """A sampler seed of its own for each method of a search, the same on every run.

    One seed for every method would make every method's search draw the same start-up points; the
    seed is derived with SHA-256, not Python's ``hash()``, which changes from one process to the next.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}/{method}".encode()).digest()[:4], "big")


def _position(value: float, low: float, high: float, log: bool) -> float:
    """Where ``value`` lies in ``[low, high]``, from 0 to 1 (on the log scale for a log range)."""
    if high == low:
        return 0.0
    if log:
        return (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return (value - low) / (high - low)


def near_default(value: Any, domain: Any, gap: float = STARTUP_GAP) -> bool:
    """A numeric value within ``gap`` of the domain's default (as a fraction of its range)."""
    if not isinstance(domain, (Float, Int)):
        return False
    return abs(_position(value, domain.low, domain.high, domain.log)
               - _position(domain.default, domain.low, domain.high, domain.log)) < gap


class StartupAwayFromDefault(optuna.samplers.TPESampler):
    """Optuna's TPE whose random start-up draws keep ``STARTUP_GAP`` away from the method's default.

    The first trial of every search is the default (``defaults``, enqueued by ``search/run.py``), so a
    start-up draw next to it spends a trial on the same configuration. A numeric draw that close is
    drawn again; a categorical one is kept (there is no distance between choices). Once
    ``n_startup_trials`` trials have finished, TPE samples as usual.
    """

    def __init__(self, space: dict[str, Any], *, seed: int, n_startup_trials: int):
        # TPE is multi-objective by itself when the study has several directions (MOTPE, Ozaki et al., GECCO 2020).
        super().__init__(seed=seed, n_startup_trials=n_startup_trials)
        self.n_startup_trials, self.domains = n_startup_trials, searched(space)
        self.startup = optuna.samplers.RandomSampler(seed=seed)

    def reseed_rng(self) -> None:
        super().reseed_rng()
        self.startup.reseed_rng()

    def sample_independent(self, study, trial, param_name, param_distribution):
        finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,
                                                           optuna.trial.TrialState.PRUNED))
        if len(finished) >= self.n_startup_trials:
            return super().sample_independent(study, trial, param_name, param_distribution)
        domain = self.domains.get(param_name)
        for _ in range(1000):  # the gap is a tenth of the range at most: a few draws suffice
            value = self.startup.sample_independent(study, trial, param_name, param_distribution)
            if not near_default(value, domain):
                return value
        return value


def sampler(space: dict[str, Any], *, seed: int, method: str, trials: int,
            kind: str = "tpe") -> optuna.samplers.BaseSampler:
    """The sampler of one method's search, with its own seed: TPE whose start-up draws keep away from the default
    (multi-objective when the study has several objectives), or NSGA-II (``budget.sampler: nsga2``, Deb et al.,
    IEEE TEC 2002) whose generations are as large as TPE's start-up, so that a small budget sees several of them.
    Both read the config's constraints from each finished trial (``Trial.set_constraint``, by the searcher)."""
    n_startup = max(2, min(10, trials // 2))
    if kind == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=n_startup, seed=method_seed(seed, method))
    return StartupAwayFromDefault(space, seed=method_seed(seed, method), n_startup_trials=n_startup)
