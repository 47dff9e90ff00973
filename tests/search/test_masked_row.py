# SPDX-License-Identifier: Apache-2.0
"""End to end: a gradient-masked model's evaluation lands in MLflow and its leaderboard row is marked."""
from __future__ import annotations

import json

import torch
import torch.nn as nn

from otarena import leaderboard
from otarena import methods
from otarena.search import evaluation
from otarena.search.tracking import Tracker

THREAT = methods.ThreatModel("Linf", 0.2)


class Quantized(nn.Module):
    """Rounding the input to 4 levels: zero gradients almost everywhere."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(torch.round(x * 4) / 4)


def _pgd_at():
    hparams = {"epochs": 4, "optimizer": "adam", "lr": 2e-3, "batch_size": 32, "attack_steps": 3,
               "val_pgd_steps": 3, "seed": 0}
    run = methods.build_run("pgd_at", hparams, dataset="digits", arch="small_cnn", threat=THREAT, device="cpu")
    methods.fit(run)
    run.model.load_state_dict(run.best_model)
    return run.model.eval()


def test_masked_model_row_is_marked_with_its_reason(tmp_path):
    test = methods.data.load("digits", "test")
    masked = Quantized(_pgd_at())
    result = methods.evaluate(masked, test, THREAT, n_ex=60, pgd_steps=20, sweep_steps=10)
    assert "masking:aa-gap" in result["flags"] and "masking:blackbox" in result["flags"]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "masked")
    tags = {"otarena.method": "pgd_at", "otarena.dataset": "digits", "otarena.arch": "small_cnn",
            "otarena.norm": "Linf", "otarena.eps": "0.2"}
    parent = tracker.start_search("pgd_at-search", tags, {})
    run_id = tracker.trial_run(parent, "masked_00000", name="masked <b>quantized</b>", tags=tags, params={})
    tracker.log_metrics(run_id, {"val/best_pgd_acc": 0.9, "val/best_clean_acc": 0.95, "train/epochs": 4})
    evaluation.log_evaluation(tracker, run_id, result, params={"eval.seed": 0},
                              extra_flags=evaluation.single_seed_reason(1))
    tracker.finish(run_id)
    tracker.finish(parent)

    tables = leaderboard.build(uri, str(tmp_path / "site"), experiments=["masked"])
    row, = tables[0].rows
    assert "masking:aa-gap" in row.warnings and "single-seed" in row.notes
    markdown = (tmp_path / "site" / "leaderboard.md").read_text()
    line = next(l for l in markdown.splitlines() if l.startswith("| 1 |"))
    assert "⚠" in line and "AutoAttack" in line and "points below PGD-20" in line
    stored = json.loads(tracker.client.get_run(run_id).data.tags["otarena.flag_reasons"])
    assert stored["masking:aa-gap"] == result["flag_reasons"]["masking:aa-gap"]
