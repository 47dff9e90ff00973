# SPDX-License-Identifier: Apache-2.0
"""Ctrl-C stops a whole `otarena search` campaign cleanly, and `--resume` continues exactly there.

Real processes: the driver runs in its own session and gets SIGINT on its whole process group, as a
terminal's Ctrl-C does. The campaign searches three methods at once (docs/cluster.md), two slots shared
among them; the Ctrl-C comes once the second method's trials train.
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from mlflow import MlflowClient

OTARENA = str(Path(sys.executable).parent / "otarena")
METHODS, TRIALS, EPOCHS = ["pgd_at", "trades", "mart"], 2, 3   # epochs: time for the Ctrl-C mid-trial
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


def _config(tmp: Path, methods: list[str]) -> Path:
    path = tmp / "campaign.yaml"
    path.write_text(yaml.safe_dump({
        "name": "interrupt", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": methods, "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 32, "attack_steps": 1},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": TRIALS, "max_epochs": EPOCHS, "grace_epochs": EPOCHS, "max_concurrent": 2},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray"),
    }))
    return path


def _start(tmp: Path, config: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp / "first.log"
    driver = subprocess.Popen([OTARENA, "search", str(config), "--out", str(tmp / "site")], cwd=tmp, env=ENV,
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return driver, log


def _wait_for_line(driver: subprocess.Popen, log: Path, *parts: str, timeout: float = 300) -> None:
    """Until the driver prints a line holding every one of ``parts``."""
    def printed() -> bool:
        return any(all(part in line for part in parts) for line in log.read_text().splitlines())

    deadline = time.time() + timeout
    while not printed() and time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)
    assert printed(), log.read_text()[-3000:]


def _session_alive(session: int) -> list[str]:
    """Command lines of the processes still in the driver's session (its Ray cluster included)."""
    alive = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                alive.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except (OSError, ProcessLookupError):
            continue
    return alive


def _runs(client: MlflowClient, role: str) -> list:
    experiment = client.get_experiment_by_name("interrupt")
    return client.search_runs([experiment.experiment_id], f"tags.`otarena.role` = '{role}'",
                              order_by=["attributes.start_time ASC"])


def test_ctrl_c_stops_the_campaign_and_resume_continues_it_without_duplicates(tmp_path):
    driver, log = _start(tmp_path, _config(tmp_path, METHODS))
    try:
        _wait_for_line(driver, log, "trades: trial ", " epoch 1/")   # the second method's trials are training
        stopped_at = time.time()
        os.killpg(driver.pid, signal.SIGINT)
        assert driver.wait(timeout=120) == 130, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    output = log.read_text()
    resume_lines = [line for line in output.splitlines() if "--resume" in line and "resume with" in line]
    assert len(resume_lines) == 1, output[-3000:]
    assert not (tmp_path / "site").exists()

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    parents = {r.data.tags["otarena.method"]: r for r in _runs(client, "search")}
    assert {"pgd_at", "trades"} <= set(parents)   # searched at once (mart's too, unless no slot came to it)
    for parent in parents.values():
        assert parent.info.status == "KILLED" and parent.data.tags["otarena.interrupted"] == "true"
    trials = _runs(client, "trial")
    assert not any(r.data.tags.get("otarena.evaluated") for r in trials)   # nothing evaluated, nothing half
    assert all(r.info.status != "RUNNING" for r in trials)
    # No trial started after the Ctrl-C (a second of slack for the clocks of the two processes).
    assert all(r.info.start_time / 1000 < stopped_at + 1 for r in trials)
    stopped = [r for r in trials if r.data.tags.get("otarena.interrupted")]
    assert stopped and all(r.info.status == "KILLED" for r in stopped)
    assert "trades" in {r.data.tags["otarena.method"] for r in stopped}

    command = shlex.split(resume_lines[0].split("resume with: ", 1)[1])
    assert command[:2] == ["otarena", "search"] and command[-1] == "--resume"
    resumed = subprocess.run([OTARENA, *command[1:]], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    for method, parent in parents.items():   # every unfinished search of the campaign continues
        assert f"{method}: resuming the search of MLflow parent run {parent.info.run_id}" in resumed.stdout or (
            parent.data.tags["otarena.evaluated"] == "false"
            and f"{method}: the search of MLflow parent run {parent.info.run_id} had ended" in resumed.stdout)
    if "mart" not in parents:
        assert "mart: nothing to resume; starting its search" in resumed.stdout
    assert (tmp_path / "site" / "index.html").exists()

    parents = {r.data.tags["otarena.method"]: r for r in _runs(client, "search")}
    assert sorted(parents) == sorted(METHODS)
    trials = _runs(client, "trial")
    for method, parent in parents.items():
        assert parent.info.status == "FINISHED" and parent.data.tags["otarena.evaluated"] == "true"
        assert "otarena.interrupted" not in parent.data.tags
        own = [r for r in trials if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        ids = [r.data.tags["otarena.trial_id"] for r in own]
        assert len(ids) == len(set(ids)) == TRIALS, method   # each trial exactly one run
        assert sum(r.data.tags.get("otarena.evaluated") == "true" for r in own) == 1
        for run in own:
            assert run.info.status == "FINISHED" and "otarena.interrupted" not in run.data.tags
            # The per-epoch curve by its MLflow name (prefixed for the UI's grouping), and the best so far.
            curve = [key for key in run.data.metrics if key.endswith("val/pgd_acc")]
            assert len(curve) == 1, sorted(run.data.metrics)
            for key in (*curve, "val/best_pgd_acc"):
                steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
                # Every epoch once, the interrupted ones too, and no best-so-far point at step 0.
                assert steps == list(range(1, len(steps) + 1)) and steps, (method, key, steps)
        # The parent run ends with its own search, before its final evaluation is written.
        assert parent.info.end_time >= max(r.info.end_time for r in own)
        evaluated = next(r for r in own if r.data.tags.get("otarena.evaluated") == "true")
        written = max(m.timestamp for key in evaluated.data.metrics
                      for m in client.get_metric_history(evaluated.info.run_id, key))
        assert parent.info.end_time < written, method


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    driver, log = _start(tmp_path, _config(tmp_path, ["pgd_at"]))
    try:
        _wait_for_line(driver, log, " epoch 1/")
        os.killpg(driver.pid, signal.SIGINT)
        time.sleep(0.1)   # while the first stop saves the search, or while Ray shuts down after it
        os.killpg(driver.pid, signal.SIGINT)
        start = time.time()
        assert driver.wait(timeout=20) == 130, log.read_text()[-3000:]
        assert time.time() - start < 5
        assert "second Ctrl-C: exiting now" in log.read_text() and "Traceback" not in log.read_text()
        deadline = time.time() + 20
        while _session_alive(driver.pid) and time.time() < deadline:
            time.sleep(0.5)
        assert not _session_alive(driver.pid)   # the Ray processes went with the driver
    finally:
        if _session_alive(driver.pid):
            os.killpg(driver.pid, signal.SIGKILL)
