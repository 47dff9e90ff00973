# SPDX-License-Identifier: Apache-2.0
"""Kill the `otarena search` driver with SIGKILL mid-search, then `--resume`: nothing lost, nothing twice.

Real processes: the driver (with its in-process Ray cluster) runs in its own session, so the
SIGKILL takes it and every Ray process it started, as a crash or a preemption would.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient
from processes import count_rows
from stored_study import check_stored_study

OTARENA = str(Path(sys.executable).parent / "otarena")
TRIALS, EPOCHS = 6, 3


def _config(tmp: Path) -> Path:
    path = tmp / "resume.yaml"
    path.write_text(yaml.safe_dump({
        "name": "resume", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": ["pgd_at"],
        "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 48, "attack_steps": 2},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": TRIALS, "max_epochs": EPOCHS, "grace_epochs": 1, "reduction_factor": 2,
                   "max_concurrent": 2},
        "final_eval": {"n_ex": 20, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray"),
    }))
    return path


def test_sigkill_then_resume_reaches_the_budget_once(tmp_path):
    config = _config(tmp_path)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    log = open(tmp_path / "first.log", "w")
    driver = subprocess.Popen([OTARENA, "search", str(config), "--no-leaderboard"], cwd=tmp_path, env=env,
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while (count_rows(tmp_path / "mlflow.db", "tags", "otarena.outcome") < 2 and time.time() < deadline
               and driver.poll() is None):
            time.sleep(0.5)
        assert driver.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert count_rows(tmp_path / "mlflow.db", "tags", "otarena.outcome") >= 2, "the search never got going"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("resume")
    before = {r.data.tags["otarena.trial_id"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`otarena.role` = 'trial'")}
    done_before = {t: r for t, r in before.items() if "otarena.outcome" in r.data.tags}
    assert len(done_before) < TRIALS

    resumed = subprocess.run([OTARENA, "search", str(config), "--resume", "--no-leaderboard"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the search" in resumed.stdout

    parents = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'search'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    trials = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")
    ids = [r.data.tags["otarena.trial_id"] for r in trials]
    # The same total budget, one run per trial: no duplicates and no orphans.
    assert len(ids) == len(set(ids)) == TRIALS
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in trials)
    assert all(r.info.status in ("FINISHED", "KILLED", "FAILED") for r in trials)
    for run in trials:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val/pgd_acc")]
        # Each epoch once: a finished trial was not rerun, a killed one went on from its checkpoint.
        assert steps == list(range(1, len(steps) + 1)), (run.data.tags["otarena.trial_id"], steps)
        trial_id = run.data.tags["otarena.trial_id"]
        if trial_id in done_before:
            assert run.info.run_id == done_before[trial_id].info.run_id
            assert len(steps) == int(done_before[trial_id].data.metrics["train/epochs"])
    assert parents[0].data.metrics["search/n_trials"] == TRIALS
    # One Optuna study across the kill and the resume: the restored searcher wrote into the stored study (no second
    # one, nothing left RUNNING), and each finished trial is there in its MLflow outcome's state.
    assert parents[0].data.tags["otarena.optuna_storage"] == f"sqlite:///{tmp_path}/optuna.db"
    assert sum(check_stored_study(parents[0], trials, "lr").values()) == TRIALS
    assert f"Optuna study {parents[0].data.tags['otarena.optuna_study']} continued from its storage" in resumed.stdout
    # Rank fidelity at ASHA's rungs (epochs 1 and 2), from Ray's results of the resumed search: each rung a
    # number or the reason it has none, over every completed trial, those the killed driver saw finish included.
    completed = sum(1 for r in trials if r.data.tags.get("otarena.outcome") == "completed")
    for epoch in (1, 2):
        number = f"fidelity/rung_{epoch}" in parents[0].data.metrics
        reason = parents[0].data.tags.get(f"otarena.fidelity.rung_{epoch}")
        assert number != bool(reason), (epoch, parents[0].data.metrics, reason)
        line = next(line for line in resumed.stdout.splitlines() if f"rank fidelity at rung epoch {epoch}: " in line)
        assert f"over {completed} trials" in line or f"too few trials: {completed} reached" in line, line
    assert sum(1 for r in trials if r.data.tags.get("otarena.evaluated") == "true") == 1
