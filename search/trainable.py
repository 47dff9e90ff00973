# SPDX-License-Identifier: Apache-2.0
"""The Ray Tune function trainable: one trial trains one method with one set of hyperparameters.

It reports validation metrics once per epoch (one ``training_iteration``, which ASHA counts) with
a checkpoint holding the model, optimizer, schedule and method state, so a trial that is paused,
preempted or restored continues exactly where it stopped.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

import ray
import torch
from ray import tune

from otarena import methods
from otarena.methods.common.train import Run, set_threads

STATE_FILE = "state.pt"
COST_FILE = "cost.json"
"""Beside the state in a checkpoint: the training seconds spent up to it. A restored trial goes on from there:
the epochs it keeps count once, and those it trains again after the checkpoint count as trained again."""


@dataclass(frozen=True)
class TrialSpec:
    """What is the same for every trial of one method's search."""

    method: str
    dataset: str
    arch: str
    norm: str
    eps: float
    fixed: dict
    """Hyperparameters not searched (shared knobs and pinned method parameters)."""
    cpus: float = 1.0


def load_state(path: str) -> dict:
    # weights_only: a checkpoint is data, never code (a pickle payload is refused).
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)


def train_trial(config: dict[str, Any], *, spec: TrialSpec, train_data, val_data) -> None:
    set_threads(spec.cpus)
    hparams = {**spec.fixed, **config}
    run = methods.build_run(spec.method, hparams, dataset=spec.dataset, arch=spec.arch,
                            threat=methods.ThreatModel(spec.norm, spec.eps), train=train_data, val=val_data)
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            run.load_state_dict(load_state(folder))

    node_id = ray.get_runtime_context().get_node_id()
    spent = _training_seconds(checkpoint)

    def report(metrics: dict, run: Run) -> None:
        nonlocal spent
        spent += metrics["time/epoch_s"]
        metrics = {**metrics, "val/best_pgd_acc": run.best["val/pgd_acc"],
                   "val/best_clean_acc": run.best["val/clean_acc"], "val/best_epoch": run.best["epoch"],
                   "node_id": node_id, **training_cost(metrics["time/epoch_s"], spent, len(train_data), run.epoch)}
        with tempfile.TemporaryDirectory() as folder:
            torch.save(run.state_dict(), os.path.join(folder, STATE_FILE))
            with open(os.path.join(folder, COST_FILE), "w") as f:
                json.dump({"training_s": spent}, f)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    methods.fit(run, report)


def _training_seconds(checkpoint) -> float:
    """The training seconds a restored trial had spent up to its checkpoint (0 for a fresh trial)."""
    if not checkpoint:
        return 0.0
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, COST_FILE)
        if not os.path.exists(path):  # a checkpoint written before the cost was kept
            return 0.0
        with open(path) as f:
            return float(json.load(f)["training_s"])


def training_cost(epoch_s: float, training_s: float, n_train: int, epochs: int) -> dict[str, float]:
    """What training has cost so far, from the training loop's own clock (``time/epoch_s``: one epoch's
    training steps and its validation) and the training images (docs/mlflow-schema.md, ``cost/``).

    ``train/images_per_s`` is this epoch's throughput (a curve per trial); the ``cost/`` totals are in
    seconds of the trial's process: times the devices each trial holds, they are device-seconds
    (``search.run.MlflowTrials``, which knows the resources).
    """
    return {"train/images_per_s": n_train / epoch_s, "cost/training_s": training_s,
            "cost/images_per_s": n_train * epochs / training_s}
