# SPDX-License-Identifier: Apache-2.0
"""A trial whose process dies fails alone, with its reason; with `max_failures` it resumes instead.

The fault is real: the test SIGKILLs the Ray actor process that runs a trial (what an OOM kill or
a lost node does), found among the processes of the `otarena search` it started itself.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from processes import count_rows

from otarena import leaderboard

OTARENA = str(Path(sys.executable).parent / "otarena")
TRIALS, EPOCHS = 3, 4


def _trial_processes(session: int) -> list[int]:
    """Ray's trial actors (``ray::ImplicitFunc.train``) of one driver's session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if title.startswith("ray::ImplicitFunc") and os.getsid(int(entry.name)) == session:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _search_with_a_killed_trial(tmp: Path, max_failures: int):
    config = tmp / "failures.yaml"
    config.write_text(yaml.safe_dump({
        "name": "failures", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": ["pgd_at"], "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 32, "attack_steps": 1},
        "budget": {"trials": TRIALS, "max_epochs": EPOCHS, "grace_epochs": EPOCHS, "max_concurrent": 2,
                   "max_failures": max_failures},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "pgd_targets": 0, "eps_sweep": False},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray"),
    }))
    log = open(tmp / "search.log", "w")
    driver = subprocess.Popen([OTARENA, "search", str(config), "--out", str(tmp / "site")], cwd=tmp,
                              env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}, stdout=log,
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 240
        while (count_rows(tmp / "mlflow.db", "metrics", "epoch/val/pgd_acc") < 1 and time.time() < deadline
               and driver.poll() is None):
            time.sleep(0.3)
        victims = _trial_processes(driver.pid)
        assert victims, (tmp / "search.log").read_text()[-2000:]
        os.kill(victims[0], signal.SIGKILL)
        assert driver.wait(timeout=600) == 0, (tmp / "search.log").read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    experiment = client.get_experiment_by_name("failures")
    return client, client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")


def test_a_dead_trial_fails_alone_and_the_leaderboard_ignores_it(tmp_path):
    client, trials = _search_with_a_killed_trial(tmp_path, max_failures=0)
    assert len(trials) == TRIALS
    failed = [t for t in trials if t.data.tags["otarena.outcome"] == "failed"]
    assert len(failed) == 1
    assert failed[0].info.status == "FAILED" and failed[0].data.tags["otarena.failure"]
    others = [t for t in trials if t not in failed]
    assert all(t.data.tags["otarena.outcome"] == "completed" for t in others)
    assert all(t.info.status == "FINISHED" for t in others)
    rows = leaderboard.collect(f"sqlite:///{tmp_path}/mlflow.db", ["failures"])
    assert len(rows) == 1 and rows[0].run_id != failed[0].info.run_id


def test_with_max_failures_the_trial_resumes_from_its_checkpoint(tmp_path):
    client, trials = _search_with_a_killed_trial(tmp_path, max_failures=1)
    assert len(trials) == TRIALS
    assert all(t.data.tags["otarena.outcome"] == "completed" for t in trials)
    for trial in trials:
        steps = [m.step for m in client.get_metric_history(trial.info.run_id, "epoch/val/pgd_acc")]
        # The retried trial went on from its last checkpoint: every epoch once, none lost.
        assert sorted(set(steps)) == list(range(1, EPOCHS + 1))
        assert len(steps) <= EPOCHS + 1
