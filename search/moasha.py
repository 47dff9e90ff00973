# SPDX-License-Identifier: Apache-2.0
"""MO-ASHA: asynchronous successive halving that promotes by Pareto rank instead of by one metric.

Ray's ASHA ranks the trials at a rung by one number, and Optuna cannot prune a multi-objective study
(optuna RFC #3450). MO-ASHA (Schmucker et al., "Multi-objective Asynchronous Successive Halving",
arXiv:2106.12639, 2021; the syne-tune scheduler of that name) keeps ASHA's rungs and its asynchronous
rule: when a trial reaches a rung it goes on iff it is in the top ``1/reduction_factor`` of the results
recorded at that rung. "Top" is by non-dominated sorting: the results are sorted into fronts, and inside a
front the ones with the larger crowding distance come first (NSGA-II's order, search/objectives.py).

The rungs are ASHA's for the same ``grace_period``, ``reduction_factor`` and ``max_t`` (``fidelity.rungs``),
so that a two-objective search prunes at the same epochs as a single-objective one.

Resume. Tune does not save a scheduler with the experiment: ``Tuner.restore`` unpickles the one the Tuner
was built with (``tuner.pkl``, written before the first trial), which holds no rung records. So the records
are written, each time one is added, to ``moasha-rungs.json`` in the experiment's driver staging folder, which
Tune copies to the experiment's storage with its own state (on a cluster's shared or cloud storage too) and
copies back on ``Tuner.restore`` (it restores every ``.json`` there); a restored scheduler reads them the first
time it is used. The records then match the trials' saved states, both written at Tune's checkpoints.
"""
from __future__ import annotations

import json
import os
import pickle
from typing import Optional, Sequence

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from otarena.search.fidelity import rungs
from otarena.search.objectives import sort_key

STATE_FILE = "moasha-rungs.json"
"""In the experiment's folder: the rung records (``MOASHAScheduler.state_path``)."""


def promote(recorded: Sequence[Sequence[float]], new: Sequence[float], reduction_factor: float) -> bool:
    """Whether a trial reaching a rung with the objective values ``new`` goes on, given the values ``recorded``
    there before it (all maximized).

    It goes on iff fewer than ``n / reduction_factor`` of the ``n`` results (``new`` included) come strictly
    before it in the order of fronts, then crowding distance; the first trial at a rung always goes on, as
    in ASHA. Equal values never stop a trial: only results strictly ahead count.
    """
    points = [tuple(p) for p in recorded] + [tuple(new)]
    keys = sort_key(points)
    ahead = sum(1 for key in keys[:-1] if key < keys[-1])
    return ahead < len(points) / reduction_factor


class MOASHAScheduler(FIFOScheduler):
    """A Ray Tune scheduler: ASHA's rungs, promotion by :func:`promote` on ``metrics`` (all maximized)."""

    def __init__(self, *, metrics: Sequence[str], max_t: int, grace_period: int, reduction_factor: float,
                 time_attr: str = "training_iteration", state_path: Optional[str] = None):
        """``state_path``: where the rung records are kept; by default the experiment's (see the module's doc)."""
        super().__init__()
        if grace_period > max_t or grace_period < 1 or reduction_factor <= 1:
            raise ValueError(f"MO-ASHA needs 1 <= grace_period <= max_t and reduction_factor > 1, got "
                             f"grace_period={grace_period}, max_t={max_t}, reduction_factor={reduction_factor}")
        self.metrics, self.time_attr = list(metrics), time_attr
        self.max_t, self.reduction_factor = max_t, reduction_factor
        self.rungs: dict[int, dict[str, list[float]]] = {m: {} for m in rungs(grace_period, reduction_factor, max_t)}
        """Per milestone epoch: trial id -> its objective values when it reached that epoch."""
        self.state_path = state_path
        self.stopped = 0
        self._loaded = False

    # --- Ray's TrialScheduler interface ---

    def on_trial_add(self, tune_controller, trial) -> None:
        self._load(trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        self._load(trial)
        values = self._values(result)
        if values is None:
            return TrialScheduler.CONTINUE
        if result[self.time_attr] >= self.max_t:
            return TrialScheduler.STOP   # its budget is spent (ASHA's stop_last_trials)
        decision = self.on_result(trial.trial_id, result[self.time_attr], values)
        if decision == TrialScheduler.STOP:
            self.stopped += 1
        return decision

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        self._load(trial)
        values = self._values(result)
        if values is not None:
            self.on_result(trial.trial_id, result[self.time_attr], values)

    def debug_string(self) -> str:
        return f"Using MO-ASHA on {', '.join(self.metrics)}: num_stopped={self.stopped}; " + " | ".join(
            f"epoch {m}: {len(recorded)} recorded" for m, recorded in self.rungs.items())

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.__dict__, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            self.__dict__.update(pickle.load(f))

    # --- the rule ---

    def on_result(self, trial_id: str, epoch: int, values: Sequence[float]) -> str:
        """Record ``values`` at the highest rung ``epoch`` has reached, if this trial has no record there yet, and
        decide by :func:`promote` against the results recorded there before."""
        reached = [m for m in self.rungs if epoch >= m]
        if not reached or trial_id in self.rungs[max(reached)]:
            return TrialScheduler.CONTINUE
        recorded = self.rungs[max(reached)]
        go_on = promote(list(recorded.values()), values, self.reduction_factor)
        recorded[trial_id] = [float(v) for v in values]
        self._save()
        return TrialScheduler.CONTINUE if go_on else TrialScheduler.STOP

    def _values(self, result: dict) -> Optional[list[float]]:
        if self.time_attr not in result or any(m not in result for m in self.metrics):
            return None
        return [float(result[m]) for m in self.metrics]

    # --- the records on disk, for --resume ---

    def _load(self, trial) -> None:
        """Once per scheduler object: the records an earlier driver wrote (none on a fresh search)."""
        if self._loaded:
            return
        self._loaded = True
        storage = getattr(trial, "storage", None)
        if self.state_path is None and storage is not None:
            self.state_path = os.path.join(storage.experiment_driver_staging_path, STATE_FILE)
        text = _read(self.state_path) if self.state_path else None
        if text:
            for milestone, recorded in json.loads(text)["rungs"].items():
                self.rungs.setdefault(int(milestone), {}).update(recorded)

    def _save(self) -> None:
        if self.state_path:
            _write(self.state_path, json.dumps({"metrics": self.metrics, "rungs": {
                str(m): recorded for m, recorded in self.rungs.items()}}))


def _read(path: str) -> Optional[str]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return f.read()


def _write(path: str, text: str) -> None:
    """Whole or not at all: a driver killed mid-write leaves the previous records."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        f.write(text)
    os.replace(f"{path}.tmp", path)
