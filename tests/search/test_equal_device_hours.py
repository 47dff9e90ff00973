# SPDX-License-Identifier: Apache-2.0
"""``budget.compare: equal_device_hours`` in a real search on digits: a cheap method (ERM) and a costly one
(PGD-AT) end with trial budgets in inverse proportion to their measured cost per epoch, within one trial."""
import pytest
from mlflow import MlflowClient

from otarena.search import budget
from otarena.search import config as config_lib
from otarena.search.run import run_search


def test_trials_in_inverse_proportion_to_the_cost_per_epoch(tmp_path, ray_local):
    cfg = config_lib.parse({
        "name": "equal-hours", "dataset": "digits", "arch": "small_cnn", "methods": ["erm", "pgd_at"],
        "threat_model": {"norm": "Linf", "eps": 0.2},
        "train": {"optimizer": "adam", "batch_size": 128, "val_n_ex": 32, "attack_steps": 7},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": 6, "max_epochs": 1, "grace_epochs": 1, "compare": "equal_device_hours",
                   "max_concurrent": 2},
        "final_eval": {"n_ex": 16, "pgd_steps": 2, "autoattack": None, "eps_sweep": False, "checks": []},
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "ray"),
    })
    run_search(cfg, out_dir=None)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("equal-hours")
    parents = {r.data.tags["otarena.method"]: r for r in client.search_runs(
        [experiment.experiment_id], "tags.`otarena.role` = 'search'")}
    cost = {m: float(p.data.params["budget.epoch_device_s"]) for m, p in parents.items()}
    assert cost["pgd_at"] > 2 * cost["erm"]  # 8 passes per step against 1
    for method, parent in parents.items():
        params = parent.data.params
        assert params["budget.compare"] == "equal_device_hours" and params["budget.rule"] == budget.RULE
        assert params["budget.reference_method"] == "erm" and params["budget.trials_asked"] == "6"
        trials = parent.data.metrics["search/n_trials"]
        assert params["config.budget.trials"] == params["budget.trials"] == str(int(trials))
        # The same device-hours: trials times cost per epoch is the cheapest method's 6 trials', within one trial.
        share = 6 * cost["erm"] / cost[method]
        assert abs(trials - share) <= 1 or trials == 1 > share, (method, trials, share)
    assert parents["erm"].data.metrics["search/n_trials"] == 6
    assert parents["pgd_at"].data.metrics["search/n_trials"] < 6
    # Every trial's own training cost, from the training loop's clock (docs/mlflow-schema.md, cost/).
    trials = client.search_runs([experiment.experiment_id], "tags.`otarena.role` = 'trial'")
    assert len(trials) == sum(p.data.metrics["search/n_trials"] for p in parents.values())
    for trial in trials:
        metrics = trial.data.metrics
        epoch_s = [m.value for m in client.get_metric_history(trial.info.run_id, "epoch/time/epoch_s")]
        assert metrics["cost/epoch_device_s"] == pytest.approx(sum(epoch_s) / len(epoch_s))  # 1 CPU: 1 device
        assert metrics["cost/train_device_hours"] == pytest.approx(sum(epoch_s) / 3600)
        assert metrics["cost/images_per_s"] == pytest.approx(1293 / epoch_s[0])  # digits' training split
        images_per_s = client.get_metric_history(trial.info.run_id, "epoch/train/images_per_s")
        assert [m.step for m in images_per_s] == [1]


def test_the_rule_gives_the_cheapest_method_budget_trials_and_every_method_one_at_least():
    trials = budget.equal_device_hours({"erm": 1.0, "pgd_at": 3.1, "got": 12.0, "slow": 100.0}, 6)
    assert trials == {"erm": 6, "pgd_at": 2, "got": 1, "slow": 1}  # 6 / 3.1 = 1.9; 6 / 12 = 0.5 rounds to 0
    assert budget.equal_device_hours({"erm": 2.0, "trades": 2.0}, 6) == {"erm": 6, "trades": 6}
