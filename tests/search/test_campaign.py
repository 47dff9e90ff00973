# SPDX-License-Identifier: Apache-2.0
"""A campaign's searches: all at once by default, one after another with ``orchestration: sequential``
(docs/cluster.md). Two methods of one trial each on digits, real Ray and a real sqlite MLflow store."""
import pytest
from mlflow import MlflowClient

from otarena.search import config as config_lib
from otarena.search.run import run_search


def _campaign(tmp_path, orchestration: str):
    cfg = config_lib.parse({
        "name": f"campaign-{orchestration}", "dataset": "digits", "arch": "small_cnn", "methods": ["pgd_at", "trades"],
        "threat_model": {"norm": "Linf", "eps": 0.2}, "orchestration": orchestration,
        "train": {"optimizer": "adam", "batch_size": 128, "val_n_ex": 32, "attack_steps": 1},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": 1, "max_epochs": 2, "grace_epochs": 2, "max_concurrent": 2},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "autoattack": None, "eps_sweep": False, "checks": []},
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "ray"),
    })
    run_search(cfg, out_dir=None)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    parents = {r.data.tags["otarena.method"]: r.info for r in client.search_runs(
        [experiment.experiment_id], "tags.`otarena.role` = 'search'")}
    trials = {r.data.tags["otarena.method"]: r.info for r in client.search_runs(
        [experiment.experiment_id], "tags.`otarena.role` = 'trial'")}
    assert sorted(parents) == sorted(trials) == ["pgd_at", "trades"]
    assert all(p.status == "FINISHED" for p in parents.values())
    return parents, trials


@pytest.mark.parametrize("orchestration", ["concurrent", "sequential"])
def test_searches_at_once_or_one_after_another(tmp_path, ray_local, capsys, orchestration):
    parents, trials = _campaign(tmp_path, orchestration)
    a, b = parents["pgd_at"], parents["trades"]
    overlap = a.start_time < b.end_time and b.start_time < a.end_time
    output = capsys.readouterr().out
    if orchestration == "concurrent":
        # Both searches ran at once (whether their one-epoch trials met in time depends on how fast each search
        # task's process starts on a loaded machine: test_multinode checks trials overlapping with 3 trials each),
        # and the searches' lines, printed in their Ray tasks, reached the driver's output.
        assert overlap, parents
        assert "pgd_at: trial " in output and "trades: trial " in output
    else:
        assert not overlap and a.end_time <= b.start_time
        t, u = trials["pgd_at"], trials["trades"]
        assert t.end_time <= u.start_time
        assert "method 2/2: trades\n" in output
