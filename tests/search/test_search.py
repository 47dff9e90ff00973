# SPDX-License-Identifier: Apache-2.0
"""A real Ray Tune search on digits, logged to a real sqlite MLflow store (docs/mlflow-schema.md)."""
import json

import optuna
import pytest
from mlflow import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from otarena import leaderboard
from otarena.search import config as config_lib
from otarena.search import spaces
from otarena.search.cli import main
from otarena.search.run import PrunedAwareOptunaSearch, run_search
from otarena.search.tracking import Tracker
from stored_study import check_stored_study


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("search")
    cfg = config_lib.parse({
        "name": "test-search", "dataset": "digits", "arch": "small_cnn",
        "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["trades"],
        "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 64, "attack_steps": 3},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": 3, "max_epochs": 2, "grace_epochs": 1, "max_concurrent": 2},
        "final_eval": {"top_k": 1, "n_ex": 40, "pgd_steps": 5, "autoattack": "standard", "sweep_steps": 5,
                       "seeds": 2},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray"),
    })
    summaries = run_search(cfg, out_dir=str(tmp / "site"))
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("test-search")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return tmp, cfg, summaries, client, runs


def test_one_parent_and_one_child_per_trial(searched):
    _, _, _, _, runs = searched
    parents = [r for r in runs if r.data.tags.get("otarena.role") == "search"]
    children = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    assert len(parents) == 1 and len(children) == 3
    parent = parents[0]
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    for key, value in {"otarena.method": "trades", "otarena.dataset": "digits", "otarena.arch": "small_cnn"}.items():
        assert parent.data.tags[key] == value
        assert all(c.data.tags[key] == value for c in children)
    assert parent.data.params["search.algorithm"] == "optuna-tpe"
    assert parent.data.params["search.scheduler"] == "asha"
    assert parent.data.params["config.budget.trials"] == "3"
    assert parent.data.metrics["search/n_trials"] == 3
    assert parent.data.metrics["search/trial_epochs"] == sum(c.data.metrics["train/epochs"] for c in children)
    assert parent.info.status == "FINISHED"


def test_the_stored_optuna_study_has_each_trial_in_its_state(searched):
    """The search's Optuna study outlives it, in optuna.db beside the MLflow store, named on the parent run: each
    trial ASHA stopped is PRUNED there, each one that ran max_epochs COMPLETE (search/studies.py)."""
    tmp, _, _, _, runs = searched
    (parent,) = [r for r in runs if r.data.tags.get("otarena.role") == "search"]
    assert parent.data.tags["otarena.optuna_storage"] == f"sqlite:///{tmp}/optuna.db"
    assert parent.data.tags["otarena.optuna_study"] == parent.data.tags["otarena.ray_path"].rsplit("/", 1)[1]
    outcomes = check_stored_study(parent, [r for r in runs if r.data.tags.get("otarena.role") == "trial"], "lr")
    assert sum(outcomes.values()) == 3 and outcomes["pruned"] >= 1, outcomes


def test_parent_run_says_why_it_has_no_rank_fidelity(searched):
    """ASHA over 3 trials: fewer reach max_epochs than rank fidelity needs, so its one rung (epoch 1) has a
    reason instead of a number (the numbers: tests/search/test_multinode.py, a FIFO search)."""
    _, _, _, _, runs = searched
    parent = next(r for r in runs if r.data.tags.get("otarena.role") == "search")
    assert not any(key.startswith("fidelity/") for key in parent.data.metrics)
    reasons = {k: v for k, v in parent.data.tags.items() if k.startswith("otarena.fidelity.")}
    assert list(reasons) == ["otarena.fidelity.rung_1"]
    assert reasons["otarena.fidelity.rung_1"].startswith("too few trials: ")


def test_parent_run_says_why_it_has_no_importances(searched):
    """Three trials are far fewer than hyperparameter importance needs: a reason instead of importance/* metrics
    (the numbers: tests/search/test_importance.py)."""
    _, _, _, _, runs = searched
    parent = next(r for r in runs if r.data.tags.get("otarena.role") == "search")
    assert not any(key.startswith("importance/") for key in parent.data.metrics)
    assert "search.importance_evaluator" not in parent.data.params
    assert parent.data.tags["otarena.importance_reason"].startswith("too few completed trials: ")


def test_child_runs_carry_params_curves_and_outcome(searched):
    _, _, _, client, runs = searched
    children = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    assert len({c.data.tags["otarena.trial_id"] for c in children}) == 3
    for child in children:
        tags, params, metrics = child.data.tags, child.data.params, child.data.metrics
        assert tags["otarena.norm"] == "Linf" and float(tags["otarena.eps"]) == 0.2
        assert tags["otarena.outcome"] in ("completed", "pruned")
        assert tags["otarena.searched"] == "lr,trades_beta"
        assert 1e-3 <= float(params["lr"]) <= 5e-3 and 1.0 <= float(params["trades_beta"]) <= 12.0
        assert params["optimizer"] == "adam" and params["epochs"] == "2" and params["attack_steps"] == "3"
        epochs = int(metrics["train/epochs"])
        assert (tags["otarena.outcome"] == "completed") == (epochs == 2)
        for key in ("epoch/train/loss", "epoch/val/clean_acc", "epoch/val/pgd_acc", "epoch/time/epoch_s"):
            history = client.get_metric_history(child.info.run_id, key)
            assert [m.step for m in history] == list(range(1, epochs + 1)), key
        assert 0 <= metrics["val/best_pgd_acc"] <= 1
        assert child.info.status == "FINISHED"


def test_best_trial_is_evaluated_with_checkpoint(searched):
    tmp, _, summaries, client, runs = searched
    evaluated = [r for r in runs if r.data.tags.get("otarena.evaluated") == "true"
                 and r.data.tags.get("otarena.role") == "trial"]
    assert len(evaluated) == 1 and len(summaries) == 1
    run = evaluated[0]
    children = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    # Chosen by validation, never by test.
    assert run.data.metrics["val/best_pgd_acc"] == max(c.data.metrics["val/best_pgd_acc"] for c in children)
    for key in ("test/clean_acc", "test/pgd_acc", "test/aa_acc"):
        assert 0 <= run.data.metrics[key] <= 1
    assert run.data.metrics["test/n_ex"] == 40
    assert run.data.metrics["test/aa_acc"] <= run.data.metrics["test/clean_acc"]
    assert run.data.params["eval.pgd_steps"] == "5"
    assert "small-sample" in run.data.tags["otarena.flags"]
    reasons = json.loads(run.data.tags["otarena.flag_reasons"])
    assert set(reasons) == set(run.data.tags["otarena.flags"].split(","))
    low, high = run.data.metrics["test/aa_acc_ci_low"], run.data.metrics["test/aa_acc_ci_high"]
    assert low <= run.data.metrics["test/aa_acc"] <= high
    assert run.data.metrics["test/aa/square"] == run.data.metrics["test/aa_acc"]
    report = [a.path for a in client.list_artifacts(run.info.run_id, "evaluation")]
    assert report == ["evaluation/per_example.npz", "evaluation/report.eps_sweep.json",
                      "evaluation/report.eps_sweep.png", "evaluation/report.json"]
    # The per-point outcomes: the test metrics are their means, on the points the tag names.
    import numpy as np

    from otarena.leaderboard.per_example import unpack

    with np.load(client.download_artifacts(run.info.run_id, "evaluation/per_example.npz", str(tmp))) as stored:
        points = unpack(dict(stored))
    assert points["index"].tolist() == list(range(40))
    assert run.data.tags["otarena.test_points"] == f"40:{points['index_hash']}"
    for key in ("clean", "pgd", "aa"):
        assert points[key].dtype == bool and points[key].sum() / 40 == run.data.metrics[f"test/{key}_acc"]
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")]
    assert artifacts == ["checkpoint/model.pt"]
    import torch

    weights = torch.load(client.download_artifacts(run.info.run_id, "checkpoint/model.pt", str(tmp)),
                         weights_only=True)
    assert "head.weight" in weights
    assert (tmp / "site" / "leaderboard.md").exists() and (tmp / "site" / "leaderboard.csv").exists()
    assert "trades" in (tmp / "site" / "leaderboard.md").read_text()


def test_selected_configuration_is_retrained_with_more_seeds(searched):
    tmp, cfg, summaries, client, runs = searched
    trial = next(r for r in runs if r.data.tags.get("otarena.evaluated") == "true"
                 and r.data.tags.get("otarena.role") == "trial")
    seeds = [r for r in runs if r.data.tags.get("otarena.role") == "seed"]
    assert len(seeds) == 1
    replica = seeds[0]
    assert replica.data.tags["otarena.seed_of"] == trial.info.run_id and replica.data.tags["otarena.seed"] == "1"
    assert replica.data.tags["mlflow.parentRunId"] == trial.data.tags["mlflow.parentRunId"]
    assert replica.data.params["seed"] == "1" and replica.data.params["lr"] == trial.data.params["lr"]
    assert replica.info.status == "FINISHED"
    values = [trial.data.metrics["test/aa_acc"], replica.data.metrics["test/aa_acc"]]
    metrics = trial.data.metrics
    assert metrics["test/n_seeds"] == 2
    assert metrics["test/aa_acc_mean"] == pytest.approx(sum(values) / 2)
    assert metrics["test/aa_acc_std"] == pytest.approx(abs(values[0] - values[1]) / 2 ** 0.5)
    assert "single-seed" not in trial.data.tags["otarena.flags"]
    assert " ± " in (tmp / "site" / "leaderboard.md").read_text()


def test_paper_defaults_are_evaluated_beside_the_tuned_trial(searched):
    """What tuning bought: the search's first trial, the paper defaults, is scored on the test split by the same
    protocol as the selected trial, whose run carries both (docs/mlflow-schema.md); the leaderboard shows them."""
    tmp, cfg, _, client, runs = searched
    trials = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    tuned = next(r for r in trials if r.data.tags.get("otarena.evaluated") == "true")
    (default,) = [r for r in trials if r.data.tags.get("otarena.default") == "true"]
    defaults = spaces.defaults(cfg.spaces()["trades"])
    assert {k: float(default.data.params[k]) for k in defaults} == pytest.approx(defaults)
    holder = client.get_run(tuned.data.tags["otarena.default_run"])
    if default.info.run_id != tuned.info.run_id:
        # An evaluation run under the default trial, never a leaderboard candidate, with the same settings.
        assert holder.data.tags["otarena.role"] == "evaluation"
        assert holder.data.tags["otarena.evaluates"] == holder.data.tags["mlflow.parentRunId"] == default.info.run_id
        assert default.data.tags.get("otarena.evaluated") != "true"
    assert holder.data.params["eval.pgd_steps"] == "5" and holder.data.metrics["test/n_ex"] == 40
    for key in ("clean_acc", "pgd_acc", "aa_acc"):
        assert tuned.data.metrics[f"default/{key}"] == holder.data.metrics[f"test/{key}"], key
    assert tuned.data.metrics["default/epochs"] == default.data.metrics["train/epochs"]
    # The exact McNemar test of the two on the same 40 points (a trial against itself: p = 1).
    p_value = tuned.data.metrics["default/mcnemar_p"]
    assert 0 < p_value <= 1 and (p_value == 1 or default.info.run_id != tuned.info.run_id)
    (row,) = leaderboard.collect(cfg.tracking_uri, ["test-search"])
    assert row.tuning == ("aa_acc", holder.data.metrics["test/aa_acc"], tuned.data.metrics["test/aa_acc"])
    assert "Default → tuned" in (tmp / "site" / "leaderboard.md").read_text()
    assert "Paper defaults to tuned" in (tmp / "site" / "index.html").read_text()   # the arrow plot
    # Robust overfitting, per trial: where each validation curve ended.
    for trial in trials:
        metrics = trial.data.metrics
        assert metrics["val/overfit_gap"] == pytest.approx(metrics["val/best_pgd_acc"] - metrics["val/last_pgd_acc"])
        assert "val/last_fgsm_acc" not in metrics   # TRADES with 3 attack steps is not single-step
    assert row.overfit_gap == tuned.data.metrics["val/overfit_gap"]


def test_evaluate_run_id_reproduces_the_logged_numbers(searched):
    tmp, cfg, _, client, runs = searched
    trial = next(r for r in runs if r.data.tags.get("otarena.evaluated") == "true"
                 and r.data.tags.get("otarena.role") == "trial")
    report = tmp / "again.json"
    assert main(["evaluate", trial.info.run_id, "--tracking-uri", cfg.tracking_uri, "--report", str(report)]) == 0
    numbers = json.loads(report.read_text())
    for key in ("clean_acc", "pgd_acc", "aa_acc"):
        assert numbers[key] == pytest.approx(trial.data.metrics[f"test/{key}"], abs=1e-6), key
    assert numbers["n_ex"] == 40 and numbers["settings"]["pgd_steps"] == 5
    assert (tmp / "again.eps_sweep.png").exists()
    # The new evaluation run hangs under the trial and is never a leaderboard candidate.
    evaluations = client.search_runs([trial.info.experiment_id], "tags.`otarena.role` = 'evaluation' and "
                                     f"tags.`otarena.evaluates` = '{trial.info.run_id}'")
    assert len(evaluations) == 1
    assert evaluations[0].data.tags["otarena.evaluates"] == trial.info.run_id
    assert evaluations[0].data.tags["mlflow.parentRunId"] == trial.info.run_id
    assert evaluations[0].data.metrics["test/aa_acc"] == pytest.approx(numbers["aa_acc"])

    # The same weights as a plain checkpoint file, evaluated like any PyTorch classifier.
    weights = client.download_artifacts(trial.info.run_id, "checkpoint/model.pt", str(tmp))
    plain = tmp / "plain.json"
    assert main(["evaluate", "--checkpoint", weights, "--arch", "small_cnn", "--dataset", "digits", "--norm", "Linf",
                 "--eps", "0.2", "--n-ex", "40", "--pgd-steps", "5", "--seed", "0", "--no-mlflow",
                 "--report", str(plain)]) == 0
    again = json.loads(plain.read_text())
    for key in ("clean_acc", "pgd_acc", "aa_acc"):
        assert again[key] == pytest.approx(numbers[key], abs=1e-6), key


def test_trial_maps_to_one_run_when_resumed(tmp_path):
    """A resumed trial reopens its run by the otarena.trial_id tag instead of creating a duplicate."""
    tracker = Tracker(f"sqlite:///{tmp_path}/mlflow.db", "dedup")
    parent = tracker.start_search("p", {}, {})
    first = tracker.trial_run(parent, "abc_00001", name="t", tags={}, params={"lr": 0.1})
    tracker.finish(first, "FAILED")
    again = tracker.trial_run(parent, "abc_00001", name="t", tags={}, params={"lr": 0.1})
    other = tracker.trial_run(parent, "abc_00002", name="t", tags={}, params={"lr": 0.2})
    assert again == first and other != first
    assert len(tracker.trial_runs(parent)) == 2
    assert tracker.client.get_run(first).info.status == "RUNNING"


def _study_states(searcher_cls, tmp_path, name, **extra):
    def toy(config):  # nested, so Ray pickles it by value for its workers
        for epoch in range(1, 4):
            tune.report({"val/pgd_acc": config["x"] * epoch})

    storage = f"sqlite:///{tmp_path}/optuna-{name}.db"
    searcher = searcher_cls(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric="val/pgd_acc",
                            mode="max", points_to_evaluate=[{"x": 1.0}, {"x": 0.1}, {"x": 0.05}],
                            study_name=name, storage=optuna.storages.RDBStorage(storage), **extra)
    tuner = tune.Tuner(toy, tune_config=tune.TuneConfig(
        search_alg=ConcurrencyLimiter(searcher, 1), num_samples=3,
        scheduler=ASHAScheduler(metric="val/pgd_acc", mode="max", max_t=3, grace_period=1, reduction_factor=2)),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name=name, verbose=0))
    grid = tuner.fit()
    iterations = sorted(r.metrics["training_iteration"] for r in grid)
    study = optuna.load_study(study_name=name, storage=storage)
    return iterations, [t.state for t in sorted(study.trials, key=lambda t: t.number)]


def test_asha_stopped_trials_reach_optuna_as_pruned(tmp_path, ray_local):
    iterations, states = _study_states(PrunedAwareOptunaSearch, tmp_path, "ours", max_epochs=3)
    assert iterations == [1, 1, 3], "ASHA should stop the two weak trials after one epoch"
    S = optuna.trial.TrialState
    assert states == [S.COMPLETE, S.PRUNED, S.PRUNED]
    # The trap this guards against: Ray's own OptunaSearch calls those partial scores COMPLETE.
    _, plain = _study_states(OptunaSearch, tmp_path, "plain")
    assert plain == [S.COMPLETE, S.COMPLETE, S.COMPLETE]
