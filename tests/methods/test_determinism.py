# SPDX-License-Identifier: Apache-2.0
"""The same config and seed on CPU give the same validation metrics, twice (bit for bit)."""
from __future__ import annotations

import pytest

from otarena import methods

SETTINGS = {"epochs": 2, "optimizer": "adam", "lr": 2e-3, "batch_size": 64, "val_n_ex": 48, "val_pgd_steps": 3,
            "attack_steps": 2, "seed": 7}


def _metrics(method: str) -> list[dict]:
    run = methods.build_run(method, SETTINGS, dataset="digits", arch="small_cnn",
                            threat=methods.ThreatModel("Linf", 0.2), device="cpu")
    history = []
    methods.fit(run, lambda metrics, run: history.append(
        {k: v for k, v in metrics.items() if not k.startswith("time/")}))
    return history


@pytest.mark.parametrize("method", ["pgd_at", "trades", "langevin", "got_trades_lm", "armor_trades", "ot_mdr_pgd"])
def test_same_seed_same_validation_metrics(method):
    first, second = _metrics(method), _metrics(method)
    assert len(first) == SETTINGS["epochs"]
    assert first == second


def test_another_seed_trains_differently():
    other = {**SETTINGS, "seed": 8}
    run = methods.build_run("pgd_at", other, dataset="digits", arch="small_cnn",
                            threat=methods.ThreatModel("Linf", 0.2), device="cpu")
    history = []
    methods.fit(run, lambda metrics, run: history.append(metrics["train/loss"]))
    assert history != [m["train/loss"] for m in _metrics("pgd_at")]
