# SPDX-License-Identifier: Apache-2.0
"""A board for every search: rows without AutoAttack are ranked by PGD in tables of their own, never
among AutoAttack's; RobustBench's ``name``, ``authors`` and ``venue`` come from the method's paper data.

Two real stores: a real search with ``final_eval.autoattack: null`` (Ray Tune, Optuna, sqlite MLflow,
one method, two one-epoch trials), and a hand-made mixed store in which a row without AutoAttack has a
better PGD accuracy than every AutoAttack row, so that one shared ranking would put it first.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from otarena import methods
from otarena.leaderboard import build, tags
from otarena.leaderboard.formatting import EMPTY_MESSAGE
from otarena.leaderboard.robustbench import MODEL_INFO_FIELDS, NO_AUTOATTACK_FOLDER, validate_model_info
from otarena.leaderboard.schema import NO_AUTOATTACK
from otarena.leaderboard.writers import FORMATS

EPS = 8 / 255
PGD_TITLE = "ranked by PGD (no AutoAttack)"


def _paper_tags(method: str) -> dict[str, str]:
    """The paper tags the search writes for ``method`` (search/run.py), from its paper data."""
    paper = methods.get(method).paper
    return {tags.PAPER: paper.citation, tags.PAPER_LINK: paper.link, tags.PAPER_TITLE: paper.title,
            tags.PAPER_AUTHORS: paper.authors, tags.PAPER_VENUE: paper.venue}


def _search(c, exp, method, *, dataset="cifar10", norm="Linf", eps=repr(EPS), arch="preact_resnet18", extra=None):
    search_tags = {tags.ROLE: "search", tags.METHOD: method, tags.DATASET: dataset, tags.ARCH: arch,
                   tags.NORM: norm, tags.EPS: eps, **_paper_tags(method), **(extra or {})}
    run_id = c.create_run(exp, tags=search_tags, run_name=f"{method}-search").info.run_id
    c.set_terminated(run_id, "FINISHED")
    return SimpleNamespace(exp=exp, id=run_id, tags=search_tags)


def _trial(c, parent, name, *, val, clean, pgd, aa=None, certified=None, n_ex=1000):
    """An evaluated trial; ``aa=None``: evaluated with ``final_eval.autoattack: null`` (no ``test/aa_acc``)."""
    run_tags = {**parent.tags, tags.ROLE: "trial", "mlflow.parentRunId": parent.id, tags.TRIAL_ID: name,
                tags.OUTCOME: "completed", tags.EVALUATED: "true", tags.SEARCHED: "lr"}
    run_id = c.create_run(parent.exp, tags=run_tags, run_name=name).info.run_id
    metrics = {"val/best_pgd_acc": val, "val/best_clean_acc": 0.8, "train/epochs": 10, "test/clean_acc": clean,
               "test/pgd_acc": pgd, "test/n_ex": n_ex, "test/aa_acc": aa, "test/certified_acc": certified}
    c.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items() if v is not None],
                params=[Param("lr", "0.1")])
    c.set_terminated(run_id, "FINISHED")
    return run_id


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """cifar10 Linf: trades and pgd_at with AutoAttack, mart without it and the best PGD of all;
    digits L2: pgd_at with AutoAttack, hkr asking to be ranked by certified accuracy."""
    tmp = tmp_path_factory.mktemp("mixed")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("mixed")
    runs = {
        "trades": _trial(c, _search(c, exp, "trades"), "trades-1", val=0.6, clean=0.80, pgd=0.50, aa=0.45),
        "pgd_at": _trial(c, _search(c, exp, "pgd_at"), "pgd-at-1", val=0.5, clean=0.75, pgd=0.46, aa=0.40),
        "mart": _trial(c, _search(c, exp, "mart"), "mart-no-aa", val=0.7, clean=0.85, pgd=0.70),
        "pgd_at_l2": _trial(c, _search(c, exp, "pgd_at", dataset="digits", norm="L2", eps="0.5", arch="small_cnn"),
                            "pgd-at-l2", val=0.5, clean=0.9, pgd=0.62, aa=0.60, n_ex=360),
        "hkr": _trial(c, _search(c, exp, "hkr", dataset="digits", norm="L2", eps="0.5", arch="lipschitz_small",
                                 extra={tags.RANK_BY: "certified_acc"}),
                      "hkr-certified", val=0.4, clean=0.75, pgd=0.47, aa=0.45, certified=0.38, n_ex=360),
    }
    out = tmp / "site"
    tables = build(uri, out)
    return SimpleNamespace(uri=uri, runs=runs, out=out, tables=tables,
                           md=(out / "leaderboard.md").read_text(encoding="utf-8"),
                           csv=list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text(encoding="utf-8")))),
                           tex=(out / "leaderboard.tex").read_text(encoding="utf-8"),
                           html=(out / "index.html").read_text(encoding="utf-8"))


def _infos(out: Path) -> dict[str, tuple[Path, dict]]:
    """{run id: (path, model_info)} of every otarena entry under ``out/model_info``."""
    files = sorted((out / "model_info").rglob("otarena_*.json"))
    return {(info := json.loads(p.read_text(encoding="utf-8")))["otarena"]["run_id"]: (p, info) for p in files}


def _sections(text: str, heading: str) -> dict[str, str]:
    """{title: body} of the sections a heading pattern (``## (.*)``) starts."""
    parts = re.split(heading, text)
    return dict(zip(parts[1::2], parts[2::2]))


def test_rows_with_and_without_autoattack_never_share_a_ranking(mixed):
    assert [(t.dataset, t.norm, t.ranking, [r.method for r in t.rows]) for t in mixed.tables] == [
        ("cifar10", "Linf", "aa_acc", ["trades", "pgd_at"]),
        ("cifar10", "Linf", "pgd_acc", ["mart"]),  # PGD 70% beats every AutoAttack row's PGD: still not ranked there
        ("digits", "L2", "aa_acc", ["pgd_at"]),
        ("digits", "L2", "certified_acc", ["hkr"]),
    ]
    for t in mixed.tables:
        assert all((r.aa_acc is None) == (t.ranking == "pgd_acc") for r in t.rows)
        assert all((NO_AUTOATTACK in r.notes) == (r.aa_acc is None) for r in t.rows)
    (mart,) = mixed.tables[1].rows
    assert "ranked by PGD accuracy" in dict(mart.flag_reasons)[NO_AUTOATTACK]


def test_every_format_names_the_ranking_and_keeps_the_tables_apart(mixed):
    md = _sections(mixed.md, r"(?m)^## (.*)$")
    assert list(md) == ["cifar10 · Linf · eps=8/255 · ranked by AutoAttack", f"cifar10 · Linf · eps=8/255 · {PGD_TITLE}",
                        "digits · L2 · eps=0.5 · ranked by AutoAttack", "digits · L2 · eps=0.5 · ranked by certified accuracy"]
    aa_table, pgd_table = md[list(md)[0]], md[list(md)[1]]
    assert mixed.runs["mart"] not in aa_table and "no-autoattack" not in aa_table
    # AutoAttack is shown as "–" (its column kept), and the row carries the note with its reason.
    assert "| 1 | mart | 85.00 | – | 70.00 |" in pgd_table and "no-autoattack (AutoAttack was not run" in pgd_table

    ranks = [(r["dataset"], r["ranked_by"], r["rank"], r["method"], r["aa_acc"]) for r in mixed.csv]
    assert ranks == [("cifar10", "aa_acc", "1", "trades", "0.45"), ("cifar10", "aa_acc", "2", "pgd_at", "0.4"),
                     ("cifar10", "pgd_acc", "1", "mart", ""), ("digits", "aa_acc", "1", "pgd_at", "0.6"),
                     ("digits", "certified_acc", "1", "hkr", "0.45")]
    assert mixed.csv[2]["flags"] == "no-autoattack"

    captions = re.findall(r"\\caption\{(.*)\}", mixed.tex)
    assert ["PGD accuracy (no AutoAttack" in c for c in captions] == [False, True, False, False]
    assert "ranked by certified accuracy" in captions[3] and "ranked by AutoAttack accuracy" in captions[0]
    assert re.findall(r"\\label\{(.*)\}", mixed.tex) == [
        "tab:otarena-cifar10-Linf-8-255", "tab:otarena-cifar10-Linf-8-255-pgd", "tab:otarena-digits-L2-0.5",
        "tab:otarena-digits-L2-0.5-certified"]
    assert "no-autoattack (AutoAttack was not run" in mixed.tex

    html = _sections(mixed.html, r"<h2>(.*?)</h2>")
    assert list(html) == list(md)
    assert [mixed.runs["mart"] in body for body in html.values()] == [False, True, False, False]
    assert "ranked by test AutoAttack accuracy, as on RobustBench" in mixed.html  # the rules, on the page


def test_model_info_keeps_rows_without_autoattack_out_of_robustbench_folders(mixed):
    infos = _infos(mixed.out)
    assert set(infos) == set(mixed.runs.values())
    for path, info in infos.values():
        assert validate_model_info(info) == [], path
        assert set(info) <= {*MODEL_INFO_FIELDS, "otarena"}
    path, mart = infos[mixed.runs["mart"]]
    assert path.parent == mixed.out / "model_info" / "cifar10" / "Linf" / NO_AUTOATTACK_FOLDER
    assert "autoattack_acc" not in mart and "external" not in mart
    assert (mart["otarena"]["ranked_by"], mart["otarena"]["rank"], mart["otarena"]["pgd_acc"]) == ("pgd_acc", 1, 0.7)
    assert "no AutoAttack: PGD accuracy 70.00%" in mart["footnote"]
    _, hkr = infos[mixed.runs["hkr"]]
    assert (hkr["otarena"]["ranked_by"], hkr["otarena"]["rank"], hkr["autoattack_acc"]) == ("certified_acc", 1, "45.00")
    # RobustBench's generate_leaderboard reads every *.json of <dataset>/<threat model>/ and ranks by
    # autoattack_acc: each such folder holds AutoAttack entries only.
    for folder in {p.parent for p, _ in infos.values()} - {path.parent}:
        entries = [json.loads(p.read_text(encoding="utf-8")) for p in folder.glob("*.json")]
        assert entries and sorted(entries, key=lambda x: x["autoattack_acc"], reverse=True)


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_local):
    """The demo config as a user cuts it down to explore cheaply (``otarena search configs/demo.yaml --set
    ...``): AutoAttack off, one method, two one-epoch trials, 40 test images."""
    from otarena.search import config as config_lib
    from otarena.search.run import run_search

    tmp = tmp_path_factory.mktemp("no-aa-search")
    cfg = config_lib.load(str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"), overrides={
        "name": "no-autoattack", "methods": ["trades"], "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3}}},
        "final_eval.autoattack": None, "final_eval.n_ex": 40,
        "final_eval.pgd_steps": 3, "final_eval.eps_sweep": False, "train.attack_steps": 2, "train.val_n_ex": 64,
        "train.batch_size": 64, "budget.trials": 2, "budget.max_epochs": 1, "budget.grace_epochs": 1,
        "budget.max_concurrent": 2, "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": str(tmp / "ray")})
    run_search(cfg, out_dir=str(tmp / "site"))  # publishes the board in every format, as a user gets it
    return SimpleNamespace(cfg=cfg, out=tmp / "site")


def test_a_search_without_autoattack_gets_a_ranked_board_in_every_format(searched):
    out = searched.out
    for name in ("leaderboard.md", "leaderboard.tex", "index.html"):
        text = (out / name).read_text(encoding="utf-8")
        assert EMPTY_MESSAGE not in text and "no-autoattack" in text, name
    md = (out / "leaderboard.md").read_text(encoding="utf-8")
    assert f"## digits · Linf · eps=0.2 · {PGD_TITLE}" in md
    assert re.search(r"(?m)^\| 1 \| (⚠ )?trades \| [0-9.]+ \| – \| [0-9.]+ \|", md)
    page = (out / "index.html").read_text(encoding="utf-8")
    assert f"<h2>digits · Linf · eps=0.2 · {PGD_TITLE}</h2>" in page and "no AutoAttack run: ranked by PGD" in page
    assert "ranked by PGD accuracy" in (out / "leaderboard.tex").read_text(encoding="utf-8")
    (row,) = csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text(encoding="utf-8")))
    assert (row["ranked_by"], row["rank"], row["method"], row["aa_acc"]) == ("pgd_acc", "1", "trades", "")
    assert float(row["pgd_acc"]) >= 0 and "no-autoattack" in row["flags"].split(";")
    ((path, info),) = _infos(out).values()
    assert path.parent.name == NO_AUTOATTACK_FOLDER and info["otarena"]["ranked_by"] == "pgd_acc"
    assert "(1 model_info JSON files)" in FORMATS["json"].describe(out / "model_info")  # what the CLI says


def test_model_info_fields_are_the_papers_and_carry_no_float_noise(searched):
    ((path, info),) = _infos(searched.out).values()
    paper = methods.get("trades").paper
    # RobustBench fills name with the title alone, authors and venue from the paper.
    assert (info["name"], info["authors"], info["venue"], info["link"]) == (
        paper.title, paper.authors, paper.venue, paper.link)
    assert validate_model_info(info) == [] and set(info) <= {*MODEL_INFO_FIELDS, "otarena"}
    extra = info["otarena"]
    n = extra["n_ex"]
    assert n == 40
    for m in ("clean_acc", "pgd_acc"):  # counts over n, exactly
        assert extra[m] == round(extra[m] * n) / n
    floats = []

    def walk(value):
        if isinstance(value, float):
            floats.append(value)
        for v in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
            walk(v)
    walk(info)
    assert floats and all(math.isfinite(x) and x == round(x, 6) for x in floats)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_every_method_has_its_paper_as_data(name):
    paper = methods.get(name).paper
    assert paper.title and paper.venue and paper.title not in paper.venue
    assert paper.authors or name == "erm"  # the undefended baseline has no paper, as RobustBench's "Standard"
    assert paper.link == "" or re.fullmatch(r"https://\S+", paper.link)
    assert paper.citation.endswith(paper.title + (f" ({paper.venue})" if paper.venue != "N/A" else ""))


def test_the_search_writes_the_paper_and_asks_for_certified_ranking_only_when_told():
    from otarena.search import config as config_lib
    from otarena.search.run import search_tags

    demo_l2 = str(Path(__file__).resolve().parents[2] / "configs" / "demo-l2.yaml")
    asked = search_tags(config_lib.load(demo_l2, overrides={"final_eval.rank_certified": True}), "hkr")
    paper = methods.get("hkr").paper
    assert (asked[tags.RANK_BY], asked[tags.PAPER_TITLE], asked[tags.PAPER_AUTHORS], asked[tags.PAPER_VENUE],
            asked[tags.PAPER_LINK]) == ("certified_acc", paper.title, paper.authors, paper.venue, paper.link)
    assert tags.RANK_BY not in search_tags(config_lib.load(demo_l2), "hkr")  # AutoAttack ranks by default
    demo = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    # A method without certificates is ranked by AutoAttack whatever the knob says.
    assert tags.RANK_BY not in search_tags(config_lib.load(demo, overrides={"final_eval.rank_certified": True}),
                                           "trades")
