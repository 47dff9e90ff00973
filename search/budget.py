# SPDX-License-Identifier: Apache-2.0
"""Equal device-hours budgets (``budget.compare: equal_device_hours``): trials per method in inverse proportion
to its cost per epoch.

Methods differ in cost per epoch: Langevin takes about 2 forward+backward passes per step, PGD-10 AT 11, GOT
about 12. With the same number of trials a costly method is searched with more device-hours than a cheap one.
With ``equal_device_hours`` each method of a config gets the device-hours of ``budget.trials`` trials of the
config's cheapest method:

    trials(method) = max(1, round(budget.trials * cost(cheapest) / cost(method)))

where ``cost`` is the device-seconds of one epoch at the method's paper defaults (the search's first trial),
measured before the searches by timing a few training steps on the training data (:func:`epoch_seconds`),
with the resources of a trial. ``budget.trials`` is thus the most trials any method gets, and a campaign
costs no more than with equal trials. A method costing more than ``budget.trials`` times the cheapest gets its
one trial, the paper default, and more than its share of device-hours (said in the log). The measured costs and
the rule are parameters of each search's parent run (docs/mlflow-schema.md).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from otarena import methods
from otarena.methods.common.data import TensorData, batches
from otarena.methods.common.train import prepare, set_threads, train_step

RULE = "trials = max(1, round(budget.trials * epoch_device_s(cheapest) / epoch_device_s(method)))"
"""The rule in one line, as its parent run's params state it."""
TIMED_STEPS, WARMUP_STEPS = 3, 2
"""Steps timed per method (their median counts), after steps that are not (compilation, allocator, caches)."""


def epoch_seconds(method: str, hparams: dict, *, dataset: str, arch: str, threat: methods.ThreatModel,
                  train_data: TensorData, cpus: float = 1.0) -> float:
    """Seconds of one training epoch of ``method`` at ``hparams``: the median of a few timed training steps
    times the steps of an epoch over ``train_data`` (its validation is left out: it is the same for every
    method). Runs as a Ray task with a trial's resources, so that it is timed where trials run."""
    set_threads(cpus)
    run = methods.build_run(method, hparams, dataset=dataset, arch=arch, threat=threat, train=train_data,
                            val=train_data)
    prepare(run)
    run.model.train()
    device = next(run.model.parameters()).device
    stream = batches(run.train, run.cfg.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    seconds = []
    for i, (x, y, idx) in zip(range(WARMUP_STEPS + TIMED_STEPS), stream):
        start = time.perf_counter()
        train_step(run, x, y, idx)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP_STEPS:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds) * math.ceil(len(train_data) / run.cfg.batch_size)


def equal_device_hours(costs: dict[str, float], trials: int) -> dict[str, int]:
    """Each method's trial budget under :data:`RULE`, from its cost per epoch (any unit, the same for all)."""
    cheapest = min(costs.values())
    return {method: max(1, round(trials * cheapest / cost)) for method, cost in costs.items()}
