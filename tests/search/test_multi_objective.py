# SPDX-License-Identifier: Apache-2.0
"""A real two-objective search on digits (Ray Tune, MO-ASHA, multi-objective TPE, a stored Optuna study, a sqlite
MLflow store): the Pareto set it records and its pruned trials in the study (docs/mlflow-schema.md); and a
two-objective Tuner stopped mid-search and restored, as ``--resume`` restores it."""
from __future__ import annotations

import json
import signal
import time

import optuna
import pytest
from mlflow import MlflowClient
from ray import tune
from ray.tune.search import ConcurrencyLimiter

from otarena.search import config as config_lib
from otarena.search.moasha import STATE_FILE, MOASHAScheduler
from otarena.search.objectives import dominates
from otarena.search.run import PrunedAwareOptunaSearch, run_search

TRIALS, EPOCHS = 3, 2
OBJECTIVES = ["val/pgd_acc", "val/clean_acc"]


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("mo")
    # TRADES' beta alone is searched: the knob that trades clean accuracy for robustness.
    cfg = config_lib.parse({
        "name": "mo-search", "objectives": OBJECTIVES, "methods": ["trades"], "threat_model": {"eps": 0.2},
        "constraints": ["val/clean_acc >= 0.5"],
        "train": {"optimizer": "adam", "lr": 3e-3, "batch_size": 64, "val_n_ex": 32, "attack_steps": 2},
        "budget": {"trials": TRIALS, "max_epochs": EPOCHS, "grace_epochs": 1, "reduction_factor": 3,
                   "max_concurrent": 2},
        "final_eval": {"top_k": "pareto", "n_ex": 16, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None,
                       "eps_sweep": False, "checks": []},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray"),
    })
    summaries = run_search(cfg, out_dir=None)
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name("mo-search")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    (parent,) = [r for r in runs if r.data.tags.get("otarena.role") == "search"]
    trials = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    return tmp, cfg, summaries, client, parent, trials


def _point(run) -> tuple[float, float]:
    return run.data.metrics["val/best_pgd_acc"], run.data.metrics["val/best_clean_acc"]


def test_search_records_its_objectives_and_algorithm(searched):
    _, _, _, _, parent, trials = searched
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.algorithm"] == "optuna-tpe-mo"
    assert parent.data.params["search.scheduler"] == "mo-asha"
    assert parent.data.params["search.objectives"] == "val/pgd_acc,val/clean_acc"
    ids = [t.data.tags["otarena.trial_id"] for t in trials]
    assert len(ids) == len(set(ids)) == TRIALS
    for run in (parent, *trials):
        assert run.data.tags["otarena.objectives"] == "val/pgd_acc,val/clean_acc"


def test_recorded_pareto_set_is_dominated_by_no_trial(searched):
    tmp, _, _, client, parent, trials = searched
    with open(client.download_artifacts(parent.info.run_id, "search/pareto.json", str(tmp))) as f:
        pareto = json.load(f)
    completed = [t for t in trials if t.data.tags["otarena.outcome"] == "completed"]
    assert pareto and parent.data.metrics["search/pareto_size"] == len(pareto)
    by_run = {t.info.run_id: t for t in trials}
    for point in pareto:
        run = by_run[point["run_id"]]
        assert run.data.tags["otarena.trial_id"] == point["trial_id"]
        assert run.data.tags["otarena.outcome"] == "completed"
        assert (point["val/pgd_acc"], point["val/clean_acc"]) == _point(run)
        assert not any(dominates(_point(other), _point(run)) for other in completed)
    # Every completed trial outside the set is dominated by one in it.
    members = {p["run_id"] for p in pareto}
    assert {t.info.run_id for t in trials if t.data.tags.get("otarena.pareto") == "true"} == members
    for run in completed:
        if run.info.run_id not in members:
            assert any(dominates(_point(by_run[m]), _point(run)) for m in members)


def test_the_pareto_set_is_evaluated_under_its_rule(searched):
    _, _, summaries, _, parent, trials = searched
    rule = "the Pareto set of val/pgd_acc, val/clean_acc; first: highest val/pgd_acc with val/clean_acc >= 0.5"
    assert parent.data.tags["otarena.selection_rule"] == rule
    evaluated = {t.info.run_id for t in trials if t.data.tags.get("otarena.evaluated") == "true"}
    assert evaluated == {t.info.run_id for t in trials if t.data.tags.get("otarena.pareto") == "true"}
    assert {s["run_id"] for s in summaries} == evaluated
    assert all(t.data.tags["otarena.selection_rule"] == rule for t in trials if t.info.run_id in evaluated)
    # The rule's order (the pick first): only the pick competes for the leaderboard row.
    ranks = sorted(int(t.data.tags["otarena.selection_rank"]) for t in trials if t.info.run_id in evaluated)
    assert ranks == list(range(1, len(evaluated) + 1))


def test_its_pruned_trials_are_pruned_in_the_stored_study(searched):
    tmp, cfg, _, _, parent, trials = searched
    storage, name = parent.data.tags["otarena.optuna_storage"], parent.data.tags["otarena.optuna_study"]
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE] * 2
    states = [t.state for t in study.trials]
    outcomes = [t.data.tags["otarena.outcome"] for t in trials]
    S = optuna.trial.TrialState
    assert states.count(S.COMPLETE) == outcomes.count("completed")
    assert states.count(S.PRUNED) == outcomes.count("pruned")
    # The config's constraint, on every told trial from its last clean accuracy (<= 0: met).
    told = [t for t in study.trials if t.state in (S.COMPLETE, S.PRUNED)]
    assert told and all(list(t.constraints) == ["val/clean_acc >= 0.5"] for t in told)
    # MO-ASHA's rung records, in the experiment's folder: every trial reached epoch 1.
    (experiment,) = [p for p in (tmp / "ray").iterdir() if p.is_dir() and p.name.startswith("mo-search-trades")]
    rungs = json.loads((experiment / STATE_FILE).read_text())["rungs"]
    assert set(rungs["1"]) == {t.data.tags["otarena.trial_id"] for t in trials}


def test_a_restored_mo_search_goes_on_with_its_rungs_and_its_study(tmp_path, ray_local):
    """Stopped as a Ctrl-C stops it (Tune's stop handler) once a first trial has ended, then ``Tuner.restore``d as
    ``--resume`` does: the scheduler gets its rung records back, the stored study goes on (no second study), and
    every trial MO-ASHA stopped is PRUNED there."""
    def toy(config):   # nested, so Ray pickles it by value for its workers
        for epoch in range(1, 4):
            time.sleep(0.1)
            tune.report({"val/pgd_acc": config["x"] * epoch / 3, "val/clean_acc": (1 - config["x"]) * epoch / 3})

    class StopOnce(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            if not (tmp_path / "stopped").exists():
                (tmp_path / "stopped").touch()
                signal.getsignal(signal.SIGUSR1)(signal.SIGUSR1, None)

    storage = f"sqlite:///{tmp_path}/optuna.db"
    searcher = PrunedAwareOptunaSearch(
        space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)}, metric=OBJECTIVES, mode=["max", "max"],
        points_to_evaluate=[{"x": 0.9}, {"x": 0.1}, {"x": 0.5}, {"x": 0.45}, {"x": 0.2}], max_epochs=3,
        study_name="toy", storage=optuna.storages.RDBStorage(storage))
    scheduler = MOASHAScheduler(metrics=OBJECTIVES, max_t=3, grace_period=1, reduction_factor=2)
    tune.Tuner(toy, tune_config=tune.TuneConfig(search_alg=ConcurrencyLimiter(searcher, 2), num_samples=5,
                                                scheduler=scheduler),
               run_config=tune.RunConfig(storage_path=str(tmp_path / "ray"), name="toy", verbose=0,
                                         callbacks=[StopOnce()])).fit()
    first = json.loads((tmp_path / "ray" / "toy" / STATE_FILE).read_text())["rungs"]
    assert 0 < len(first["1"]) < 5, "the stop should come mid-search"

    restored = tune.Tuner.restore(str(tmp_path / "ray" / "toy"), toy, resume_unfinished=True)
    grid = restored.fit()
    rungs = json.loads((tmp_path / "ray" / "toy" / STATE_FILE).read_text())["rungs"]
    assert len(rungs["1"]) == 5 and all(rungs["1"][t] == first["1"][t] for t in first["1"])
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["toy"]
    epochs = sorted(r.metrics["training_iteration"] for r in grid)
    states = [t.state for t in optuna.load_study(study_name="toy", storage=storage).trials]
    S = optuna.trial.TrialState
    assert states.count(S.PRUNED) == epochs.count(1) >= 1 and states.count(S.COMPLETE) == epochs.count(3)
