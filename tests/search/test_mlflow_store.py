# SPDX-License-Identifier: Apache-2.0
"""What otarena writes into an MLflow store for its UI (docs/mlflow-schema.md), and the store checks of
`otarena ui` and `otarena leaderboard`: the experiment kind, artifacts beside the store, the names of the
per-epoch curves, a missing store and a server that is down."""
import os
import shutil
import time

from mlflow import MlflowClient
from processes import free_port

from otarena.search import cli
from otarena.search.tracking import EXPERIMENT_KIND, TRAINING_KIND, Tracker


def _artifact(tracker: Tracker, run_id: str, folder) -> str:
    path = folder / "note.txt"
    path.write_text("x")
    tracker.log_artifact(run_id, str(path), "notes")
    return MlflowClient(tracker.tracking_uri).get_run(run_id).info.artifact_uri


def test_experiments_are_for_model_training_and_keep_artifacts_beside_the_store(tmp_path, monkeypatch):
    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    store.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # MLflow's default would be ./mlruns here
    uri = f"sqlite:///{store}/mlflow.db"
    tracker = Tracker(uri, "digits robust/L2")
    experiment = MlflowClient(uri).get_experiment(tracker.experiment_id)
    assert experiment.tags[EXPERIMENT_KIND] == TRAINING_KIND == "custom_model_development"
    assert experiment.artifact_location == str(store / "mlartifacts" / "digits-robust-L2")
    uri_of_run = _artifact(tracker, tracker.start_search("s", {}, {}), tmp_path)
    assert uri_of_run.startswith(str(store / "mlartifacts" / "digits-robust-L2"))
    assert (store / "mlartifacts" / "digits-robust-L2").is_dir() and not os.listdir(elsewhere)


def test_an_existing_experiment_gets_the_kind(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    made_by_hand = MlflowClient(uri).create_experiment("by-hand", artifact_location=str(tmp_path / "mine"))
    Tracker(uri, "by-hand")
    experiment = MlflowClient(uri).get_experiment(made_by_hand)
    assert experiment.tags[EXPERIMENT_KIND] == TRAINING_KIND
    assert experiment.artifact_location == str(tmp_path / "mine")  # inside the store's folder: kept


def test_a_copied_store_never_writes_into_the_original(tmp_path):
    original, copy = tmp_path / "clone", tmp_path / "copy"
    original.mkdir(), copy.mkdir()
    first = Tracker(f"sqlite:///{original}/mlflow.db", "demo")
    old_run = first.start_search("s", {}, {})
    _artifact(first, old_run, tmp_path)
    shutil.copy(original / "mlflow.db", copy / "mlflow.db")
    before = sorted(p.relative_to(original) for p in original.rglob("*") if "mlartifacts" in p.parts)
    again = Tracker(f"sqlite:///{copy}/mlflow.db", "demo")
    new_run = again.start_search("s", {}, {})
    assert _artifact(again, new_run, tmp_path).startswith(str(copy / "mlartifacts" / "demo"))
    assert sorted(p.relative_to(original) for p in original.rglob("*") if "mlartifacts" in p.parts) == before
    # The copied run keeps its own artifacts (where the original wrote them).
    assert MlflowClient(f"sqlite:///{copy}/mlflow.db").get_run(old_run).info.artifact_uri.startswith(str(original))


def test_epoch_curves_sort_before_the_one_number_metrics(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "curves")
    run_id = tracker.start_search("s", {}, {})
    for epoch in (1, 2):
        tracker.log_epoch(run_id, {"train/loss": 1.0, "train/adv_acc": 0.5, "val/clean_acc": 0.9, "val/pgd_acc": 0.4,
                                   "val/best_pgd_acc": 0.4, "val/best_clean_acc": 0.9, "val/best_epoch": epoch,
                                   "time/epoch_s": 2.0, "epoch": epoch, "node_id": "n"}, step=epoch)
    tracker.log_metrics(run_id, {"test/aa_acc": 0.3, "train/epochs": 2})
    client = MlflowClient(uri)
    keys = set(client.get_run(run_id).data.metrics)
    assert keys == {"epoch/train/loss", "epoch/train/adv_acc", "epoch/val/clean_acc", "epoch/val/pgd_acc",
                    "epoch/time/epoch_s", "val/best_pgd_acc", "val/best_clean_acc", "val/best_epoch",
                    "test/aa_acc", "train/epochs"}
    # MLflow's run page: one section per key up to its last "/", sections sorted by name.
    sections = sorted({key.rsplit("/", 1)[0] for key in keys})
    assert sections[:3] == ["epoch/time", "epoch/train", "epoch/val"]
    assert [m.step for m in client.get_metric_history(run_id, "val/best_pgd_acc")] == [1, 2]
    assert tracker.last_step(run_id, "val/pgd_acc") == 2
    older = tracker.start_search("s", {}, {})  # logged before the curves moved under epoch/
    tracker.log_metrics(older, {"val/pgd_acc": 0.5}, step=3)
    assert tracker.last_step(older, "val/pgd_acc") == 3


def test_ui_refuses_a_missing_store(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["ui"]) == cli.EXIT_USAGE
    assert cli.main(["ui", "--tracking-uri", f"sqlite:///{tmp_path}/other.db"]) == cli.EXIT_USAGE
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and all("no MLflow store" in line for line in lines), lines
    assert os.listdir(tmp_path) == []  # no empty mlflow.db made


def test_a_server_that_is_down_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{free_port()}"
    for command in (["leaderboard", "--tracking-uri", uri, "--out", str(tmp_path / "site")],
                    ["ui", "--tracking-uri", uri]):
        start = time.time()
        assert cli.main(command) == cli.EXIT_USAGE
        assert time.time() - start < 10, command
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2 and "unreachable" in lines[0] and "server" in lines[1], lines
    assert os.listdir(tmp_path) == []
