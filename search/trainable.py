# SPDX-License-Identifier: Apache-2.0
"""The Ray Tune function trainable: one trial trains one method with one set of hyperparameters.

It reports validation metrics once per epoch (one ``training_iteration``, which ASHA counts) with
a checkpoint holding the model, optimizer, schedule and method state, so a trial that is paused,
preempted or restored continues exactly where it stopped.
"""
from __future__ import annotations

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

    def report(metrics: dict, run: Run) -> None:
        metrics = {**metrics, "val/best_pgd_acc": run.best["val/pgd_acc"],
                   "val/best_clean_acc": run.best["val/clean_acc"], "val/best_epoch": run.best["epoch"],
                   "node_id": node_id}
        with tempfile.TemporaryDirectory() as folder:
            torch.save(run.state_dict(), os.path.join(folder, STATE_FILE))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    methods.fit(run, report)
