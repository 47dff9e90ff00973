# SPDX-License-Identifier: Apache-2.0
"""Leaderboard rules, end to end, on a real MLflow sqlite store written as docs/mlflow-schema.md says.

The store (built once per module, since creating an MLflow sqlite database takes a second or two):

* campaign-a, digits / Linf / eps=0.2: three searches (pgd_at, trades, mart) with several trials,
  including a trial with the best *test* AA but a worse *validation* score, failed, unevaluated,
  pruned and crashed trials, a validation tie, and a parent without search-cost metrics;
* campaign-a, digits / Linf / eps=0.3: pgd_at and trades again, which must land in their own table;
* campaign-b, mnist / L2 / eps=1.5: hostile text in params and tags.
"""

from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow import MlflowClient

import leaderboard
from leaderboard import build, format_text
from leaderboard.render import COLUMNS, md_escape

_ids = itertools.count()


def _parent(c, exp, method, *, dataset="digits", norm="Linf", eps="0.2", arch="small_cnn", cost=None):
    """A search's parent run; ``cost`` = (n_trials, trial_epochs) or None to leave them out."""
    tags = {"otarena.role": "search", "otarena.method": method, "otarena.dataset": dataset,
            "otarena.arch": arch, "otarena.norm": norm, "otarena.eps": eps}
    run_id = c.create_run(exp, tags=tags, run_name=f"{method}-search").info.run_id
    c.log_param(run_id, "search.algorithm", "optuna-tpe")
    if cost:
        c.log_metric(run_id, "search/n_trials", cost[0])
        c.log_metric(run_id, "search/trial_epochs", cost[1])
    c.set_terminated(run_id, "FINISHED")
    return SimpleNamespace(exp=exp, id=run_id, tags=tags)


def _trial(c, parent, *, val, val_clean=0.8, aa=None, clean=None, pgd=None, params=None, flags="",
           outcome="completed", evaluated=True, status="FINISHED", epochs=5, n_ex=500):
    """A trial's child run; it gets test metrics only when ``aa`` is given."""
    params = params if params is not None else {"lr": "0.1"}
    tags = {**parent.tags, "otarena.role": "trial", "mlflow.parentRunId": parent.id,
            "otarena.trial_id": f"t{next(_ids)}", "otarena.outcome": outcome,
            "otarena.searched": ",".join(params), "otarena.flags": flags}
    if evaluated:
        tags["otarena.evaluated"] = "true"
    run_id = c.create_run(parent.exp, tags=tags).info.run_id
    for k, v in {**params, "epochs": str(epochs), "seed": "0"}.items():
        c.log_param(run_id, k, v)
    for step in range(2):  # per-epoch curves exist too; the leaderboard must read the best-of metrics
        c.log_metric(run_id, "val/pgd_acc", val - 0.1 * step, step=step)
    metrics = {"val/best_pgd_acc": val, "val/best_clean_acc": val_clean, "train/epochs": epochs}
    if aa is not None:
        metrics |= {"test/aa_acc": aa, "test/clean_acc": clean if clean is not None else aa + 0.3,
                    "test/pgd_acc": pgd if pgd is not None else aa + 0.02, "test/n_ex": n_ex}
    for k, v in metrics.items():
        c.log_metric(run_id, k, v)
    c.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    a, b = c.create_experiment("campaign-a"), c.create_experiment("campaign-b")
    r = SimpleNamespace(uri=uri, tmp=tmp)

    p = _parent(c, a, "pgd_at", cost=(3, 15))
    r.pgd1 = _trial(c, p, val=0.50, aa=0.45)
    r.pgd2 = _trial(c, p, val=0.55, aa=0.4812345678901234, clean=0.8312345678901234, pgd=0.5,
                    params={"lr": "0.05"}, n_ex=500)
    r.pgd3 = _trial(c, p, val=0.40, val_clean=0.9, aa=0.60)  # best test AA, worse validation

    p = _parent(c, a, "trades")  # no search-cost metrics: counted over its 5 trials instead
    r.tr1 = _trial(c, p, val=0.60, aa=0.50, params={"lr": "0.1", "trades_beta": "6.0"})
    r.tr_failed = _trial(c, p, val=0.90, aa=0.90, outcome="failed", epochs=2)
    r.tr_uneval = _trial(c, p, val=0.95, aa=0.95, evaluated=False)
    r.tr_pruned = _trial(c, p, val=0.99, outcome="pruned", evaluated=False, epochs=1)
    r.tr_crashed = _trial(c, p, val=0.97, aa=0.97, status="FAILED", epochs=3)

    p = _parent(c, a, "mart", cost=(3, 11))
    r.m1 = _trial(c, p, val=0.58, val_clean=0.80, aa=0.49)
    r.m2 = _trial(c, p, val=0.58, val_clean=0.85, aa=0.44)  # validation tie: better val clean wins
    r.m3 = _trial(c, p, val=0.30, aa=0.20, outcome="pruned")  # pruned but evaluated: a candidate

    p = _parent(c, a, "pgd_at", eps="0.3", cost=(1, 5))
    r.e3_pgd = _trial(c, p, val=0.30, aa=0.31)
    p = _parent(c, a, "trades", eps="0.3", cost=(1, 5))
    r.e3_trades = _trial(c, p, val=0.31, aa=0.35)

    p = _parent(c, b, "trades", dataset="mnist", norm="L2", eps="1.5", cost=(2, 10))
    r.evil = _trial(c, p, val=0.7, aa=0.7, flags="low_n_ex,single_seed\x1b[31m",
                    params={"note": "<script>alert(1)</script>", "sep": "a|b", "trades_beta": "6.0"})
    p = _parent(c, b, "pgd_at", dataset="mnist", norm="L2", eps="1.5", arch="wrn`34`*_[x]", cost=(1, 5))
    r.b2 = _trial(c, p, val=0.6, aa=0.65)
    return r


@pytest.fixture(scope="module")
def built(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    tables = build(store.uri, out_dir=out)
    return SimpleNamespace(tables=tables, md=(out / "leaderboard.md").read_text(), csv=out / "leaderboard.csv")


def _table(tables, dataset, norm, eps):
    (t,) = [t for t in tables if (t.dataset, t.norm, t.eps) == (dataset, norm, eps)]
    return t


def test_ranking_and_columns(store, built):
    assert [(t.dataset, t.norm, t.eps) for t in built.tables] == [
        ("digits", "Linf", 0.2), ("digits", "Linf", 0.3), ("mnist", "L2", 1.5)]
    t = _table(built.tables, "digits", "Linf", 0.2)
    assert [r.method for r in t.rows] == ["trades", "pgd_at", "mart"]
    assert [r.run_id for r in t.rows] == [store.tr1, store.pgd2, store.m2]

    pgd = t.rows[1]
    assert (pgd.clean_acc, pgd.pgd_acc, pgd.aa_acc) == (0.8312345678901234, 0.5, 0.4812345678901234)
    assert (pgd.arch, pgd.epochs, pgd.n_ex, pgd.hparams) == ("small_cnn", 5.0, 500.0, (("lr", "0.05"),))
    assert (pgd.trials, pgd.trial_epochs) == (3.0, 15.0)  # from the parent's search metrics
    # The trades parent logged no cost: its 5 trial runs (failed ones included) and their epochs.
    assert (t.rows[0].trials, t.rows[0].trial_epochs) == (5.0, 5 + 2 + 5 + 1 + 3)

    assert "## digits · Linf · eps=0.2" in built.md
    header = "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    assert built.md.count(header) == 3
    assert f"| 2 | pgd\\_at | 83.12 | 50.00 | 48.12 | – | small\\_cnn | 5 | lr=0.05 | 3 | 15 | 500 |  | {store.pgd2} |" in built.md
    assert f"| 1 | trades | 80.00 | 52.00 | 50.00 | – | small\\_cnn | 5 | lr=0.1, trades\\_beta=6 | 5 | 16 | 500 |" in built.md


def test_validation_not_test_decides(store, built):
    chosen = {r.run_id for t in built.tables for r in t.rows}
    assert store.pgd2 in chosen and store.pgd3 not in chosen  # pgd3 has the best test AA
    assert store.m2 in chosen and store.m1 not in chosen  # tie on val PGD, broken by val clean


def test_ignored_runs_and_eps_not_mixed(store, built):
    chosen = {r.run_id for t in built.tables for r in t.rows}
    for ignored in (store.tr_failed, store.tr_uneval, store.tr_pruned, store.tr_crashed):
        assert ignored not in chosen
    for t in built.tables:
        assert {(r.dataset, r.norm, r.eps) for r in t.rows} == {(t.dataset, t.norm, t.eps)}
    t3 = _table(built.tables, "digits", "Linf", 0.3)
    assert [r.run_id for r in t3.rows] == [store.e3_trades, store.e3_pgd]


def test_markdown_escapes_user_text(store, built):
    md = built.md
    assert "<script>" not in md and "&lt;script&gt;alert(1)&lt;/script&gt;" in md
    assert "sep=a\\|b" in md and "wrn\\`34\\`\\*\\_\\[x\\]" in md
    assert "\x1b" not in md
    # Escaped pipes keep every row at exactly one cell per column.
    rows = [line for line in md.splitlines() if line.startswith("| ")]
    assert rows and all(len(re.split(r"(?<!\\)\|", line)) == len(COLUMNS) + 2 for line in rows)
    assert md_escape("a\\|b") == "a\\\\\\|b"  # a user backslash cannot un-escape the pipe


def test_csv_round_trips(store, built):
    df = pd.read_csv(built.csv, keep_default_na=False)
    assert list(df.columns) == [
        "dataset", "norm", "eps", "rank", "method", "clean_acc", "pgd_acc", "aa_acc", "certified_acc", "arch", "epochs",
        "hyperparameters", "trials", "trial_epochs", "n_ex", "flags", "run_id", "experiment_id"]
    assert len(df) == sum(len(t.rows) for t in built.tables) == 7
    row = df[df.run_id == store.pgd2].iloc[0]
    assert row.aa_acc == 0.4812345678901234 and row.clean_acc == 0.8312345678901234  # full precision
    assert (row.dataset, row.norm, row.eps, row["rank"], row.hyperparameters) == ("digits", "Linf", 0.2, 2, "lr=0.05")
    evil = df[df.run_id == store.evil].iloc[0]
    assert evil.hyperparameters == "note=<script>alert(1)</script>, sep=a|b, trades_beta=6.0"
    assert evil["flags"] == "low_n_ex,single_seed [31m"  # no raw escape sequence reaches a terminal


def test_filters_and_experiments(store, tmp_path):
    tables = build(store.uri, tmp_path, experiments=["campaign-b"])
    assert [(t.dataset, t.eps) for t in tables] == [("mnist", 1.5)]
    tables = build(store.uri, tmp_path, filter_string="tags.`otarena.method` = 'trades'", formats="md")
    assert {r.method for t in tables for r in t.rows} == {"trades"}
    # The filter narrows the candidates, not the sibling count behind the search cost.
    assert _table(tables, "digits", "Linf", 0.2).rows[0].trials == 5.0
    with pytest.raises(ValueError, match="no MLflow experiment"):
        build(store.uri, tmp_path, experiments=["nope"])
    with pytest.raises(ValueError, match="filter_string"):
        build(store.uri, tmp_path, filter_string="tags.x ~~ 'y'")
    with pytest.raises(ValueError, match="unknown leaderboard format"):
        build(store.uri, tmp_path, formats=("md", "pdf"))


def test_format_text(store, built):
    text = format_text(built.tables)
    assert "digits · Linf · eps=0.2" in text and store.pgd2 in text
    assert "\x1b" not in text
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len({len(line) for line in lines[: 2 + 3]}) == 1  # aligned columns in the first table


def test_empty_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the (empty) database
    assert build(uri, tmp_path / "site") == []
    assert leaderboard.render.EMPTY_MESSAGE in (tmp_path / "site" / "leaderboard.md").read_text()
    assert pd.read_csv(tmp_path / "site" / "leaderboard.csv").empty
    assert format_text([]) == leaderboard.render.EMPTY_MESSAGE


def test_missing_or_unreadable_store(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        build(f"sqlite:///{tmp_path}/missing.db", tmp_path)
    assert not (tmp_path / "missing.db").exists()  # not created as a side effect
    with pytest.raises(ValueError, match="does not exist"):
        build(str(tmp_path / "no_mlruns"), tmp_path)
    (tmp_path / "junk.db").write_text("not a database")
    with pytest.raises(RuntimeError, match="cannot read MLflow store") as err:
        build(f"sqlite:///{tmp_path}/junk.db", tmp_path)
    assert "\n" not in str(err.value)


def test_certified_rows_get_an_l2_table_with_a_certified_column(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("lipschitz")
    p = _parent(c, exp, "hkr", norm="L2", eps="0.5", arch="lipschitz_small", cost=(2, 6))
    run_id = _trial(c, p, val=0.4, aa=0.45, params={"hkr_alpha": "0.99"})
    c.log_metric(run_id, "test/certified_acc", 0.38)
    p2 = _parent(c, exp, "pgd_at", cost=(2, 6))
    _trial(c, p2, val=0.5, aa=0.5)
    tables = build(uri, tmp_path / "site", formats="md")
    assert [(t.norm, t.eps) for t in tables] == [("L2", 0.5), ("Linf", 0.2)]
    md = (tmp_path / "site" / "leaderboard.md").read_text()
    assert "## digits · L2 · eps=0.5" in md
    assert "| 1 | hkr | 75.00 | 47.00 | 45.00 | 38.00 | lipschitz\\_small |" in md
