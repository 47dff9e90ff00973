# SPDX-License-Identifier: Apache-2.0
"""Persistent Optuna studies (search/studies.py): where they live, a restored searcher that continues its stored
study, ``otarena studies`` and ``optuna-dashboard`` on the storage a search writes. The real searches that fill a
stored study are tests/search/test_search.py (its pruned trials PRUNED there) and test_resume.py (one study across
a SIGKILL and --resume)."""
import json
import os
import sqlite3
import urllib.request

import optuna
import pytest
import yaml

from otarena.search import studies
from otarena.search.cli import main
from otarena.search.run import PrunedAwareOptunaSearch
from processes import BIN, free_port, start, stop, wait_for

S = optuna.trial.TrialState


def test_studies_live_beside_the_mlflow_store_as_absolute_sqlite_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert studies.storage_url("sqlite:///mlflow.db").url == f"sqlite:///{tmp_path}/optuna.db"
    assert studies.storage_url("sqlite:////data/x/mlflow.db").url == "sqlite:////data/x/optuna.db"
    assert studies.storage_url("./mlruns").url == f"sqlite:///{tmp_path}/optuna.db"
    assert studies.storage_url("file:///data/x/mlruns").url == "sqlite:////data/x/optuna.db"
    given = studies.storage_url("http://head:5000", "postgresql://otarena:secret@head/optuna")
    assert given.url == "postgresql://otarena:secret@head/optuna" and not given.fallback
    assert given.public == "postgresql://otarena:***@head/optuna"   # what the tag and the log show
    assert studies.storage_url("sqlite:///m.db", "sqlite:///o.db").url == f"sqlite:///{tmp_path}/o.db"
    # A server keeps no studies of its own: a file in the Ray storage folder, said loudly in the log.
    server = studies.storage_url("http://head:5000", None, "ray_results")
    assert server.fallback and server.url == f"sqlite:///{tmp_path}/ray_results/optuna.db"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))   # a remote Ray storage: the driver's home
    assert studies.storage_url("http://head:5000", None, "s3://bucket/ray").url == \
        f"sqlite:///{tmp_path}/home/.otarena/optuna.db"


@pytest.mark.parametrize("url, message", [
    ("optuna.db", "optuna_storage 'optuna.db' is not a database URL (e.g. sqlite:///optuna.db"),
    ("sqlite:////no/such/folder/optuna.db", "optuna_storage 'sqlite:////no/such/folder/optuna.db': folder "
                                            "'/no/such/folder' does not exist"),
    ("oracel://u@host/db", "unknown database 'oracel'"),
    ("sqlite://", "an in-memory database would lose the studies"),
])
def test_a_bad_optuna_storage_stops_the_search_before_any_work(url, message, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["erm"],
                                    "optuna_storage": url}))
    assert main(["search", str(path), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("otarena: error: ") and message in err and "\n" not in err, err
    assert not (tmp_path / "mlflow.db").exists()


def _searcher(url: str, name: str) -> PrunedAwareOptunaSearch:
    return PrunedAwareOptunaSearch(space={"x": optuna.distributions.FloatDistribution(0.0, 1.0)},
                                   metric="val/pgd_acc", mode="max", max_epochs=3,
                                   storage=studies.open_storage(url), study_name=name)


def test_a_restored_searcher_continues_its_stored_study(tmp_path):
    """Tuner.restore unpickles the searcher as Ray last saved it; what happened after that save is in the database
    only. The restored searcher reads the study again: a trial told after the save is not told twice, a trial the
    stopped driver started after it is FAIL, and what is told now lands in the stored study, the only one."""
    url, name = f"sqlite:///{tmp_path}/optuna.db", "c-pgd_at-20260101-000000"
    searcher = _searcher(url, name)
    for ray_id in ("a", "b", "c"):
        searcher.suggest(ray_id)
    searcher.save(str(tmp_path / "searcher.pkl"))
    searcher.on_trial_complete("b", {"val/pgd_acc": 0.5, "training_iteration": 3})   # after Ray's save
    orphan = searcher._ot_study.ask()                                                 # started after it too

    restored = _searcher(url, name)
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_result("a", {"val/pgd_acc": 0.2, "training_iteration": 1})
    restored.on_trial_complete("a", {"val/pgd_acc": 0.2, "training_iteration": 1})   # ASHA stopped it: PRUNED
    restored.on_trial_complete("b", {"val/pgd_acc": 0.5, "training_iteration": 3})   # trained again: told once
    restored.on_trial_complete("c", {"val/pgd_acc": 0.7, "training_iteration": 3})
    assert [s.study_name for s in optuna.get_all_study_summaries(url)] == [name]
    stored = {t.number: t for t in optuna.load_study(study_name=name, storage=url).trials}
    numbers = {ray_id: t.number for ray_id, t in restored._ot_trials.items()}
    assert {ray_id: stored[n].state for ray_id, n in numbers.items()} == {"a": S.PRUNED, "b": S.COMPLETE,
                                                                          "c": S.COMPLETE}
    assert stored[numbers["a"]].intermediate_values == {1: 0.2}
    assert stored[orphan.number].state == S.FAIL
    assert stored[numbers["c"]].value == 0.7


def _stored_study(tmp_path):
    """A storage as a search leaves it: one study, described, with a completed, a pruned and a failed trial."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = optuna.create_study(storage=studies.open_storage(url), study_name="digits-trades-20260101-000000",
                                direction="maximize")
    studies.describe(study, "0123abcd", "digits", f"sqlite:///{tmp_path}/mlflow.db", "val/pgd_acc")
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    for state, value in ((S.COMPLETE, 0.61), (S.COMPLETE, 0.43), (S.PRUNED, None), (S.FAIL, None)):
        study.add_trial(optuna.trial.create_trial(state=state, value=value, params={"x": 0.5},
                                                  distributions={"x": x}, intermediate_values={1: 0.1}))
    return url, study.study_name


def _two_objective_study(url: str) -> str:
    study = optuna.create_study(storage=studies.open_storage(url), study_name="digits-trades-20260101-000001",
                                directions=["maximize", "maximize"])
    studies.describe(study, "4567cdef", "digits", "sqlite:///mlflow.db", ["val/pgd_acc", "val/clean_acc"])
    x = optuna.distributions.FloatDistribution(0.0, 1.0)
    for values in ([0.5, 0.9], [0.6, 0.8], [0.4, 0.7]):   # the third is dominated: a Pareto set of 2
        study.add_trial(optuna.trial.create_trial(values=values, params={"x": 0.5}, distributions={"x": x}))
    study.add_trial(optuna.trial.create_trial(state=S.PRUNED, params={"x": 0.5}, distributions={"x": x}))
    return study.study_name


def test_otarena_studies_lists_trials_by_state_best_value_and_parent_run(tmp_path, capsys):
    url, name = _stored_study(tmp_path)
    two = _two_objective_study(url)
    assert main(["studies", "--storage", url]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"Optuna studies in {url} (--storage): 2"
    assert lines[1].split() == ["study", "objectives", "complete", "pruned", "fail", "running", "best", "MLflow",
                                "parent", "run"]
    assert lines[2].split() == [name, "max", "val/pgd_acc", "2", "1", "1", "0", "0.61", "0123abcd"]
    assert lines[3].split() == [two, "max", "val/pgd_acc,", "max", "val/clean_acc", "3", "1", "0", "0", "0.6,", "0.9",
                                "(Pareto", "set:", "2)", "4567cdef"]
    dashboard, shown = lines[-1].removeprefix("open them in a browser: ").split()[:2]
    assert shown == url and os.path.basename(dashboard) == "optuna-dashboard"
    # Beside a config's MLflow store, and as JSON for scripts.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"name": "c", "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["erm"],
                                      "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    assert main(["studies", "--config", str(config), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["storage"] == url
    assert listing["studies"][0]["trials"] == {"complete": 2, "pruned": 1, "fail": 1, "running": 0, "waiting": 0}
    assert listing["studies"][1]["best"] == [0.6, 0.9] and listing["studies"][1]["pareto_size"] == 2


def test_otarena_studies_refuses_a_storage_without_studies_and_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "optuna.db"
    assert main(["studies", "--storage", f"sqlite:///{missing}"]) == 2
    assert "no such file" in capsys.readouterr().err and not missing.exists()
    mlflow_store = tmp_path / "mlflow.db"   # a store given by mistake: MLflow's tables, none of Optuna's
    with sqlite3.connect(mlflow_store) as db:
        db.execute("create table experiments (experiment_id integer primary key, name text)")
    db.close()
    before = mlflow_store.read_bytes()
    assert main(["studies", "--storage", f"sqlite:///{mlflow_store}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("holds no Optuna studies (no 'studies' table; it is an MLflow store)"), err
    assert mlflow_store.read_bytes() == before
    assert main(["studies", "--storage", "postgres-ish"]) == 2
    assert "is not a database URL" in capsys.readouterr().err


def test_optuna_dashboard_opens_the_storage_with_no_extra_step(tmp_path):
    url, name = _stored_study(tmp_path)
    port = free_port()
    dashboard = start([str(BIN / "optuna-dashboard"), url, "--host", "127.0.0.1", "--port", str(port),
                       "--server", "wsgiref"], tmp_path / "dashboard.log", cwd=tmp_path)
    try:
        api = f"http://127.0.0.1:{port}/api/studies"

        def listing():
            try:
                return json.load(urllib.request.urlopen(api, timeout=2))
            except OSError:
                return None
        wait_for(lambda: listing() is not None and dashboard.poll() is None, "optuna-dashboard", timeout=60)
        (summary,) = listing()["study_summaries"]
        assert summary["study_name"] == name and summary["directions"] == ["maximize"]
        assert {"key": "mlflow_parent_run_id", "value": "0123abcd"} in summary["user_attrs"]
        detail = json.load(urllib.request.urlopen(f"{api}/{summary['study_id']}", timeout=10))
        assert sorted(t["state"] for t in detail["trials"]) == ["Complete", "Complete", "Fail", "Pruned"]
        assert detail["objective_names"] == ["val/pgd_acc"]
    finally:
        stop(dashboard)
    assert os.path.exists(tmp_path / "optuna.db")
