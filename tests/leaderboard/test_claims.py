# SPDX-License-Identifier: Apache-2.0
"""The papers' published numbers (``claims/*.yaml``): the schema check, ``otarena claims`` and the
``reported`` field of RobustBench's model_info JSON."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_leaderboard import _parent, _trial

from otarena.leaderboard import build, claims
from otarena.search.cli import main

SHIPPED = claims.default_folder()


def test_every_shipped_claims_file_passes_the_schema():
    paths = claims.files()
    assert [p.name for p in paths] == ["000_armor.yaml", "001_ot_mdr.yaml", "002_hkr.yaml", "003_got.yaml",
                                       "004_langevin.yaml"]
    papers = [claims.read(p) for p in paths]
    assert all(p.claims or p.note for p in papers)  # a paper without numbers says why
    # Every number of the tables the issue names: seed 003's Table 1 (8 rows x 3, ARN has no AA),
    # Table 2 (6 x 9) and Table 6 (6 x 7, MNIST); seed 004's Tables 1 to 4.
    counts = Counter((c.paper[:3], c.table) for p in papers for c in p.claims)
    assert counts == {("000", "Abstract"): 2, ("003", "Table 1"): 23, ("003", "Table 2"): 54,
                      ("003", "Table 6"): 42, ("004", "Table 1"): 12, ("004", "Table 2"): 10,
                      ("004", "Table 3"): 10, ("004", "Table 4"): 5}
    by_key = {c.key: c for c in claims.load()}
    assert len(by_key) == sum(counts.values())
    # spot checks against the papers
    assert by_key["003:Table 1:GOT-PGD-S:Nat"].value == 99.37  # printed "99.3 7"
    assert by_key["003:Table 1:PGD-AT:AA"].metric.labels == "predicted"
    assert by_key["003:Table 2:TRADES:SVHN AA"].metric.n_examples == 1000
    assert by_key["003:Table 2:TRADES:SVHN AA"].eps_printed == "8/225"
    assert by_key["003:Table 6:GOT-TRADES-LM:0.7"].value == 88.01
    assert by_key["004:Table 1:Autoattack:PGD"].value == 89.10
    assert by_key["004:Table 4:PGD 100:Langevin"].arch == "langevin_mnist_b"
    armor = by_key["000:Abstract:augmenting with ARMOR_D: CIFAR-10"]
    assert armor.relative_to and armor.value == 1.9 and "relative to" in armor.departures()[-1]


def _write(tmp_path: Path, row: str) -> Path:
    folder = tmp_path / "claims"
    folder.mkdir(exist_ok=True)
    (folder / "003_bad.yaml").write_text(
        "paper: {seed: 003_45881f63c0658796.txt, title: T, citation: C, source: S}\n"
        "claims:\n"
        "  - {table: Table 1, row: PGD-AT, column: Nat, dataset: mnist, norm: linf, eps: 0.3, architecture: CNN,\n"
        "     method: pgd_at, metric: {name: clean}, value: 98.99}\n"
        f"  - {row}\n", encoding="utf-8")
    return folder


GOOD = ("{table: Table 1, row: PGD-AT, column: AA, dataset: mnist, norm: linf, eps: 0.3, architecture: CNN, "
        "method: pgd_at, metric: {name: autoattack, version: standard}, value: 91.07}")


@pytest.mark.parametrize("bad, problem", [
    (GOOD.replace("91.07", "191.07"), "value 191.07 is not a percent in [0, 100]"),
    (GOOD.replace("version: standard", "version: fast"), "metric.version"),
    (GOOD.replace("{name: autoattack, version: standard}", "{name: pgd}"), "a pgd metric needs its steps"),
    (GOOD.replace("norm: linf", "norm: l1"), "norm"),
    (GOOD.replace("eps: 0.3", "eps: 8/0"), "eps"),
    (GOOD.replace("value: 91.07", "value: 91.07, epochs: 100"), "epochs: Extra inputs are not permitted"),
    (GOOD.replace("column: AA", "column: Nat"), "the same table, row and column as claim 1"),
])
def test_a_malformed_row_is_refused_in_one_line(tmp_path, bad, problem):
    folder = _write(tmp_path, bad)
    with pytest.raises(claims.ClaimsError) as err:
        claims.load(folder)
    message = str(err.value)
    assert "\n" not in message and problem in message
    assert message.startswith(f"{folder / '003_bad.yaml'}: claim 2 (Table 1 / PGD-AT / ")


def test_the_cli_refuses_a_malformed_file_with_exit_2(tmp_path, capsys):
    folder = _write(tmp_path, GOOD.replace("91.07", "-3"))
    assert main(["claims", "--dir", str(folder)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "003_bad.yaml: claim 2 (Table 1 / PGD-AT / AA): value -3.0 is not a percent" in err
    assert main(["claims", "999"]) == 2
    assert "no claims file for '999'" in capsys.readouterr().err


def test_otarena_claims_lists_paper_table_setting_metric_and_value(capsys):
    assert main(["claims", "003"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["paper", "table", "row", "/", "column", "setting", "metric", "value"]
    assert len(lines) == 1 + 119
    row = next(line for line in lines if "PGD-AT / AA " in line)
    assert row.split()[:2] == ["003", "Table"] and row.endswith("91.07")
    assert "mnist linf 0.3 cw_mnist pgd_at" in row and "AutoAttack standard, predicted labels" in row
    assert main(["claims"]) == 0
    out = capsys.readouterr().out
    assert "8/255 ResNet-18" in out and "+1.9 points over the base method" in out
    assert "001: no published number (001_ot_mdr.yaml)" in out


def test_otarena_claims_json(capsys):
    assert main(["claims", "--json", "004_cabe46e9bce5f3d1.txt"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert len(listed) == 37 and {c["paper"] for c in listed} == {"004_cabe46e9bce5f3d1.txt"}
    first = listed[0]
    assert first["key"] == "004:Table 1:Train Adversarial:Langevin"
    assert first["training"]["hyperparameters"]["langevin_eta"] == 0.2
    assert first["metric"] == {"name": "train_adversarial", "steps": None, "restarts": None, "step_size": None,
                               "version": None, "library": None, "labels": "true", "n_examples": None}
    assert first["departures"] == ["measured on the training set"] and first["value"] == 98.48


def test_reported_prefers_autoattack_then_the_longest_pgd():
    assert claims.reported("mnist", "Linf", 0.3, "pgd_at", "cw_mnist").key == "003:Table 1:PGD-AT:AA"
    assert claims.reported("mnist", "Linf", 0.3, "langevin", "langevin_mnist_b").key == "004:Table 4:PGD 100:Langevin"
    # Table 6 attacks eps-0.3 models at eps 0.4: no claim for a model trained at 0.4
    assert claims.reported("mnist", "Linf", 0.4, "pgd_at", "cw_mnist") is None
    assert claims.reported("mnist", "Linf", 0.3, "pgd_at", "small_cnn") is None
    assert claims.reported("cifar10", "Linf", 8 / 255, "pgd_at", "preact_resnet18") is None  # ResNet-18 is not ours


def test_reported_appears_in_the_model_info_and_tables_of_a_matching_row(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri)
    exp = c.create_experiment("mnist")
    matching = _trial(c, _parent(c, exp, "pgd_at", dataset="mnist", eps="0.3", arch="cw_mnist"), val=0.9, aa=0.88)
    other = _trial(c, _parent(c, exp, "trades", dataset="mnist", eps="0.3", arch="small_cnn"), val=0.9, aa=0.87)
    site = tmp_path / "site"
    build(uri, site, formats="json,md,csv,html")
    infos = {i["otarena"]["run_id"]: i for i in
             (json.loads(p.read_text(encoding="utf-8")) for p in site.rglob("*.json"))}
    info = infos[matching]
    assert info["reported"] == "91.07"
    assert "reported: 91.07% (AutoAttack standard, predicted labels) in Anonymous authors" in info["footnote"]
    assert "Table 1, PGD-AT, AA" in info["footnote"]
    source = info["otarena"]["reported"]
    assert source["paper"] == "003_45881f63c0658796.txt" and source["key"] == "003:Table 1:PGD-AT:AA"
    assert infos[other]["reported"] is None and infos[other]["otarena"]["reported"] is None
    # the leaderboard's own tables carry it too: a Reported column in Markdown and HTML, two CSV fields
    md = (site / "leaderboard.md").read_text(encoding="utf-8")
    assert "| Reported |" in md and "| 91.07 (AutoAttack standard, seed 003 Table 1) |" in md
    assert "91.07 (AutoAttack standard, seed 003 Table 1)" in (site / "index.html").read_text(encoding="utf-8")
    rows = {r["run_id"]: r for r in csv.DictReader(io.StringIO((site / "leaderboard.csv").read_text(encoding="utf-8")))}
    assert float(rows[matching]["reported"]) == pytest.approx(0.9107)
    assert rows[matching]["reported_source"] == ("003_45881f63c0658796.txt, Table 1, PGD-AT, AA: "
                                                 "AutoAttack standard, predicted labels")
    assert rows[other]["reported"] == rows[other]["reported_source"] == ""
