# SPDX-License-Identifier: Apache-2.0
"""otarena reproduce: a tiny table trained and measured end to end on CPU, its verdicts, and the refusals."""
import json
import textwrap

import pytest

from otarena.search import cli, reproduce

TINY = textwrap.dedent("""\
    paper: {seed: 900_abc.txt, title: A tiny table, citation: "Tests, a tiny table", source: tests/search/test_reproduce.py}
    shared:
      net: &net {dataset: mnist, norm: linf, eps: 0.3, architecture: Standard CNN, arch: cw_mnist, method: pgd_at}
      train: &train {epochs: 1, optimizer: adam, lr: 0.001, batch_size: 32, attack: PGD, attack_steps: 2,
                     attack_step_size: 0.15, attack_eps: 0.3}
    claims:
      - {<<: *net, table: Table 1, row: PGD-AT, column: Nat, training: *train, metric: {name: clean}, value: 99}
      - {<<: *net, table: Table 1, row: PGD-AT, column: FGSM, training: *train, metric: {name: fgsm}, value: 90}
      - {<<: *net, table: Table 1, row: PGD-AT, column: PGD, training: *train,
         metric: {name: pgd, steps: 3, restarts: 1, step_size: 0.1, labels: predicted}, value: 95}
      - {<<: *net, table: Table 1, row: PGD-AT, column: "0.6", eps: 0.6, training: *train,
         metric: {name: pgd, steps: 3, labels: predicted}, value: 80}
      - {<<: *net, table: Table 1, row: PGD-AT, column: AA, training: *train,
         metric: {name: autoattack, version: standard}, value: 91}
      - {<<: *net, table: Table 1, row: Other net, column: AA, arch: null, architecture: WRN-70-16,
         training: *train, metric: {name: autoattack, version: standard}, value: 60}
      - {<<: *net, table: Table 1, row: Relative, column: AA, training: *train,
         metric: {name: autoattack, version: standard}, value: 1.9, relative_to: TRADES}
    """)


@pytest.fixture
def tiny(tmp_path):
    folder = tmp_path / "claims"
    folder.mkdir()
    (folder / "900_tiny.yaml").write_text(TINY)
    return folder


def test_a_tiny_reproduction_runs_end_to_end_and_writes_the_table(tiny, tmp_path, capsys):
    import mlflow

    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["reproduce", "900:Table 1", "--dir", str(tiny), "--train-n", "64", "--test-n", "32",
                     "--no-autoattack", "--out", str(out), "--tracking-uri", uri, "--threads", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "900-table1-custom.json").read_text())
    text = (out / "900-table1-custom.md").read_text()
    rows = {r["column"] if r["row"] == "PGD-AT" else r["row"]: r for r in table["rows"]}
    for column in ("Nat", "FGSM", "PGD"):
        row = rows[column]
        low, high = row["ci95"]
        assert row["n"] == 32 and low <= row["measured"] <= high
        assert row["difference"] == pytest.approx(row["measured"] - row["claimed"], abs=0.01)
        assert row["verdict"] == ("reproduced" if low <= row["claimed"] <= high else
                                  "below claim" if high < row["claimed"] else "above claim")
    assert "predicted labels" in rows["PGD"]["measured_how"]
    # 80% at eps 0.6: the grey image lies in every ball; otarena's grey-image candidate measured it.
    grey = rows["0.6"]
    assert grey["verdict"] == "impossible" and "grey image" in grey["why"]
    assert grey["otarena"]["value"] is not None and grey["otarena"]["value"] < grey["claimed"]
    assert rows["AA"]["verdict"] == "not comparable" and "AutoAttack" in rows["AA"]["why"]
    assert rows["Other net"]["verdict"] == "not comparable" and "WRN-70-16" in rows["Other net"]["why"]
    assert rows["Relative"]["verdict"] == "not comparable" and "relative" in rows["Relative"]["why"]
    assert "the first 64 training images" in text and "the first 32 test images" in text
    assert "| Claimed | Measured [95% CI] |" in text and "impossible" in text
    # One MLflow run for the model, in reproduce-900, with its deviations and both evaluations.
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("reproduce-900")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.run_id == table["models"][0]["mlflow_run_id"]
    deviations = json.loads(run.data.tags[reproduce.DEVIATIONS_TAG])
    assert "training images: the first 64 (reduced budget)" in deviations
    assert table["models"][0]["flags"] and "otarena flags it `small-sample`" in text
    assert "test/clean_acc" in run.data.metrics and any(k.startswith("paper/") for k in run.data.metrics)


TUNED = textwrap.dedent("""\
    paper: {seed: 901_abc.txt, title: A tuned table, citation: "Tests, a tuned table", source: tests/search/test_reproduce.py}
    claims:
      - {table: Table 1, row: PGD-AT, column: Nat, dataset: mnist, norm: linf, eps: 0.3, architecture: Standard CNN,
         arch: cw_mnist, method: pgd_at, metric: {name: clean}, value: 99,
         training: {epochs: 1, optimizer: adam, lr: 0.001, batch_size: 32, attack_steps: 1, attack_eps: 0.3}}
    """)


def test_tuned_adds_an_otarena_search_as_a_second_row(ray_local, tmp_path, capsys):
    import mlflow

    from otarena.leaderboard import tags as tag

    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "901_tuned.yaml").write_text(TUNED)
    out, uri = tmp_path / "out", f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = cli.main(["reproduce", "901:1", "--dir", str(tmp_path / "claims"), "--train-n", "32", "--test-n", "16",
                     "--no-autoattack", "--tuned", "2", "--storage", str(tmp_path / "ray"), "--out", str(out),
                     "--tracking-uri", uri, "--threads", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    table = json.loads((out / "901-table1-custom.json").read_text())
    paper, tuned = table["rows"]
    assert (paper["setting"], tuned["setting"]) == ("paper", "tuned") and tuned["key"] == paper["key"]
    assert tuned["n"] == 16 and tuned["verdict"] in reproduce.VERDICTS
    assert "PGD-AT, otarena-tuned" in (out / "901-table1-custom.md").read_text()
    searched = table["models"][1]
    assert searched["setting"] == "tuned" and searched["hparams"]["attack_steps"] == 1
    assert any("otarena search of 2 trials" in d for d in searched["deviations"])
    # The tuned row's numbers are its best trial's final evaluation, under its search's parent run.
    client = mlflow.MlflowClient(uri)
    run = client.get_run(searched["mlflow_run_id"])
    assert run.data.tags[tag.ROLE] == "trial" and run.data.tags[reproduce.SETTING_TAG] == "tuned"
    assert run.data.metrics["test/clean_acc"] == pytest.approx(tuned["otarena"]["value"] / 100)
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags[tag.EVALUATED] == "true" and parent.data.metrics["search/n_trials"] == 2


def test_tuned_needs_mlflow(capsys):
    assert cli.main(["reproduce", "003:Table 1", "--tuned", "--no-mlflow"]) == 2
    assert "drop --no-mlflow" in capsys.readouterr().err


def test_the_claim_above_the_grey_bound_is_impossible_only_at_half_and_more():
    from otarena.leaderboard.claims import Claim

    base = dict(paper="900_abc.txt", citation="c", source="s", table="T", row="r", dataset="mnist", norm="linf",
                architecture="a", arch="cw_mnist", method="pgd_at", metric={"name": "pgd", "steps": 40})
    claim = Claim.model_validate({**base, "eps": 0.4, "value": 80})
    assert reproduce.verdict(claim, reproduce.Count(160, 200))[0] == "reproduced"
    assert reproduce.verdict(claim, reproduce.Count(100, 200))[0] == "below claim"
    assert reproduce.verdict(claim, reproduce.Count(199, 200))[0] == "above claim"
    assert reproduce.verdict(claim, None, impossible="grey")[0] == "impossible"


@pytest.mark.parametrize("claim_set", ["003:Table 9", "nonsense", "999:1", "003"])
def test_an_unknown_claim_set_is_refused_in_one_line(claim_set, capsys):
    assert cli.main(["reproduce", claim_set, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unknown claim set" in err and "003:Table 6" in err
