# SPDX-License-Identifier: Apache-2.0
"""A tracking server that goes away mid-search and comes back costs no metric.

Real processes: an `mlflow server` the test stops (SIGTERM to its own process group) while
`otarena search` trains, then starts again on the same port and store. Writes made meanwhile
are buffered by the driver and delivered when the server is back; the search says so.
"""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient
from processes import BIN, free_port, count_rows, mlflow_server, stop

EPOCHS = 6


def test_server_restart_mid_search_loses_no_metric(tmp_path):
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = mlflow_server(tmp_path, port)
    config = tmp_path / "outage.yaml"
    config.write_text(yaml.safe_dump({
        "name": "outage", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": ["pgd_at"], "train": {"optimizer": "adam", "batch_size": 32, "val_n_ex": 64, "attack_steps": 3},
        "budget": {"trials": 2, "max_epochs": EPOCHS, "grace_epochs": EPOCHS, "max_concurrent": 1},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False},
        "storage_path": str(tmp_path / "ray"),
    }))
    driver = subprocess.Popen([str(BIN / "otarena"), "search", str(config), "--tracking-uri", uri, "--no-leaderboard"],
                              cwd=tmp_path, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while (count_rows(tmp_path / "mlflow.db", "metrics", "epoch/val/pgd_acc") < 1 and time.time() < deadline
               and driver.poll() is None):
            time.sleep(0.3)
        assert driver.poll() is None
        stop(server)
        time.sleep(5)  # trials go on reporting into the void
        server = mlflow_server(tmp_path, port, log_name="mlflow-again.log")
        out, _ = driver.communicate(timeout=600)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
        stop(server)
    assert driver.returncode == 0, out[-3000:]
    assert "is unreachable; buffering writes" in out or "is unreachable; waiting" in out, out[-3000:]
    assert "buffered writes delivered" in out and "could not be delivered" not in out

    # The server is stopped: read its store directly.
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("outage")
    trials = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")
    assert len(trials) == 2
    for trial in trials:
        assert trial.info.status == "FINISHED" and trial.data.tags["otarena.outcome"] == "completed"
        for key in ("epoch/train/loss", "epoch/val/clean_acc", "epoch/val/pgd_acc", "epoch/time/epoch_s"):
            steps = [m.step for m in client.get_metric_history(trial.info.run_id, key)]
            assert steps == list(range(1, EPOCHS + 1)), (key, steps)
    parent, = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'search'")
    assert float(parent.data.tags["otarena.tracking_outage_s"]) > 0
    assert parent.info.status == "FINISHED"
