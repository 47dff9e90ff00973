# SPDX-License-Identifier: Apache-2.0
"""The one column spec (leaderboard/columns.py), the one writer registry (leaderboard/writers.py) and
the one list of MLflow tag names (leaderboard/tags.py).

Every format shows its columns in the spec's order with the spec's alignment; adding a column is one
spec entry, and adding a format one function plus one registry line.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest

from otarena import leaderboard
from otarena.leaderboard import columns as spec
from otarena.leaderboard import html, render, tags, writers
from otarena.leaderboard.columns import COLUMNS, HTML, MD, TEX, TEXT, Column, columns
from otarena.leaderboard.schema import Campaign, Row, Table
from otarena.leaderboard.stats import Standing

ROW = Row(run_id="r1", experiment_id="0", dataset="mnist", norm="Linf", eps=0.3, method="trades", arch="cw_mnist",
          aa_acc=0.5, aa_acc_deterministic=0.52, clean_acc=0.9, pgd_acc=0.55, certified_acc=0.4, epochs=3.0,
          n_ex=200.0, aa_ci=(0.43, 0.57), standing=Standing(0, 1, 2, 0.04, 0.08),
          trials=4.0, trial_epochs=12.0, device_hours=0.1, train_device_hours=0.02, epoch_device_s=18.0,
          images_per_s=72.0, overfit_gap=0.04, default_aa_acc=0.45,
          default_clean_acc=0.92, default_pgd_acc=0.5, default_epochs=1.0, default_run_id="r0",
          default_p=0.03)
"""A row with a value in every column: each format shows all of its columns (its setting has a published
number, seed 003's Table 1, for the Reported column)."""
TABLE = Table("mnist", "Linf", 0.3, (ROW,))


def _headers(fmt: str, table: Table = TABLE) -> list[str]:
    """The header cells each writer actually printed."""
    if fmt == MD:
        line = next(x for x in render.to_markdown([table]).splitlines() if x.startswith("| Rank"))
    elif fmt == TEXT:
        line = render.format_text([table]).splitlines()[1]
    elif fmt == TEX:
        line = next(x for x in render.to_latex([table]).splitlines() if x.startswith("Rank &"))
        return [h.strip() for h in line.removesuffix("\\\\").split("&")]
    else:
        page = html.to_html([table], Campaign(table.rows, ()), title="t", run_url=None)
        return [h.replace("\u00a0", " ") for h in re.findall(r'<button type="button">([^<]*)</button>', page)]
    return [h.strip() for h in line.strip("|").split("|")]


@pytest.mark.parametrize("fmt", [MD, TEXT, TEX, HTML])
def test_each_format_prints_the_spec_columns_in_one_order(fmt):
    shown = columns(fmt)
    assert _headers(fmt) == [c.header_in(fmt).replace("\u00a0", " ") for c in shown]
    order = [c.name for c in COLUMNS]
    assert [c.name for c in shown] == sorted((c.name for c in shown), key=order.index)
    accuracies = [c.name for c in shown if c.name in ("clean", "autoattack", "pgd", "certified")]
    assert accuracies == ["clean", "autoattack", "pgd", "certified"]  # RobustBench's: the ranking metric second


def test_a_column_empty_in_a_whole_table_is_left_out_but_kept_in_the_csv():
    no_certificate = Row(**{**vars(ROW), "certified_acc": None, "device_hours": None, "overfit_gap": None,
                            "default_aa_acc": None, "default_pgd_acc": None})
    table = Table("digits", "Linf", 0.2, (no_certificate,))
    for fmt in (MD, TEXT, TEX, HTML):
        shown = _headers(fmt, table)
        assert "Certified" not in shown and "Device hours" not in shown and "Clean" in shown, fmt
    assert "\\begin{tabular}{rlrrrrlrlc}" in render.to_latex([table])
    # The CSV's header is one contract for every store: the field stays, empty.
    header, line = render.to_csv([table]).splitlines()
    assert header == render.to_csv([TABLE]).splitlines()[0]
    assert dict(zip(header.split(","), line.split(",")))["certified_acc"] == ""
    # A table where one row has the value shows the column (a dash in the others).
    both = Table("digits", "Linf", 0.2, (ROW, no_certificate))
    assert "Certified" in _headers(MD, both) and "| – |" in render.to_markdown([both])


def test_csv_counts_are_integers():
    fields = dict(zip(*csv.reader(io.StringIO(render.to_csv([TABLE])))))  # reported_source holds commas
    assert (fields["epochs"], fields["n_ex"], fields["trials"], fields["trial_epochs"]) == ("3", "200", "4", "12")
    assert fields["aa_acc"] == "0.5" and fields["eps"] == "0.3"  # fractions stay floats
    odd = Row(**{**vars(ROW), "epochs": 2.5})
    assert dict(zip(*csv.reader(io.StringIO(render.to_csv([Table("d", "Linf", 0.2, (odd,))])))))["epochs"] == "2.5"


def test_every_accuracy_is_right_aligned_everywhere():
    assert all(c.numeric for c in COLUMNS if c.metric)
    md = render.to_markdown([TABLE])
    head, rule = [x for x in md.splitlines() if x.startswith("|")][:2]
    aligns = dict(zip([h.strip() for h in head.strip("|").split("|")], rule.strip("|").split("|")))
    assert [aligns[h] for h in ("Clean", "AutoAttack", "PGD", "Certified")] == ["---:"] * 4
    assert "\\begin{tabular}{rlrrrrrrlrrlc}" in render.to_latex([TABLE])


def test_a_new_column_is_one_spec_entry(monkeypatch):
    extra = Column("val_pgd", "Val PGD", text=lambda i, r: "12.5", value=lambda i, r: 0.125, align="right",
                   csv=(("val_pgd_acc", lambda i, r: 0.125),))
    monkeypatch.setattr(spec, "COLUMNS", (*COLUMNS, extra))
    for fmt in (MD, TEXT, TEX, HTML):
        assert _headers(fmt)[-1] == "Val PGD"
    assert render.to_csv([TABLE]).splitlines()[0].endswith(",val_pgd_acc")


def test_a_new_format_is_one_function_and_one_registry_line(monkeypatch, tmp_path):
    def to_tsv(path, out):
        path.write_text("\n".join(f"{r.method}\t{r.aa_acc}" for t in out.tables for r in t.rows))

    formats = {**writers.FORMATS, "tsv": writers.Format("leaderboard.tsv", "tab-separated values", to_tsv)}
    monkeypatch.setattr(writers, "FORMATS", formats)
    monkeypatch.setattr(leaderboard, "FORMATS", formats)
    assert "tsv: tab-separated values (leaderboard.tsv)" in writers.help_text()
    from otarena.search.cli import build_parser

    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert "tsv: tab-separated values (leaderboard.tsv)" in " ".join(subcommands["leaderboard"].format_help().split())
    out = writers.Output([TABLE], Campaign((ROW,), ()), "t", None)
    formats["tsv"].write(tmp_path / "leaderboard.tsv", out)
    assert (tmp_path / "leaderboard.tsv").read_text() == "trades\t0.5"
    assert formats["tsv"].describe(tmp_path / "leaderboard.tsv") == f"wrote {tmp_path / 'leaderboard.tsv'}"


def test_unknown_format_names_the_registry():
    with pytest.raises(ValueError, match="supported: md, csv, tex, html, json"):
        leaderboard.build("sqlite:///nowhere.db", formats="md,pdf")


def test_csv_fields_are_the_columns_fields():
    names = [name for name, _ in spec.csv_fields()]
    assert len(names) == len(set(names)) and names[:6] == ["dataset", "norm", "eps", "ranked_by", "rank", "method"]
    assert names.index("clean_acc") < names.index("aa_acc") < names.index("pgd_acc") < names.index("certified_acc")


def test_every_tag_name_is_documented():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "mlflow-schema.md").read_text(encoding="utf-8")
    names = [v for k, v in vars(tags).items() if k.isupper() and isinstance(v, str) and k != "PREFIX"]
    assert len(names) == len(set(names)) and all(n.startswith(tags.PREFIX) for n in names)
    assert [n for n in names if f"`{n}" not in doc] == []


def test_only_the_selection_rules_pick_competes_for_a_row():
    """With top_k > 1 or the Pareto set evaluated, a rule such as 'highest val/pgd_acc with val/clean_acc >= 0.8'
    may rank a trial of lower validation PGD accuracy first: the board shows that pick, not the other."""
    from otarena.leaderboard.schema import tabulate

    rule = "highest val/pgd_acc with val/clean_acc >= 0.8"
    pick = Row(**{**vars(ROW), "run_id": "pick", "val_pgd_acc": 0.5, "val_clean_acc": 0.85,
                  "selection_rule": rule, "selection_rank": 1})
    more_robust = Row(**{**vars(ROW), "run_id": "second", "val_pgd_acc": 0.6, "val_clean_acc": 0.7,
                         "selection_rule": rule, "selection_rank": 2})
    (table,) = tabulate([more_robust, pick])
    assert [r.run_id for r in table.rows] == ["pick"]
