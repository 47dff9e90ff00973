# SPDX-License-Identifier: Apache-2.0
"""LaTeX output, RobustBench ``model_info`` export and the ``otarena leaderboard`` command.

Uses the golden store of ``test_golden.py`` (a real sqlite MLflow store): a 3-seed trades row with
flag reasons, a pgd_at row whose PGD beats AutoAttack, a row whose user text is hostile, and a
certified L2 row.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import replace
from types import SimpleNamespace

import pytest
from test_golden import HOSTILE, HOSTILE_ARCH, HOSTILE_METHOD, HOSTILE_RUN_NAME, golden_store

from otarena.leaderboard import build
from otarena.leaderboard.columns import TEX, columns
from otarena.leaderboard.formatting import EMPTY_MESSAGE, latex_escape
from otarena.leaderboard.render import to_latex
from otarena.leaderboard.robustbench import (
    MODEL_INFO_FIELDS, OTARENA_KEYS, REQUIRED_FIELDS, validate_model_info, write_model_info)
from otarena.leaderboard.schema import Row, Table
from otarena.search.cli import main

# RobustBench's own entry, as stored in RobustBench/robustbench model_info/cifar10/Linf/Kang2021Stable.json.
KANG2021 = {
    "link": "https://arxiv.org/abs/2110.12976",
    "name": "Stable Neural ODE with Lyapunov-Stable Equilibrium Points for Defending Against Adversarial Attacks",
    "authors": "Qiyu Kang, Yang Song, Qinxu Ding, Wee Peng Tay", "additional_data": True,
    "number_forward_passes": 1, "dataset": "cifar10", "venue": "NeurIPS 2021",
    "architecture": "WideResNet-70-16, Neural ODE block", "eps": "8/255", "clean_acc": "93.73",
    "reported": "71.28", "autoattack_acc": "71.28", "external": "64.20",
    "footnote": "It is based on the model from Rebuffi et al. (Rebuffi2021Fixing_70_16_cutmix_extra).",
    "unreliable": True,
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return golden_store(tmp_path_factory)


@pytest.fixture(scope="module")
def site(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("site")
    tables = build(store.uri, out, formats="tex,json")
    files = sorted((out / "model_info").rglob("*.json"))
    infos = {json.loads(p.read_text(encoding="utf-8"))["otarena"]["run_id"]: (p, json.loads(p.read_text()))
             for p in files}
    return SimpleNamespace(out=out, tables=tables, tex=(out / "leaderboard.tex").read_text(), files=files, infos=infos)


# ---------------------------------------------------------------------------------------------- model_info
def test_every_entry_validates_and_is_unique(site):
    rows = [r for t in site.tables for r in t.rows]
    assert len(site.files) == len(rows) == 4 and set(site.infos) == {r.run_id for r in rows}
    for path, info in site.infos.values():
        assert validate_model_info(info) == [], path
        assert set(info) <= set(MODEL_INFO_FIELDS) | {"otarena"} and set(REQUIRED_FIELDS) <= set(info)
        assert tuple(info["otarena"]) == OTARENA_KEYS
        assert re.fullmatch(r"otarena_[A-Za-z0-9_-]+\.json", path.name)
        # <folder>/<dataset>/<norm>/<entry>.json, in RobustBench's naming
        assert path.parent.parent.parent == site.out / "model_info"
        assert (path.parent.parent.name, path.parent.name) == (info["dataset"], info["otarena"]["norm"])
    assert len({p.name.lower() for p in site.files}) == len(site.files)


def test_fields_follow_robustbench(store, site):
    _, trades = site.infos[store.runs["trades"]]
    assert {k: trades[k] for k in ("dataset", "eps", "clean_acc", "autoattack_acc", "reported", "venue",
                                   "additional_data", "number_forward_passes", "unreliable")} == {
        "dataset": "cifar10", "eps": "8/255", "clean_acc": "80.00", "autoattack_acc": "40.00", "reported": None,
        "venue": "", "additional_data": False, "number_forward_passes": 1, "unreliable": True}
    assert trades["name"] == "Theoretically Principled Trade-off between Robustness and Accuracy"
    assert trades["link"] == "https://arxiv.org/abs/1901.08573" and "external" not in trades
    assert "over 3 training seeds: clean 81.00 ± 0.50%, AutoAttack 47.00 ± 1.20%" in trades["footnote"]
    extra = trades["otarena"]
    assert [extra[k] for k in ("rank", "n_seeds", "n_ex", "aa_acc", "aa_acc_mean")] == [1, 3, 1000, 0.4, 0.47]
    assert [extra[f"{m}_ci95"] for m in ("aa_acc", "clean_acc", "pgd_acc")] == [[0.412, 0.503], [0.77, 0.83], None]
    assert extra["flags"] == ["small-sample", "masking:aa-gap"]
    assert extra["flag_reasons"]["masking:aa-gap"] == "AutoAttack 12.3 points below PGD-50"
    assert extra["hyperparameters"] == {"lr": "0.1", "trades_beta": "6.0"}
    assert extra["search_cost"] == {"trials": 4, "trial_epochs": 40, "device_hours": 0.25}
    assert extra["training_cost"] == {"device_hours": 0.5, "epoch_device_s": 180.0, "images_per_s": 2800.0}
    assert extra["experiment"] == "golden-cifar" and extra["run_name"] == "trades-3-seeds"

    path, pgd = site.infos[store.runs["pgd_at"]]
    # PGD (44%) found less than AutoAttack (45%): RobustBench's "best known" robust accuracy.
    assert (pgd["autoattack_acc"], pgd["external"], pgd["unreliable"]) == ("45.00", "44.00", False)
    assert "external: PGD accuracy, 1.00 points below AutoAttack" in pgd["footnote"]
    assert pgd["otarena"]["aa_acc_mean"] is None and pgd["link"] == ""
    assert path.name == f"otarena_pgd_at_preact_resnet18_{store.runs['pgd_at'][:8]}.json"

    path, hkr = site.infos[store.runs["hkr"]]
    assert path.relative_to(site.out / "model_info").parts[:2] == ("digits", "L2")
    assert (hkr["eps"], hkr["otarena"]["certified_acc"], hkr["otarena"]["eps"]) == ("0.5", 0.38, 0.5)


def test_hostile_text_is_html_escaped_for_robustbench(store, site):
    path, info = site.infos[store.runs["hostile"]]
    # RobustBench's template puts these fields into its page without escaping them.
    for key in ("name", "architecture", "footnote", "link"):
        assert "<" not in info[key] and ">" not in info[key], key
    assert info["architecture"] == "&lt;script&gt;alert(1)&lt;/script&gt;"
    assert info["name"] == "=cmd|&#x27; /C calc&#x27;!A0"
    # The otarena object is data: kept as logged.
    assert (info["otarena"]["method"], info["otarena"]["arch"], info["otarena"]["run_name"]) == (
        HOSTILE_METHOD, HOSTILE_ARCH, HOSTILE_RUN_NAME)
    assert info["otarena"]["flag_reasons"] == {"aa-check:randomized": HOSTILE}
    assert re.fullmatch(r"otarena_cmd-C-calc-A0_script-alert-1-script_[0-9a-f]{8}\.json", path.name)


def _row(run_id, method="m", arch="a", **kw):
    return Row(run_id=run_id, experiment_id="1", dataset=kw.pop("dataset", "cifar10"), norm=kw.pop("norm", "Linf"),
               eps=8 / 255, method=method, arch=arch, aa_acc=0.5, clean_acc=kw.pop("clean_acc", 0.8), **kw)


def test_entry_names_stay_unique_and_safe(tmp_path):
    rows = (_row("abcdef12" + "0" * 24, "a b"), _row("abcdef12" + "1" * 24, "a-b"),  # same slug, same prefix
            _row("abcdef12" + "0" * 24, "A-B"),  # differs only in case from the first
            _row("ffff0000", "../../etc", arch="..", norm="linf"), _row("eeee0000", "", arch=""),
            _row("dddd0000", "x" * 500), _row("cccc0000", clean_acc=None))  # no clean accuracy: left out
    paths = write_model_info([Table("cifar10", "Linf", 8 / 255, rows)], tmp_path)
    names = [p.name for p in paths]
    assert len(paths) == 6 and len({n.lower() for n in names}) == 6
    assert all(p.resolve().is_relative_to(tmp_path.resolve()) and p.parent.parent.parent == tmp_path for p in paths)
    assert all(re.fullmatch(r"otarena_[A-Za-z0-9_-]+\.json", n) and len(n) < 150 for n in names)
    assert names[:3] == ["otarena_a-b_a_abcdef12.json", "otarena_a-b_a_abcdef12" + "1" * 24 + ".json",
                         "otarena_A-B_a_abcdef12" + "0" * 24 + ".json"]
    assert paths[3].parent.name == "Linf"  # RobustBench's spelling of the threat model
    assert all(validate_model_info(json.loads(p.read_text())) == [] for p in paths)


def test_stale_entries_are_removed_but_foreign_files_kept(store, tmp_path):
    folder = tmp_path / "model_info"
    first = write_model_info(build(store.uri, tmp_path, formats="md"), folder)
    assert len(first) == 4
    foreign = folder / "cifar10" / "Linf" / "Kang2021Stable.json"
    foreign.write_text(json.dumps(KANG2021))
    hand_made = folder / "cifar10" / "Linf" / "otarena_by_hand.json"
    hand_made.write_text(json.dumps(KANG2021))  # our prefix, but no otarena object: not ours to delete
    build(store.uri, tmp_path, experiments=["golden-lipschitz"], formats="json")
    left = sorted(p.name for p in folder.rglob("*.json"))
    assert left == sorted(["Kang2021Stable.json", "otarena_by_hand.json",
                           f"otarena_hkr_lipschitz_small_{store.runs['hkr'][:8]}.json"])


def test_validate_model_info_reports_problems():
    assert validate_model_info(KANG2021) == []  # a real RobustBench entry
    assert validate_model_info([1]) == ["not a JSON object but list"]
    bad = {k: v for k, v in KANG2021.items() if k != "venue"} | {
        "clean_acc": 93.73, "eps": 0.031, "additional_data": "no", "number_forward_passes": True,
        "autoattack_acc": "171.28", "extra_field": 1, "otarena": []}
    problems = validate_model_info(bad)
    assert "missing field 'venue'" in problems and "unexpected field 'extra_field'" in problems
    for key in ("clean_acc", "eps", "additional_data", "number_forward_passes", "autoattack_acc"):
        assert any(p.startswith(f"field {key!r} is not") for p in problems), key
    assert any("'otarena'" in p for p in problems) and len(problems) == 8
    no_robust = {k: v for k, v in KANG2021.items() if k not in ("autoattack_acc", "external")}
    assert validate_model_info(no_robust) == [
        "no robust accuracy: needs one of autoattack_acc, corruptions_acc, corruptions_acc_3d"]


# ---------------------------------------------------------------------------------------------- LaTeX
def _unescaped(tex: str) -> str:
    """The text left once every escape latex_escape makes is removed."""
    return re.sub(r"\\text(backslash|asciitilde|asciicircum|less|greater|bar)\{\}|\\[&%$#_{}]", "", tex)


@pytest.mark.parametrize("text", [HOSTILE, "\\input{/etc/passwd}", "}\\end{table}\\immediate\\write18{rm -rf /}",
                                  "^^5cinput", "a\nb\r\\par%", "\\\\", "~{}$"])
def test_latex_escape_neutralises(text):
    escaped = latex_escape(text)
    # No special character survives unescaped, no control character at all.
    assert not re.search(r"[\\&%$#_{}~^<>|\x00-\x1f]", _unescaped(escaped))
    assert "\\input" not in escaped.replace("\\textbackslash{}input", "")


def test_latex_layout(store, site):
    tex = site.tex
    assert tex.startswith("% otarena leaderboard: ") and "\\usepackage{booktabs}" in tex.splitlines()[1]
    assert tex.count("\\begin{table}[htbp]") == tex.count("\\end{table}") == len(site.tables) == 2
    for cmd in ("\\toprule", "\\midrule", "\\bottomrule"):
        assert tex.count(cmd) == 2, cmd
    # No row of the Linf table is certified: its Certified column is left out, the L2 one keeps it.
    assert re.findall(r"\\begin\{tabular\}\{(\w+)\}", tex) == ["rlrrrlrlc", "rlrrrrlrc"]
    labels = re.findall(r"\\label\{([^}]*)\}", tex)
    assert labels == ["tab:otarena-cifar10-Linf-8-255", "tab:otarena-digits-L2-0.5"]
    assert "\\caption{otarena leaderboard: cifar10, $\\ell_\\infty$, $\\varepsilon = 8/255$. " in tex
    assert "Rank & Method & Clean & AutoAttack & PGD & Arch & Epochs & Train cost & Flags \\\\" in tex
    assert "Rank & Method & Clean & AutoAttack & PGD & Certified & Arch & Epochs & Flags \\\\" in tex
    assert [c.header for c in columns(TEX)][-1] == "Flags"
    # The Flags cell: the row's mark with the letters of its footnotes (warnings first).
    assert ("1 & trades & 81.0 $\\pm$ 0.5 & 47.0 $\\pm$ 1.2 & 50.0 $\\pm$ 2.0 & preact\\_resnet18 & 10 "
            "& 0.5 h, 180 s/epoch, 2,800 img/s & $\\dagger^{\\mathrm{a,c}}$ \\\\") in tex
    assert "2 & pgd\\_at & 75.00 & 45.00 & 44.00 & preact\\_resnet18 & 10 & – & $\\ast^{\\mathrm{d}}$ \\\\" in tex
    assert "1 & hkr & 75.00 & 45.00 & 47.00 & 38.00 & lipschitz\\_small & 3 &  \\\\" in tex
    assert "$^{\\mathrm{a}}$~$\\dagger$~masking:aa-gap (AutoAttack 12.3 points below PGD-50).\\par" in tex
    assert "$^{\\mathrm{c}}$~small-sample (only 1000 test images).\\par" in tex
    # The hkr table has no flags, so no note under it.
    assert tex.split("\\label{tab:otarena-digits")[1].count("\\footnotesize") == 0


def test_latex_escapes_every_user_string(store, site):
    tex = site.tex
    assert "\\input{" not in tex and "<script>" not in tex and "=cmd|" not in tex
    assert "\\textless{}script\\textgreater{}" in tex and "=cmd\\textbar{}' /C calc'!A0" in tex
    assert ("\\textbackslash{}input\\{/etc/passwd\\} \\} \\{x 100\\% \\$x\\$ \\#1 \\_ \\textasciitilde{} "
            "\\textasciicircum{} \\& ") in tex
    body = "\n".join(line for line in tex.splitlines() if not line.startswith("%"))
    # Braces balance once the escaped ones are gone: no user text can close a group or an argument.
    bare = re.sub(r"\\[{}]", "", body)
    assert bare.count("{") == bare.count("}")
    hostile = to_latex([Table("d}%", "Linf", 0.1, (_row("1", method=HOSTILE, arch="}", dataset="d}%"),))],
                       title="\\input{t}\n\\end{document}")
    assert "\\input{" not in hostile and "\n\\end{document}" not in hostile
    assert "\\label{tab:otarena-d-Linf-0.1}" in hostile


def test_latex_has_one_footnote_per_distinct_note():
    """Three rows trained with one seed share one footnote; a flag with two reasons gets two."""
    one_seed = {"flags": ("single-seed",), "flag_reasons": (("single-seed", "trained with one seed"),)}
    rows = (_row("1", **one_seed), _row("2", **one_seed),
            _row("3", flags=("single-seed", "masking:aa-gap"),
                 flag_reasons=(("single-seed", "trained with one seed"), ("masking:aa-gap", "AA 9 points below PGD"))),
            _row("4", flags=("masking:aa-gap",), flag_reasons=(("masking:aa-gap", "AA 12 points below PGD"),)),
            _row("5"))
    tex = to_latex([Table("cifar10", "Linf", 8 / 255, rows)])
    assert tex.count("single-seed (trained with one seed)") == 1
    notes = [line for line in tex.splitlines() if line.startswith("$^{")]
    assert notes == ["$^{\\mathrm{a}}$~$\\dagger$~masking:aa-gap (AA 9 points below PGD).\\par",
                     "$^{\\mathrm{b}}$~$\\dagger$~masking:aa-gap (AA 12 points below PGD).\\par",
                     "$^{\\mathrm{c}}$~single-seed (trained with one seed).\\par"]
    flags = [line.rsplit("&", 1)[1].strip() for line in tex.splitlines() if re.match(r"\d & ", line)]
    assert flags == ["$\\ast^{\\mathrm{c}}$ \\\\", "$\\ast^{\\mathrm{c}}$ \\\\",
                     "$\\dagger^{\\mathrm{a,c}}$ \\\\", "$\\dagger^{\\mathrm{b}}$ \\\\", "\\\\"]


def test_latex_explains_a_certified_accuracy_far_below_autoattack():
    hkr = replace(_row("1", method="hkr", norm="L2"), eps=0.3, aa_acc=0.85, certified_acc=0.035)
    tex = to_latex([Table("digits", "L2", 0.3, (hkr,))])
    assert "Certified accuracy far below AutoAttack (row 1)" in tex and "sqrt(2) x eps = 0.424 here" in tex
    close = replace(hkr, aa_acc=0.45, certified_acc=0.38)
    assert "far below" not in to_latex([Table("digits", "L2", 0.3, (close,))])


def test_latex_empty_and_unique_labels():
    tex = to_latex([])
    assert EMPTY_MESSAGE in tex and "\\begin{table}" not in tex
    tables = [Table("a b", "Linf", 0.1, (_row("1"),)), Table("a_b", "Linf", 0.1, (_row("2"),))]
    assert re.findall(r"\\label\{([^}]*)\}", to_latex(tables)) == ["tab:otarena-ab-Linf-0.1",
                                                                 "tab:otarena-ab-Linf-0.1-2"]


def test_latex_compiles(site, tmp_path):
    if shutil.which("pdflatex") is None:
        pytest.fail("pdflatex is missing: run scripts/ensure-test-tools.sh (make test does)")
    (tmp_path / "board.tex").write_text(site.tex, encoding="utf-8")
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\usepackage{booktabs}\n\\begin{document}\n"
                                      "\\input{board.tex}\n\\end{document}\n")
    proc = subprocess.run(["pdflatex", "-no-shell-escape", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    log = (tmp_path / "doc.log").read_text(errors="replace")
    assert "(./board.tex" in log and "(/etc/passwd" not in log  # the hostile \\input was printed, not read


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_writes_exactly_the_formats_asked(store, tmp_path, capsys):
    out = tmp_path / "site"
    rc = main(["leaderboard", "--tracking-uri", store.uri, "--out", str(out), "--format", "md,tex", "--title", "T",
               "--mlflow-url", "https://ui.example/mlflow/"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["leaderboard.md", "leaderboard.tex"]
    assert (out / "leaderboard.md").read_text().startswith("# T\n")
    assert "\\caption{T: cifar10" in (out / "leaderboard.tex").read_text()
    run = store.runs["trades"]
    assert f"](https://ui.example/mlflow/#/experiments/{store.experiments['golden-cifar']}/runs/{run})" in (
        out / "leaderboard.md").read_text()
    printed = capsys.readouterr().out
    assert f"wrote {out / 'leaderboard.md'}" in printed and f"wrote {out / 'leaderboard.tex'}" in printed


def test_cli_json_and_experiment_filter(store, tmp_path, capsys):
    out = tmp_path / "site"
    rc = main(["leaderboard", "--tracking-uri", store.uri, "--out", str(out), "--format", "json,csv",
               "--experiment", "golden-cifar", "--filter", "tags.`otarena.method` != 'trades'"])
    assert rc == 0 and sorted(p.name for p in out.iterdir()) == ["leaderboard.csv", "model_info"]
    assert len(list((out / "model_info").rglob("*.json"))) == 2  # pgd_at and the hostile row
    assert "(2 model_info JSON files)" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["md,pdf", "", "md,,HTML"])
def test_cli_bad_format_is_one_line_exit_2(store, tmp_path, capsys, fmt):
    rc = main(["leaderboard", "--tracking-uri", store.uri, "--out", str(tmp_path / "site"), "--format", fmt])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("otarena: error: unknown leaderboard format")
    assert not (tmp_path / "site").exists()


def test_cli_filter_that_matches_nothing_keeps_the_site(store, tmp_path, capsys):
    out = tmp_path / "site"
    args = ["leaderboard", "--tracking-uri", store.uri, "--out", str(out), "--format", "md,json"]
    assert main(args) == 0
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file())
    capsys.readouterr()
    typo = ["--filter", "tags.`otarena.method` = 'trade'"]
    assert main(args + typo) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matches no trial run" in err and "--allow-empty" in err
    assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    assert main(args + typo + ["--allow-empty"]) == 0
    assert EMPTY_MESSAGE in (out / "leaderboard.md").read_text()


def test_cli_empty_leaderboard(store, tmp_path, capsys):
    assert main(["leaderboard", "--tracking-uri", store.uri, "--out", str(tmp_path / "s"), "--format", "tex,json",
                 "--experiment", "golden-empty"]) == 0
    assert EMPTY_MESSAGE in (tmp_path / "s" / "leaderboard.tex").read_text()
    assert "(0 model_info JSON files)" in capsys.readouterr().out

