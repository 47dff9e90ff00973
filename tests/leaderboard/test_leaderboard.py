# SPDX-License-Identifier: Apache-2.0
"""Leaderboard rules, end to end, on a real MLflow sqlite store written as docs/mlflow-schema.md says.

The store (built once per module, since creating an MLflow sqlite database takes a second or two):

* campaign-a, digits / Linf / eps=0.2: three searches (pgd_at, trades, mart) with several trials,
  including a trial with the best *test* AA but a worse *validation* score, failed, unevaluated,
  pruned and crashed trials, a validation tie, and a parent without search-cost metrics;
* campaign-a, digits / Linf / eps=0.3: pgd_at and trades again, which must land in their own table;
* campaign-b, mnist / L2 / eps=1.5: hostile text in params and tags;
* campaign-c, svhn / Linf / eps=8/255: the newer evaluation contract (95% CIs, a configuration
  confirmed on 3 seeds, flag reasons, hostile and malformed ``otarena.flag_reasons``).

campaign-a and campaign-b log none of the newer keys: they stand for a store written before them.
"""

from __future__ import annotations

import itertools
import json
import re
from types import SimpleNamespace

import pandas as pd
import pytest
from mlflow import MlflowClient

from otarena import leaderboard
from otarena.leaderboard import EmptySelection, build, format_text
from otarena.leaderboard.columns import COLUMNS, MD, columns
from otarena.leaderboard.formatting import EMPTY_MESSAGE, md_escape

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
           outcome="completed", evaluated=True, status="FINISHED", epochs=5, n_ex=500, metrics=None,
           flag_reasons=None):
    """A trial's child run; it gets test metrics only when ``aa`` is given.

    ``metrics`` adds further metrics (the newer ``test/*`` keys); ``flag_reasons`` is the raw
    ``otarena.flag_reasons`` tag, left out when None.
    """
    params = params if params is not None else {"lr": "0.1"}
    tags = {**parent.tags, "otarena.role": "trial", "mlflow.parentRunId": parent.id,
            "otarena.trial_id": f"t{next(_ids)}", "otarena.outcome": outcome,
            "otarena.searched": ",".join(params), "otarena.flags": flags}
    if flag_reasons is not None:
        tags["otarena.flag_reasons"] = flag_reasons
    if evaluated:
        tags["otarena.evaluated"] = "true"
    run_id = c.create_run(parent.exp, tags=tags).info.run_id
    for k, v in {**params, "epochs": str(epochs), "seed": "0"}.items():
        c.log_param(run_id, k, v)
    for step in range(2):  # per-epoch curves exist too; the leaderboard must read the best-of metrics
        c.log_metric(run_id, "val/pgd_acc", val - 0.1 * step, step=step)
    metrics = {"val/best_pgd_acc": val, "val/best_clean_acc": val_clean, "train/epochs": epochs, **(metrics or {})}
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

    cx = c.create_experiment("campaign-c")
    svhn = {"dataset": "svhn", "eps": repr(8 / 255)}
    p = _parent(c, cx, "trades", **svhn, cost=(4, 20))
    # Own AA 40% would rank it below pgd_at's 45%; its 3-seed mean of 47% ranks it above.
    r.seeds3 = _trial(c, p, val=0.6, aa=0.40, clean=0.80, pgd=0.45, n_ex=1000,
                      flags="small-sample,masking:aa-gap",
                      flag_reasons=json.dumps({"small-sample": "only 1000 test images",
                                               "masking:aa-gap": "AutoAttack 12.3 points below PGD-50"}),
                      metrics={"test/n_seeds": 3,
                               "test/clean_acc_mean": 0.81, "test/clean_acc_std": 0.005,
                               "test/pgd_acc_mean": 0.50, "test/pgd_acc_std": 0.02,
                               "test/aa_acc_mean": 0.47, "test/aa_acc_std": 0.012,
                               "test/aa_acc_ci_low": 0.412, "test/aa_acc_ci_high": 0.503,
                               "test/clean_acc_ci_low": 0.77, "test/clean_acc_ci_high": 0.83})
    p = _parent(c, cx, "pgd_at", **svhn, cost=(2, 10))
    # n_seeds=1: a stray mean must not count; a reason for an unlisted flag still raises that flag.
    r.one_seed = _trial(c, p, val=0.6, aa=0.45, flags="single-seed",
                        flag_reasons=json.dumps({"single-seed": "trained with one seed",
                                                 "masking:zero-gradient": "zero gradient on 3% of inputs"}),
                        metrics={"test/n_seeds": 1, "test/aa_acc_mean": 0.99, "test/aa_acc_std": 0.0})
    p = _parent(c, cx, "mart", **svhn, cost=(1, 5))
    r.hostile = _trial(c, p, val=0.6, aa=0.50, flags="aa-check:randomized",
                       flag_reasons=json.dumps({"aa-check:randomized": HOSTILE_REASON}))
    p = _parent(c, cx, "awp", **svhn, cost=(1, 5))
    r.malformed = _trial(c, p, val=0.6, aa=0.30, flags="masking:steps", flag_reasons='{"masking:steps": "unterminated')
    p = _parent(c, cx, "awp", **svhn, arch="wide_cnn", cost=(1, 5))
    r.not_object = _trial(c, p, val=0.6, aa=0.30, flags="small-sample", flag_reasons='["small-sample"]')
    return r


HOSTILE_REASON = "a|b <script>alert(1)</script> *x* [l](javascript:x) `c`\n\x1b[31mred"


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
        ("digits", "Linf", 0.2), ("digits", "Linf", 0.3), ("mnist", "L2", 1.5), ("svhn", "Linf", 8 / 255)]
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
    # No row of this table has a CI or a certified accuracy: those columns are left out of it.
    header = "| " + " | ".join(c.header for c in columns(MD, t.rows)) + " |"
    assert header == ("| Rank | Method | Clean | AutoAttack | PGD | Arch | Epochs | "
                      "Hyperparameters | Trials | Trial-epochs | n_ex | Seeds | Flags | Run |")
    assert f"{header}\n" in built.md.split("## digits · Linf · eps=0.2")[1].split("## ")[0]
    assert f"| 2 | pgd\\_at | 83.12 | 48.12 | 50.00 | small\\_cnn | 5 | lr=0.05 | 3 | 15 | 500 | 1 |  | {store.pgd2} |" in built.md
    assert f"| 1 | trades | 80.00 | 50.00 | 52.00 | small\\_cnn | 5 | lr=0.1, trades\\_beta=6 | 5 | 16 | 500 | 1 |" in built.md


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
    for t, section in zip(built.tables, md.split("\n## ")[1:]):
        rows = [line for line in section.splitlines() if line.startswith("| ")]
        assert rows and all(len(re.split(r"(?<!\\)\|", line)) == len(columns(MD, t.rows)) + 2 for line in rows)
    assert md_escape("a\\|b") == "a\\\\\\|b"  # a user backslash cannot un-escape the pipe


def test_csv_round_trips(store, built):
    df = pd.read_csv(built.csv, keep_default_na=False)
    assert list(df.columns) == [
        "dataset", "norm", "eps", "ranked_by", "rank", "method",
        "tied_group", "tied_ranks", "tied_p_next", "tied_p_next_holm", "not_compared",
        "clean_acc", "clean_acc_mean", "clean_acc_std", "clean_ci_low", "clean_ci_high",
        "aa_acc", "aa_acc_mean", "aa_acc_std", "aa_ci_low", "aa_ci_high",
        "pgd_acc", "pgd_acc_mean", "pgd_acc_std", "pgd_ci_low", "pgd_ci_high",
        "certified_acc", "certified_acc_mean", "certified_acc_std", "certified_ci_low", "certified_ci_high",
        "default_clean_acc", "default_aa_acc", "default_pgd_acc", "tuning_gain", "tuning_p", "default_run_id",
        "reported", "reported_source", "arch", "epochs", "overfit_gap",
        "hyperparameters", "trials", "trial_epochs", "train_device_hours", "epoch_device_s", "images_per_s",
        "n_ex", "n_seeds", "flags", "flag_reasons", "run_id",
        "experiment_id"]
    assert len(df) == sum(len(t.rows) for t in built.tables) == 12
    row = df[df.run_id == store.pgd2].iloc[0]
    assert row.aa_acc == 0.4812345678901234 and row.clean_acc == 0.8312345678901234  # full precision
    assert (row.dataset, row.norm, row.eps, row["rank"], row.hyperparameters) == ("digits", "Linf", 0.2, 2, "lr=0.05")
    evil = df[df.run_id == store.evil].iloc[0]
    assert evil.hyperparameters == "note=<script>alert(1)</script>, sep=a|b, trades_beta=6.0"
    assert evil["flags"] == "low_n_ex;single_seed [31m"  # no raw escape sequence reaches a terminal


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
    assert len({len(line) for line in lines[-(2 + 5):]}) == 1  # and in the last (⚠ and ± included)


def test_a_filter_that_matches_nothing_writes_nothing(store, tmp_path):
    """A typo in a filter must not replace a published leaderboard with an empty one."""
    site = tmp_path / "site"
    build(store.uri, site, formats="md,csv")
    before = {p.name: p.read_bytes() for p in site.iterdir()}
    with pytest.raises(EmptySelection, match="matches no trial run: nothing to rank, nothing written"):
        build(store.uri, site, filter_string="tags.`otarena.method` = 'tradess'", formats="md,csv")
    with pytest.raises(EmptySelection, match="matches 1 trial runs, none of them evaluated"):
        build(store.uri, site, filter_string=f"attributes.run_id = '{store.tr_uneval}'", formats="md,csv")
    assert {p.name: p.read_bytes() for p in site.iterdir()} == before
    assert build(store.uri, site, filter_string="tags.`otarena.method` = 'tradess'", formats="md",
                 allow_empty=True) == []
    assert EMPTY_MESSAGE in (site / "leaderboard.md").read_text()


def test_empty_store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creates the (empty) database
    assert build(uri, tmp_path / "site") == []
    assert EMPTY_MESSAGE in (tmp_path / "site" / "leaderboard.md").read_text()
    assert pd.read_csv(tmp_path / "site" / "leaderboard.csv").empty
    assert format_text([]) == EMPTY_MESSAGE


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
    assert "| 1 | hkr | 75.00 | 45.00 | 47.00 | 38.00 | lipschitz\\_small |" in md
    assert "| Certified |" not in md.split("## digits · Linf")[1]  # no certified row in the Linf table


def _svhn(built):
    return _table(built.tables, "svhn", "Linf", 8 / 255)


def _md_row(md, run_id):
    (line,) = [line for line in md.splitlines() if line.startswith("| ") and line.endswith(f" {run_id} |")]
    return line


def test_multi_seed_mean_ranks_and_shows(store, built):
    t = _svhn(built)
    # By the 3-seed mean (47%), trades passes pgd_at (45%) although its own seed scored 40%.
    assert [(r.method, r.arch) for r in t.rows] == [
        ("mart", "small_cnn"), ("trades", "small_cnn"), ("pgd_at", "small_cnn"), ("awp", "small_cnn"),
        ("awp", "wide_cnn")]
    row = t.rows[1]
    assert row.run_id == store.seeds3 and row.n_seeds == 3
    assert (row.aa_acc, row.aa_acc_mean, row.aa_acc_std, row.headline("aa_acc")) == (0.40, 0.47, 0.012, 0.47)
    assert (row.aa_ci, row.clean_ci, row.pgd_ci, row.certified_ci) == ((0.412, 0.503), (0.77, 0.83), None, None)
    assert row.certified_acc_mean is None  # not logged, in no row: no Certified column
    one = t.rows[2]  # n_seeds=1: its stray logged mean of 99% neither ranks nor shows
    assert (one.n_seeds, one.aa_acc_mean, one.headline("aa_acc")) == (1, None, 0.45)
    assert _md_row(built.md, store.seeds3) == (
        "| 2 | ⚠ trades | 81.0 ± 0.5 | 47.0 ± 1.2 | \\[41.2, 50.3\\] | 50.0 ± 2.0 | small\\_cnn | 5 | lr=0.1 "
        "| 4 | 20 | 1000 | 3 | ⚠ masking:aa-gap (AutoAttack 12.3 points below PGD-50); "
        f"small-sample (only 1000 test images) | {store.seeds3} |")
    assert _md_row(built.md, store.one_seed).startswith("| 3 | ⚠ pgd\\_at | 75.00 | 45.00 | – | 47.00 | small")

    df = pd.read_csv(built.csv, keep_default_na=False).set_index("run_id")
    assert df.loc[store.seeds3, ["rank", "n_seeds", "aa_acc", "aa_acc_mean", "aa_acc_std", "aa_ci_low", "aa_ci_high",
                                 "clean_acc_mean", "pgd_acc_std"]].astype(float).tolist() == [
        2, 3, 0.4, 0.47, 0.012, 0.412, 0.503, 0.81, 0.02]  # full precision, as logged
    assert df.loc[store.seeds3, "certified_acc_mean"] == df.loc[store.one_seed, "aa_acc_mean"] == ""
    assert df.loc[store.one_seed, "n_seeds"] == 1


def test_flag_reasons_in_markdown_csv_and_text(store, built):
    t = _svhn(built)
    rows = {r.run_id: r for r in t.rows}
    assert rows[store.seeds3].flags == ("small-sample", "masking:aa-gap")
    assert rows[store.seeds3].warnings == ("masking:aa-gap",) and rows[store.seeds3].notes == ("small-sample",)
    assert rows[store.seeds3].flag_reasons == (("small-sample", "only 1000 test images"),
                                               ("masking:aa-gap", "AutoAttack 12.3 points below PGD-50"))
    # A reason for a flag missing from otarena.flags still raises the flag (here a warning).
    assert rows[store.one_seed].flags == ("single-seed", "masking:zero-gradient")
    assert _md_row(built.md, store.one_seed).endswith(
        "| ⚠ masking:zero-gradient (zero gradient on 3% of inputs); single-seed (trained with one seed) "
        f"| {store.one_seed} |")

    df = pd.read_csv(built.csv, keep_default_na=False).set_index("run_id")
    assert df.loc[store.seeds3, "flags"] == "small-sample;masking:aa-gap"
    assert json.loads(df.loc[store.seeds3, "flag_reasons"]) == dict(rows[store.seeds3].flag_reasons)
    assert all(json.loads(cell) is not None for cell in df["flag_reasons"])  # every cell parses, "{}" when none

    text = format_text(built.tables)
    assert "⚠ trades" in text and "⚠ masking:aa-gap, small-sample" in text
    assert "AutoAttack 12.3 points" not in text and "41.2" not in text  # compact: no reasons, no CI
    assert "47.0 ± 1.2" in text
    # Notes alone earn no mark: the wide_cnn awp row has only small-sample.
    assert _md_row(built.md, store.not_object).startswith("| 5 | awp |")


def test_hostile_flag_reason_is_escaped(store, built):
    cell = _md_row(built.md, store.hostile).split(" | ")[-2]
    assert cell == ("⚠ aa-check:randomized (a\\|b &lt;script&gt;alert(1)&lt;/script&gt; \\*x\\* "
                    "\\[l\\](javascript:x) \\`c\\`  \\[31mred)")
    assert "<script>" not in built.md and "\x1b" not in built.md  # and every row keeps its cell count
    reasons = pd.read_csv(built.csv, keep_default_na=False).set_index("run_id").loc[store.hostile, "flag_reasons"]
    # Raw in the CSV (it is data, not markup), but with the newline and ESC gone.
    assert json.loads(reasons) == {
        "aa-check:randomized": "a|b <script>alert(1)</script> *x* [l](javascript:x) `c`  [31mred"}
    assert "\x1b" not in format_text(built.tables)


def test_malformed_flag_reasons_still_build(store, built):
    rows = {r.run_id: r for r in _svhn(built).rows}
    for run_id, flag in ((store.malformed, "masking:steps"), (store.not_object, "small-sample")):
        assert (rows[run_id].flags, rows[run_id].flag_reasons) == ((flag,), ())
    assert _md_row(built.md, store.malformed).startswith("| 4 | ⚠ awp |")
    assert _md_row(built.md, store.malformed).endswith(f"| ⚠ masking:steps | {store.malformed} |")
    df = pd.read_csv(built.csv, keep_default_na=False).set_index("run_id")
    assert df.loc[store.malformed, "flag_reasons"] == df.loc[store.not_object, "flag_reasons"] == "{}"


def test_runs_without_the_newer_keys_build_as_before(store, tmp_path):
    tables = build(store.uri, tmp_path, experiments=["campaign-a", "campaign-b"])
    rows = [r for t in tables for r in t.rows]
    assert len(rows) == 7
    new = ("clean_ci", "pgd_ci", "aa_ci", "certified_ci") + tuple(
        f"{m}_{s}" for m in ("clean_acc", "pgd_acc", "aa_acc", "certified_acc") for s in ("mean", "std"))
    for r in rows:
        assert r.n_seeds == 1 and r.flag_reasons == () and all(getattr(r, f) is None for f in new)
        assert r.headline("aa_acc") == r.aa_acc
    assert [r.run_id for r in _table(tables, "digits", "Linf", 0.2).rows] == [store.tr1, store.pgd2, store.m2]
    df = pd.read_csv(tmp_path / "leaderboard.csv", keep_default_na=False)
    newer = [name for c in COLUMNS for name, _ in c.csv if name.endswith(("_mean", "_std", "_low", "_high"))]
    assert len(newer) == 16 and (df[newer] == "").all().all()
    assert (df.n_seeds == 1).all() and (df.flag_reasons == "{}").all()
