# SPDX-License-Identifier: Apache-2.0
"""Robust overfitting (Rice et al., ICML 2020) and catastrophic overfitting (Wong et al., ICLR 2020): the numbers
the training loop logs per epoch, and the notes a trial's validation curve earns (docs/mlflow-schema.md)."""
from __future__ import annotations

import pytest

from otarena import methods
from otarena.leaderboard.columns import columns
from otarena.leaderboard.render import to_markdown
from otarena.leaderboard.schema import Row, Table, is_warning
from otarena.methods.common.data import load
from otarena.search.config import FlagThresholds
from otarena.search.evaluation import curve_end, overfitting_reasons

PGD_CURVE = [0.20, 0.35, 0.41, 0.38, 0.36]
"""Validation PGD accuracy per epoch: best at epoch 3, then 5 points lost by the last epoch."""


def _last_result(pgd_curve: list[float], fgsm_curve: list[float] | None = None) -> dict:
    """The last epoch's result of a curve, as ``methods.common.train.fit`` reports it."""
    result = {"val/pgd_acc": pgd_curve[-1], "val/overfit_gap": max(pgd_curve) - pgd_curve[-1]}
    return result | ({"val/fgsm_acc": fgsm_curve[-1]} if fgsm_curve else {})


def test_robust_overfitting_is_a_note_above_a_configurable_threshold():
    end = curve_end(_last_result(PGD_CURVE))
    assert end == pytest.approx({"val/last_pgd_acc": 0.36, "val/overfit_gap": 0.05})
    reasons = overfitting_reasons(end, FlagThresholds())   # default: 3 points
    assert list(reasons) == ["robust-overfitting"] and "fell 5.0%" in reasons["robust-overfitting"]
    assert overfitting_reasons(end, FlagThresholds(robust_overfitting=0.06)) == {}
    assert overfitting_reasons(curve_end(_last_result([0.20, 0.41, 0.39])), FlagThresholds()) == {}
    assert not is_warning("robust-overfitting")   # a note: the best epoch is what is scored

    row = Row(run_id="r", experiment_id="0", dataset="digits", norm="Linf", eps=0.2, method="pgd_at",
              arch="small_cnn", aa_acc=0.3, clean_acc=0.8, overfit_gap=end["val/overfit_gap"],
              flags=tuple(reasons), flag_reasons=tuple(reasons.items()))
    assert row.notes == ("robust-overfitting",) and row.warnings == ()
    assert "overfit_gap" in [c.name for c in columns("md", [row])]
    assert "| 5.00 |" in to_markdown([Table("digits", "Linf", 0.2, (row,))])


def test_catastrophic_overfitting_when_fgsm_accuracy_far_exceeds_pgd():
    """FastAT's failure: FGSM accuracy climbs while PGD accuracy collapses to zero within an epoch."""
    pgd, fgsm = [0.30, 0.38, 0.02], [0.45, 0.52, 0.91]
    reasons = overfitting_reasons(curve_end(_last_result(pgd, fgsm)), FlagThresholds())
    assert set(reasons) == {"robust-overfitting", "catastrophic-overfitting"}
    assert "FGSM accuracy 91.0% is 89.0% above PGD's 2.0%" in reasons["catastrophic-overfitting"]
    assert not is_warning("catastrophic-overfitting")
    healthy = curve_end(_last_result([0.30, 0.38, 0.40], [0.45, 0.50, 0.52]))
    assert overfitting_reasons(healthy, FlagThresholds()) == {}


def test_fit_logs_the_gap_and_fgsm_accuracy_of_single_step_training():
    """PGD-AT with one attack step (FGSM-based training) validates FGSM beside PGD every epoch; with more
    steps it does not. Langevin is single-step at T = 1."""
    train, val = load("digits", "train").subset(128), load("digits", "val")
    settings = {"epochs": 2, "batch_size": 64, "val_n_ex": 32, "val_pgd_steps": 2, "seed": 0}

    def history(method: str, **changes) -> list[dict]:
        run = methods.build_run(method, settings | changes, dataset="digits", arch="small_cnn",
                                threat=methods.ThreatModel("Linf", 0.2), device="cpu", train=train, val=val)
        seen = []
        methods.fit(run, lambda metrics, run: seen.append(dict(metrics, best=run.best["val/pgd_acc"])))
        assert run.method.single_step == ("val/fgsm_acc" in seen[0])
        return seen

    single = history("pgd_at", attack_steps=1)
    assert all(0 <= m["val/fgsm_acc"] <= 1 for m in single)
    for m in single:
        assert m["val/overfit_gap"] == pytest.approx(m["best"] - m["val/pgd_acc"]) and m["val/overfit_gap"] >= 0
    assert "val/fgsm_acc" not in history("pgd_at", attack_steps=2, epochs=1)[0]
    assert "val/fgsm_acc" in history("langevin", epochs=1, langevin_t=1)[0]
