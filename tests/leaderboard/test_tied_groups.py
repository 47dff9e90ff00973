# SPDX-License-Identifier: Apache-2.0
"""Tied groups end to end: per-point outcomes stored as search/evaluation.py stores them, in a real MLflow
sqlite store, read by the leaderboard build only for the rows it compares, cached, and shown in every format."""

from __future__ import annotations

import csv
import io
import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric

from otarena.leaderboard import build, per_example, stats
from otarena.leaderboard import tags as tag
from otarena.search.evaluation import PER_EXAMPLE_ARTIFACT, per_example_hash, write_per_example

N = 1000
ORDER = random.Random(0).sample(range(N), N)


def _points(robust: int, n: int = N, shift: int = 0) -> dict:
    """Per-point arrays whose robust points are nested: a stronger row keeps every point a weaker one keeps."""
    index = np.arange(shift, shift + n)
    kept = set(ORDER[:robust])
    aa = np.array([i in kept for i in range(n)])
    return {"index": index.astype(np.int32), "index_hash": stats_hash(index), "clean": np.ones(n, bool),
            "aa": aa, "aa_stage": np.where(aa, 5, 1).astype(np.int8)}


def stats_hash(index: np.ndarray) -> str:
    from otarena.methods.common.evaluate import index_hash

    return index_hash(index)


def _row(c, exp, folder: Path, method: str, aa: float, points: dict | None, metrics: dict | None = None):
    tags = {tag.ROLE: "trial", tag.METHOD: method, tag.DATASET: "mnist", tag.ARCH: "small_cnn", tag.NORM: "Linf",
            tag.EPS: "0.3", tag.OUTCOME: "completed", tag.EVALUATED: "true", tag.TRIAL_ID: method}
    if points is not None:
        tags |= {tag.TEST_POINTS: f"{len(points['index'])}:{points['index_hash']}",
                 tag.PER_EXAMPLE_HASH: per_example_hash(points)}
    run_id = c.create_run(exp, tags=tags, run_name=method).info.run_id
    n = N if points is None else len(points["index"])
    c.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in
                                 {"test/aa_acc": aa, "test/clean_acc": 0.9, "test/pgd_acc": aa + 0.01,
                                  "test/n_ex": n, "val/best_pgd_acc": aa, **(metrics or {})}.items()])
    if points is not None:
        path = folder / f"{method}.npz"
        write_per_example(points, str(path))
        shutil.copy(path, folder / "per_example.npz")
        c.log_artifact(run_id, str(folder / "per_example.npz"), str(Path(PER_EXAMPLE_ARTIFACT).parent))
    c.set_terminated(run_id, "FINISHED")
    return run_id


def _new_store(folder: Path) -> tuple[str, MlflowClient, str]:
    """(uri, client, experiment id) of an empty sqlite store whose artifacts live in ``folder``."""
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("tied", artifact_location=(folder / "artifacts").as_uri())


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tied-store")
    uri, c, exp = _new_store(folder)
    runs = {
        "first": _row(c, exp, folder, "first", 0.500, _points(500)),
        "second": _row(c, exp, folder, "second", 0.495, _points(495)),  # 5 discordant pairs: tied
        "third": _row(c, exp, folder, "third", 0.490, _points(490)),
        "elsewhere": _row(c, exp, folder, "elsewhere", 0.450, _points(450, shift=N)),  # other indices
        "fourth": _row(c, exp, folder, "fourth", 0.400, _points(400)),  # 90 pairs below third: its own group
        "older": _row(c, exp, folder, "older", 0.300, None),  # evaluated before per-point outcomes
        "smaller": _row(c, exp, folder, "smaller", 0.200, _points(40, n=200)),  # other n_ex
        # Ranked by AutoAttack rand's expected accuracy: its stored outcomes are the deterministic cascade's.
        "randomized": _row(c, exp, folder, "randomized", 0.100, _points(100), {"test/aa_acc_deterministic": 0.3}),
    }
    return uri, runs, folder


def test_groups_in_every_format_and_rows_on_other_points_not_compared(store, tmp_path, monkeypatch):
    uri, runs, folder = store
    monkeypatch.setenv("OTARENA_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "site"
    (table,) = build(uri, out)
    tied = {r.method: r.standing for r in table.rows}
    assert [r.method for r in table.rows] == ["first", "second", "third", "elsewhere", "fourth", "older", "smaller",
                                              "randomized"]
    assert {m: s.ranks for m, s in tied.items() if s.group is not None} == {
        "first": "1–3", "second": "1–3", "third": "1–3", "fourth": "5"}
    assert tied["third"].p_next == stats.mcnemar_exact(90, 0)
    assert tied["elsewhere"].why == "other test points" and tied["smaller"].why == "other test points"
    assert tied["older"].why == "no per-point outcomes" and tied["randomized"].why == "randomized model"

    md = (out / "leaderboard.md").read_text()
    assert "| Tied ranks |" in md.splitlines()[next(i for i, x in enumerate(md.splitlines()) if "| Rank" in x)]
    assert "| first | 1–3 |" in md and "| elsewhere | not compared (other test points) |" in md
    assert "| older | not compared (no per-point outcomes) |" in md and "training variance" in md
    rows = {r["method"]: r for r in csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text()))}
    assert [rows[m]["tied_group"] for m in ("first", "second", "third", "fourth")] == ["a", "a", "a", "b"]
    assert float(rows["first"]["tied_p_next"]) == stats.mcnemar_exact(5, 0)
    assert float(rows["third"]["tied_p_next_holm"]) == pytest.approx(3 * stats.mcnemar_exact(90, 0))
    assert "other test points" in rows["elsewhere"]["not_compared"] and rows["elsewhere"]["tied_group"] == ""
    tex = (out / "leaderboard.tex").read_text()
    assert "Tied ranks" in tex and "first & 1--3 &" in tex and "not compared (other test points)" in tex
    html = (out / "index.html").read_text()
    assert "Tied ranks" in html and 'title="group a, ranks 1–3: not told apart at 5% (Holm); against the next' in html
    assert "exact McNemar p = 0.062" in html and "training variance" in html
    info = json.loads(next((out / "model_info").rglob("*first*.json")).read_text())["otarena"]["tied"]
    assert info == {"group": "a", "ranks": "1–3", "p_next": stats.mcnemar_exact(5, 0),
                    "p_next_holm": 2 * stats.mcnemar_exact(5, 0), "not_compared": None}

    # Only the compared rows' artifacts were read, and a rebuild reads them from the cache alone.
    cached = sorted(p.name.split("-")[0] for p in per_example.cache_dir().glob("*.npz"))
    assert cached == sorted(runs[m] for m in ("first", "second", "third", "fourth"))
    shutil.rmtree(folder / "artifacts")
    (again,) = build(uri, tmp_path / "again")
    assert [r.standing for r in again.rows] == [r.standing for r in table.rows]


def test_a_store_without_per_point_outcomes_reads_no_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("OTARENA_CACHE", str(tmp_path / "cache"))
    uri, c, exp = _new_store(tmp_path)
    for method, aa in (("a", 0.5), ("b", 0.4)):
        _row(c, exp, tmp_path, method, aa, None)
    (table,) = build(uri, tmp_path / "site", formats="md")
    assert all(r.standing is None for r in table.rows) and not (tmp_path / "cache").exists()
    assert "Tied ranks" not in (tmp_path / "site" / "leaderboard.md").read_text().split("## ")[1]


def test_the_new_columns_hover_text_and_plots_in_chromium(tmp_path, monkeypatch, chromium):
    """What a reader sees: the tied ranks with the McNemar p-value on hover, what tuning bought, and the
    arrow from the paper default to the tuned trial."""
    monkeypatch.setenv("OTARENA_CACHE", str(tmp_path / "cache"))
    uri, c, exp = _new_store(tmp_path)
    runs = {
        # Its search scored the paper default too (search/run.py): 'Default → tuned' and the arrow plot.
        "first": _row(c, exp, tmp_path, "first", 0.500, _points(500),
                      {"default/aa_acc": 0.42, "default/clean_acc": 0.95, "default/pgd_acc": 0.45,
                       "default/epochs": 4, "default/mcnemar_p": 0.003}),
        "second": _row(c, exp, tmp_path, "second", 0.495, _points(495)),
        "elsewhere": _row(c, exp, tmp_path, "elsewhere", 0.450, _points(450, shift=N)),
    }
    build(uri, tmp_path / "site", formats="html")
    page = chromium.new_page(viewport={"width": 1400, "height": 1000})
    page.goto((tmp_path / "site" / "index.html").as_uri())
    board = page.locator("table.board").first
    tied = board.locator("thead th", has_text="Tied ranks")
    assert tied.count() == 1 and tied.get_attribute("title")
    first = board.locator(f'tr[data-run="{runs["first"]}"]')
    cell = first.locator("td span[title*='McNemar'], td[title*='McNemar']").first
    assert "1–2" in cell.inner_text() and "exact McNemar p = 0.062" in cell.get_attribute("title")
    assert board.locator(f'tr[data-run="{runs["elsewhere"]}"] td', has_text="not compared (other test points)").count()
    assert board.locator("thead th", has_text="Default → tuned").count() == 1
    assert first.locator("td", has_text="42.00 → 50.00 (+8.00, McNemar p 0.003)").count() == 1
    arrows = page.locator('svg[data-plot="tuning"]')
    assert arrows.count() == 1 and arrows.bounding_box()["width"] > 100
    assert any("tuning bought +8.00 points" in t for t in arrows.locator("title").all_text_contents())
    page.close()
