# SPDX-License-Identifier: Apache-2.0
"""The site's "Do the papers' numbers hold?" section, read back from reproduction runs in a real MLflow store."""
import json
import shutil
from pathlib import Path

import mlflow

from otarena import leaderboard
from otarena.leaderboard import tags as tag

COMMITTED = Path(__file__).parents[2] / "reproductions" / "003-table6-reduced.json"


def _reproduction_run(client, experiment_id, artifact: Path, claim_set: str, budget: str) -> str:
    run = client.create_run(experiment_id, tags={tag.ROLE: "evaluation", tag.REPRODUCES: claim_set,
                                                 tag.REPRODUCTION_BUDGET: budget})
    client.log_artifact(run.info.run_id, str(artifact), "reproduction")
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_the_site_shows_each_reproduction_table_once_with_its_verdicts(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("reproduce-003", artifact_location=str(tmp_path / "artifacts"))
    table = json.loads(COMMITTED.read_text())
    # Two models of one table carry the same file; an older measurement of it is superseded.
    older = tmp_path / "older" / COMMITTED.name
    older.parent.mkdir()
    older.write_text(json.dumps({**table, "rows": table["rows"][:1]}))
    _reproduction_run(client, experiment, older, "003:Table 6", "reduced")
    for _ in range(2):
        _reproduction_run(client, experiment, COMMITTED, "003:Table 6", "reduced")
    # A run whose artifact is not a reproduction table is left out, not guessed.
    junk = tmp_path / "junk" / "x.json"
    junk.parent.mkdir()
    junk.write_text("{}")
    _reproduction_run(client, experiment, junk, "003:Table 1", "reduced")

    leaderboard.build(uri, tmp_path / "site", formats="html")
    page = (tmp_path / "site" / "index.html").read_text()
    section = page[page.index('<section id="reproductions"'):]
    assert "Do the papers' numbers hold?" in section and section.count("<h3 ") == 1
    assert "003:Table 6 (reduced budget)" in section and "003:Table 1" not in section
    assert section.count("<tr><td>") == len(table["rows"])
    for verdict in {r["verdict"] for r in table["rows"]}:
        assert f">{verdict}</span>" in section
    first = table["rows"][0]
    assert f"{first['measured']:.2f} [{first['ci95'][0]:.2f}, {first['ci95'][1]:.2f}]" in section
    assert "the first 100 test images" in section  # the reductions are stated
    assert '<p class="empty">' in page and '<a href="#reproductions">' in page  # no board, yet a way to the section


def test_a_store_without_reproductions_has_no_section(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    leaderboard.build(uri, tmp_path / "site", formats="html")
    assert 'id="reproductions"' not in (tmp_path / "site" / "index.html").read_text()
    shutil.rmtree(tmp_path / "site")


def test_committed_tables_join_the_site_and_a_folder_without_any_is_refused(tmp_path, capsys):
    from otarena.search import cli

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).create_experiment("empty", artifact_location=str(tmp_path / "artifacts"))
    site = tmp_path / "site"
    assert cli.main(["leaderboard", "--tracking-uri", uri, "--out", str(site), "--format", "html",
                     "--reproductions", str(COMMITTED.parent)]) == 0
    page = (site / "index.html").read_text()
    committed = sorted(COMMITTED.parent.glob("*.json"))
    assert page.count('<h3 id="reproduction-') == len(committed) >= 3
    assert "004:Table 1 (reduced budget)" in page
    capsys.readouterr()
    (tmp_path / "none").mkdir()
    for folder in (tmp_path / "none", tmp_path / "missing"):
        assert cli.main(["leaderboard", "--tracking-uri", uri, "--out", str(tmp_path / "other"),
                         "--reproductions", str(folder)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "reproductions folder" in err
    assert not (tmp_path / "other").exists()  # refused before anything was written
