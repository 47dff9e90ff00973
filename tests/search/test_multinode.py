# SPDX-License-Identifier: Apache-2.0
"""A real multi-node Ray cluster on loopback and a real MLflow server: the cluster path, proven on one machine.

Two `ray start` processes (a head and a worker, each with one CPU and its own custom resource,
token authentication on as on real clusters since Ray 2.59) and one `mlflow server` with a sqlite
backend and an artifact folder. `otarena search --address --tracking-uri --storage` runs a search
whose two concurrent trials must land on different nodes; every trial's run reaches the server
with its metrics, and the checkpoints land under the shared storage path. Every process the test
started is stopped through its own process group, never with `ray stop` (which would kill any Ray
of the user's).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from processes import BIN, free_port, mlflow_server, start, stop, wait_for

@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp)}
    ray_port, mlflow_port = free_port(), free_port()
    started = []
    try:
        started.append(mlflow_server(tmp, mlflow_port, env=env))
        # Token authentication, as on real clusters: one token for the head, the worker and the driver.
        subprocess.run([str(BIN / "ray"), "get-auth-token", "--generate"], env=env, check=True, capture_output=True,
                       timeout=60)
        started.append(start([str(BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
                               "--num-cpus=1", "--num-gpus=0", '--resources={"node_a": 1}', "--include-dashboard=false",
                               f"--temp-dir={tmp}/ray"], tmp / "head.log", env))
        address = f"127.0.0.1:{ray_port}"
        wait_for(lambda: _node_count(address, env) == 1, "the Ray head")
        started.append(start([str(BIN / "ray"), "start", "--block", f"--address={address}", "--num-cpus=1",
                               "--num-gpus=0", '--resources={"node_b": 1}'], tmp / "worker.log", env))
        wait_for(lambda: _node_count(address, env) == 2, "the two-node cluster", timeout=120)
        yield {"tmp": tmp, "env": env, "address": address, "tracking_uri": f"http://127.0.0.1:{mlflow_port}",
               "processes": started}
    finally:
        for process in reversed(started):
            stop(process)


def _node_count(address: str, env: dict) -> int:
    probe = ("import ray; ray.init(address='%s', logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))" % address)
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    try:
        return int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return 0


def test_search_spreads_over_both_nodes_and_logs_to_the_server(cluster):
    tmp, env = cluster["tmp"], cluster["env"]
    config = tmp / "search.yaml"
    config.write_text(yaml.safe_dump({
        "name": "multinode", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": ["pgd_at"],
        "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 48, "attack_steps": 2},
        # FIFO: every trial trains max_epochs, so that the rank fidelity of ASHA's rung (epoch 1) is measured.
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": 4, "max_epochs": 2, "grace_epochs": 1, "max_concurrent": 2, "scheduler": "fifo"},
        "final_eval": {"n_ex": 20, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False},
    }))
    storage = tmp / "shared" / "ray_results"
    search = subprocess.run(
        [str(BIN / "otarena"), "search", str(config), "--address", cluster["address"],
         "--tracking-uri", cluster["tracking_uri"], "--storage", str(storage), "--out", str(tmp / "site")],
        env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]

    client = MlflowClient(cluster["tracking_uri"])
    experiment = client.get_experiment_by_name("multinode")
    trials = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")
    assert len(trials) == 4
    nodes = {t.data.tags["otarena.node_id"] for t in trials}
    assert len(nodes) == 2, f"all trials ran on {nodes}"
    for trial in trials:
        history = client.get_metric_history(trial.info.run_id, "epoch/val/pgd_acc")
        assert [m.step for m in history] == list(range(1, int(trial.data.metrics["train/epochs"]) + 1))
        assert trial.info.status == "FINISHED"
        # The checkpoint the trial ended with lives on the shared storage path.
        assert trial.data.tags["otarena.checkpoint"].startswith(str(storage))
        assert (Path(trial.data.tags["otarena.checkpoint"]) / "state.pt").is_file()
    evaluated = [t for t in trials if t.data.tags.get("otarena.evaluated") == "true"]
    assert len(evaluated) == 1
    # Rank fidelity over the 4 trials, all of which reached max_epochs: a number, printed and on the parent run.
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'search'")
    rho = parent.data.metrics["fidelity/rung_1"]
    assert -1 <= rho <= 1 and not any(k.startswith("otarena.fidelity.") for k in parent.data.tags)
    assert f"rank fidelity at rung epoch 1: Spearman rho {rho:+.2f} over 4 trials" in search.stdout
    # Artifacts went through the server into its artifact folder.
    assert [a.path for a in client.list_artifacts(evaluated[0].info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
    assert any((tmp / "artifacts").rglob("model.pt"))


def test_processes_are_ours_and_alive(cluster):
    assert all(p.poll() is None for p in cluster["processes"])


def test_a_two_method_campaign_searches_both_at_once_and_resumes_both_after_sigkill(cluster):
    """Both searches at once on the two nodes (one slot each: the fair share of two), their trials overlapping in
    time; the driver killed with SIGKILL mid-campaign; ``--resume`` continues both (a search caught mid-way resumes,
    one that had just ended gets its final evaluation): one parent per method, one run per trial."""
    tmp, env = cluster["tmp"], cluster["env"]
    methods, trials = ["pgd_at", "trades"], 3
    config = tmp / "campaign.yaml"
    config.write_text(yaml.safe_dump({
        "name": "concurrent", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": methods, "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 32, "attack_steps": 1},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": trials, "max_epochs": 3, "grace_epochs": 1, "max_concurrent": 2, "scheduler": "fifo"},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False},
    }))
    command = [str(BIN / "otarena"), "search", str(config), "--address", cluster["address"], "--tracking-uri",
               cluster["tracking_uri"], "--storage", str(tmp / "shared" / "campaign"), "--no-leaderboard"]
    log = tmp / "campaign-first.log"
    driver = start(command, log, env, cwd=tmp)
    client = MlflowClient(cluster["tracking_uri"])

    def completed() -> dict:
        experiment = client.get_experiment_by_name("concurrent")
        runs = client.search_runs([experiment.experiment_id], "tags.`otarena.outcome` = 'completed'") \
            if experiment else []
        return {m: [r for r in runs if r.data.tags["otarena.method"] == m] for m in methods}

    try:
        # Each search has finished a trial and is training the next: SIGKILL the driver there.
        wait_for(lambda: min(map(len, completed().values())) >= 1 or driver.poll() is not None,
                 "a trial of each search", timeout=300)
        assert driver.poll() is None, log.read_text()[-3000:]
    finally:
        stop(driver, signal.SIGKILL)
    # Both searches at once: a trial of one ran while a trial of the other did (MLflow's start and end times
    # of the trials the killed driver saw complete).
    spans = {m: [(r.info.start_time, r.info.end_time) for r in runs] for m, runs in completed().items()}
    assert any(a0 < b1 and b0 < a1 for a0, a1 in spans["pgd_at"] for b0, b1 in spans["trades"]), spans
    first = log.read_text()
    assert any(f"{m}: search done" not in first for m in methods), first[-3000:]

    resumed = subprocess.run(command + ["--resume"], env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    experiment = client.get_experiment_by_name("concurrent")
    parents = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'search'")
    assert sorted(p.data.tags["otarena.method"] for p in parents) == methods   # one parent per method
    runs = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")
    continued = {}
    for parent in parents:
        method = parent.data.tags["otarena.method"]
        # A search still going continues; one that had ended (the faster one may have) gets its final evaluation.
        continued[method] = f"{method}: resuming the search of MLflow parent run {parent.info.run_id}" in resumed.stdout
        assert continued[method] or f"{method}: the search of MLflow parent run {parent.info.run_id} had ended" in \
            resumed.stdout, resumed.stdout[-3000:]
        assert parent.info.status == "FINISHED" and parent.data.tags["otarena.evaluated"] == "true"
        own = [r for r in runs if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        ids = [r.data.tags["otarena.trial_id"] for r in own]
        assert len(ids) == len(set(ids)) == trials, method   # one run per trial, none twice after the restore
        for run in own:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, "epoch/val/pgd_acc")]
            assert steps == list(range(1, len(steps) + 1)), (method, steps)
    assert any(continued.values())   # the search the SIGKILL caught mid-way (both, unless one had ended)
    # Their progress lines name their method, relayed from the searches' tasks to the driver's terminal.
    assert all(f"{m}: trial " in first for m in methods)
