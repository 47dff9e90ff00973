# SPDX-License-Identifier: Apache-2.0
"""Golden files: the Markdown, CSV and LaTeX of a small fixed store, byte for byte.

The store (:func:`make_store`) holds two threat models and the cases each format must get right:

* cifar10 / Linf / 8/255: a trades configuration confirmed on 3 seeds (mean ± std, CIs) with a
  warning and a note that carry reasons, and a sibling trial with a better *test* AA that must not
  be chosen; a pgd_at trial whose PGD beats AutoAttack; and a run whose method, arch, run name,
  hyperparameter and flag reason are hostile (HTML, Markdown, LaTeX and spreadsheet injections);
* digits / L2 / 0.5: a certified (Lipschitz) row.

MLflow draws run ids at random and numbers experiments as it likes, so both are replaced by stable
names before comparing. To accept a deliberate change of output, regenerate the files with
``OTARENA_UPDATE_GOLDEN=1 pytest tests/leaderboard/test_golden.py`` and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param

from otarena.leaderboard import build

GOLDEN = Path(__file__).parent / "golden"
FORMATS = {"md": "leaderboard.md", "csv": "leaderboard.csv", "tex": "leaderboard.tex"}
MLFLOW_URL = "http://mlflow.example:5000"
HOSTILE = "<script>alert(1)</script> a|b \\input{/etc/passwd} } {x 100% $x$ #1 _ ~ ^ & =cmd|' /C calc'!A0"
"""A flag reason and hyperparameter value that is markup in every output format at once."""
HOSTILE_METHOD = "=cmd|' /C calc'!A0"
HOSTILE_ARCH = "<script>alert(1)</script>"
HOSTILE_RUN_NAME = "\\input{/etc/passwd}"


def _search(c, exp, method, *, dataset="cifar10", norm="Linf", eps=repr(8 / 255), arch="preact_resnet18",
            cost=(4, 40), paper=None):
    tags = {"otarena.role": "search", "otarena.method": method, "otarena.dataset": dataset,
            "otarena.arch": arch, "otarena.norm": norm, "otarena.eps": eps}
    if paper:
        tags |= {"otarena.paper": paper[0], "otarena.paper_link": paper[1]}
    run_id = c.create_run(exp, tags=tags, run_name=f"{method}-search").info.run_id
    _log(c, run_id, {}, {"search/n_trials": cost[0], "search/trial_epochs": cost[1], "search/device_hours": 0.25})
    return SimpleNamespace(exp=exp, id=run_id, tags=tags)


def _trial(c, parent, name, *, val, aa, clean, pgd, params, n_ex=10_000, epochs=10, flags=(), reasons=None,
           metrics=None):
    tags = {**parent.tags, "otarena.role": "trial", "mlflow.parentRunId": parent.id, "otarena.trial_id": name,
            "otarena.outcome": "completed", "otarena.evaluated": "true", "otarena.searched": ",".join(params),
            "otarena.flags": ",".join(flags)}
    if reasons:
        tags["otarena.flag_reasons"] = json.dumps(reasons)
    run_id = c.create_run(parent.exp, tags=tags, run_name=name).info.run_id
    _log(c, run_id, params, {"val/best_pgd_acc": val, "val/best_clean_acc": 0.8, "train/epochs": epochs,
                             "test/aa_acc": aa, "test/clean_acc": clean, "test/pgd_acc": pgd, "test/n_ex": n_ex,
                             **(metrics or {})})
    return run_id


def _log(c, run_id, params, metrics):
    """Log in one batch and finish the run (one call per value would double the store's build time)."""
    c.log_batch(run_id, metrics=[Metric(k, v, 0, 0) for k, v in metrics.items()],
                params=[Param(k, v) for k, v in params.items()])
    c.set_terminated(run_id, "FINISHED")


_STORES: dict[str, SimpleNamespace] = {}


def golden_store(tmp_path_factory) -> SimpleNamespace:
    """:func:`make_store`, built once per session: creating an MLflow sqlite database takes seconds.

    The tests only read it, so test_latex_and_model_info.py shares it.
    """
    if "golden" not in _STORES:
        _STORES["golden"] = make_store(tmp_path_factory.mktemp("golden-store"))
    return _STORES["golden"]


def make_store(folder: Path) -> SimpleNamespace:
    """The golden store: ``uri``, ``runs`` ({label: run id}) and ``experiments`` ({name: id}).

    The experiment ``golden-empty`` has no runs: selecting only it gives an empty leaderboard.
    """
    uri = f"sqlite:///{folder}/mlflow.db"
    c = MlflowClient(uri)
    cifar, lip = c.create_experiment("golden-cifar"), c.create_experiment("golden-lipschitz")
    c.create_experiment("golden-empty")
    runs = {}

    p = _search(c, cifar, "trades", paper=("Theoretically Principled Trade-off between Robustness and Accuracy",
                                           "https://arxiv.org/abs/1901.08573"))
    runs["trades"] = _trial(
        c, p, "trades-3-seeds", val=0.6, aa=0.40, clean=0.80, pgd=0.45, n_ex=1000,
        params={"lr": "0.1", "trades_beta": "6.0"}, flags=("small-sample", "masking:aa-gap"),
        reasons={"small-sample": "only 1000 test images", "masking:aa-gap": "AutoAttack 12.3 points below PGD-50"},
        metrics={"test/n_seeds": 3, "test/clean_acc_mean": 0.81, "test/clean_acc_std": 0.005,
                 "test/pgd_acc_mean": 0.50, "test/pgd_acc_std": 0.02, "test/aa_acc_mean": 0.47,
                 "test/aa_acc_std": 0.012, "test/aa_acc_ci_low": 0.412, "test/aa_acc_ci_high": 0.503,
                 "test/clean_acc_ci_low": 0.77, "test/clean_acc_ci_high": 0.83,
                 "cost/train_device_hours": 0.5, "cost/epoch_device_s": 180.0, "cost/images_per_s": 2800.0})
    # Better on test, worse on validation: never the trades row.
    runs["trades-test-best"] = _trial(c, p, "trades-test-best", val=0.5, aa=0.60, clean=0.85, pgd=0.62,
                                      params={"lr": "0.01", "trades_beta": "1.0"})

    p = _search(c, cifar, "pgd_at", cost=(2, 20))
    runs["pgd_at"] = _trial(c, p, "pgd-at-1", val=0.55, aa=0.45, clean=0.75, pgd=0.44,
                            params={"lr": "0.0031622776601683794"}, flags=("single-seed",),
                            reasons={"single-seed": "trained with one seed"})

    p = _search(c, cifar, HOSTILE_METHOD, arch=HOSTILE_ARCH, cost=(1, 10))
    runs["hostile"] = _trial(c, p, HOSTILE_RUN_NAME, val=0.5, aa=0.30, clean=0.70, pgd=0.33,
                             params={"note": HOSTILE, "lr": "0.05"}, flags=("aa-check:randomized",),
                             reasons={"aa-check:randomized": HOSTILE})

    p = _search(c, lip, "hkr", dataset="digits", norm="L2", eps="0.5", arch="lipschitz_small", cost=(3, 9))
    runs["hkr"] = _trial(c, p, "hkr-1", val=0.4, aa=0.45, clean=0.75, pgd=0.47, n_ex=360, epochs=3,
                         params={"hkr_alpha": "0.99"}, metrics={"test/certified_acc": 0.38})
    return SimpleNamespace(uri=uri, runs=runs, experiments={"golden-cifar": cifar, "golden-lipschitz": lip})


def normalise(text: str, store: SimpleNamespace) -> str:
    """Replace the ids MLflow chose by ``@run:label@`` and ``@experiment:name@``."""
    for label, run_id in store.runs.items():
        text = text.replace(run_id, f"@run:{label}@")
    for name, exp_id in store.experiments.items():
        text = text.replace(f"/experiments/{exp_id}/runs/", f"/experiments/@experiment:{name}@/runs/")
        text = re.sub(rf"(?m),{exp_id}$", f",@experiment:{name}@", text)  # the CSV's last column
    return text


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    store = golden_store(tmp_path_factory)
    out = tmp_path_factory.mktemp("golden-site")
    build(store.uri, out, formats=",".join(FORMATS), title="Golden | <b>leaderboard</b> \\& 100%",
          mlflow_url=MLFLOW_URL)
    return {fmt: normalise((out / name).read_text(encoding="utf-8"), store) for fmt, name in FORMATS.items()}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_matches_golden_file(rendered, fmt):
    path = GOLDEN / FORMATS[fmt]
    if os.environ.get("OTARENA_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(rendered[fmt], encoding="utf-8", newline="")
    assert path.exists(), f"{path} is missing: run with OTARENA_UPDATE_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert rendered[fmt] == expected, (
        f"{fmt} output differs from {path}; if the change is intended, rerun with OTARENA_UPDATE_GOLDEN=1 "
        "and review the diff")


def test_no_raw_ids_or_markup_left(rendered):
    """The goldens hold no random ids, and the hostile text is inert in each format."""
    for fmt, text in rendered.items():
        assert not re.search(r"\b[0-9a-f]{32}\b", text), fmt
        assert "\x1b" not in text
    assert "<script>" not in rendered["md"] and "<b>" not in rendered["md"]
    assert "\\input{" not in rendered["tex"] and "<script>" in rendered["csv"]  # CSV is data, not markup
    assert ",'=cmd|' /C calc'!A0," in rendered["csv"]  # a spreadsheet shows it, never evaluates it
