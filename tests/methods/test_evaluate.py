# SPDX-License-Identifier: Apache-2.0
"""evaluate(): any classifier on [0, 1] inputs, with confidence intervals and automatic flags.

Real models only: a PGD-AT SmallCNN trained here on digits must pass without a masking flag, and
the same net behind a non-differentiable input quantization, or with logits scaled by 1e4, must be
caught.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from otarena import methods
from otarena.methods.common import evaluate as stages
from otarena.methods.common import nets
from otarena.methods.common.attacks import fgsm
from otarena.methods.common.evaluate import (EvalSettings, Stage, StageInput, Thresholds, confidence_interval, eps_sweep,
                                     flags_for, share, sweep_radii)

LINF = methods.ThreatModel("Linf", 0.2)


@pytest.fixture(scope="module")
def digits_test():
    return methods.data.load("digits", "test")


@pytest.fixture(scope="module")
def pgd_at_model(honest_digits_model):
    """PGD-AT on digits with the demo's settings: a normally trained robust model."""
    return honest_digits_model(LINF.eps)


class Quantized(nn.Module):
    """Input quantization by rounding: its gradient is zero almost everywhere (gradient masking)."""

    def __init__(self, model: nn.Module, levels: int = 4):
        super().__init__()
        self.model, self.levels = model, levels

    def forward(self, x):
        return self.model(torch.round(x * self.levels) / self.levels)


class Scaled(nn.Module):
    """Logits times 1e4: cross-entropy saturates, so its gradients vanish on confident points."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x) * 1e4


def _random_model(arch="small_cnn"):
    torch.manual_seed(0)
    return nets.build(arch, in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,)).eval()


MODEL_FLAGS = ("masking:", "aa-check:", "unsound-certificate")


def _model_flags(result):
    return [f for f in result["flags"] if f.startswith(MODEL_FLAGS)]


def test_pgd_at_model_passes_without_masking_flags(pgd_at_model, digits_test):
    result = methods.evaluate(pgd_at_model, digits_test, LINF, n_ex=200)
    assert _model_flags(result) == [], result["flag_reasons"]
    # The only flag left is the statistical note: digits' test split has 360 images.
    assert result["flags"] == ["small-sample"]
    assert result["aa_acc"] <= result["pgd_acc"] <= result["clean_acc"]
    assert result["pgd_acc"] - result["aa_acc"] <= 0.05
    per_attack = list(result["aa_per_attack"].values())
    assert list(result["aa_per_attack"]) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert per_attack == sorted(per_attack, reverse=True) and per_attack[-1] == result["aa_acc"]
    low, high = result["ci95"]["aa_acc"]
    assert low < result["aa_acc"] < high
    sweep = result["eps_sweep"]
    assert sweep["eps"][0] == 0 and sweep["pgd_acc"][0] == result["clean_acc"]
    assert sweep["pgd_acc"][-1] <= sweep["chance_bound"]


def test_quantized_input_model_is_flagged(pgd_at_model, digits_test):
    result = methods.evaluate(Quantized(pgd_at_model), digits_test, LINF, n_ex=60)
    flags = set(result["flags"])
    assert {"masking:aa-gap", "masking:eps-plateau", "masking:blackbox", "masking:zero-gradient"} <= flags
    assert "Square" in result["flag_reasons"]["masking:blackbox"]
    # The gradient-free candidate still takes it to chance: the curves differ, which is the tell.
    sweep = result["eps_sweep"]
    assert sweep["robust_acc"][-1] <= sweep["chance_bound"] < sweep["pgd_acc"][-1]


def test_logit_scaled_model_is_flagged(pgd_at_model, digits_test):
    result = methods.evaluate(Scaled(pgd_at_model), digits_test, LINF, n_ex=60,
                              attacks=("clean", "pgd", "eps-sweep"))
    assert "masking:eps-plateau" in result["flags"]
    assert "where no classifier beats" in result["flag_reasons"]["masking:eps-plateau"]


@pytest.mark.parametrize("norm,eps", [("Linf", 0.2), ("L2", 1.0)])
def test_eps_sweep_reaches_chance_for_any_model(pgd_at_model, digits_test, norm, eps):
    x, y = digits_test.x[:120], digits_test.y[:120]
    threat = methods.ThreatModel(norm, eps)
    for model in (pgd_at_model, Quantized(pgd_at_model), _random_model()):
        sweep = eps_sweep(model, x, y, threat, steps=5)
        assert sweep["eps"] == sweep_radii(threat, x)
        assert sweep["eps"][0] == 0 and eps in sweep["eps"]
        assert sweep["robust_acc"][-1] <= sweep["chance_bound"] + 1e-9
        assert all(r <= p + 1e-9 for r, p in zip(sweep["robust_acc"], sweep["pgd_acc"]))


def test_sweep_radii():
    x = torch.zeros(4, 1, 8, 8)
    assert sweep_radii(methods.ThreatModel("Linf", 0.3), x) == [0.0, 0.15, 0.3, 0.5, 0.6]
    assert sweep_radii(methods.ThreatModel("Linf", 8 / 255), x)[-1] == 0.5
    assert sweep_radii(methods.ThreatModel("L2", 0.5), x) == [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]


def test_confidence_interval_shrinks_with_n_ex(pgd_at_model, digits_test):
    widths = []
    for n in (40, 120, 360):
        result = methods.evaluate(pgd_at_model, digits_test, LINF, ("clean",), n_ex=n)
        low, high = result["ci95"]["clean_acc"]
        assert low <= result["clean_acc"] <= high
        widths.append(high - low)
    assert widths[0] > widths[1] > widths[2]
    low, high = confidence_interval(0.5, 100)
    assert abs(low - 0.4038) < 1e-3 and abs(high - 0.5962) < 1e-3
    assert confidence_interval(1.0, 10)[1] == 1.0 and confidence_interval(0.0, 10)[0] == 0.0


def test_flags_follow_their_thresholds():
    result = {"n_ex": 5000, "pgd_acc": 0.50, "aa_acc": 0.42, "settings": {"pgd_steps": 50},
              "pgd_steps_check": {"PGD-10": 0.40, "PGD-50": 0.45},
              "eps_sweep": {"eps": [0, 0.1, 0.2], "pgd_acc": [0.9, 0.5, 0.56], "chance_bound": 0.5},
              "aa_blackbox_only": 0.02}
    flags = flags_for(result)
    assert set(flags) == {"masking:aa-gap", "masking:steps", "masking:eps-plateau", "masking:blackbox"}
    assert flags["masking:aa-gap"] == "AutoAttack 8.0 points below PGD-50 (95% interval 7.3 to 8.8)"
    assert "rises" in flags["masking:eps-plateau"]
    assert flags_for(result, Thresholds(aa_gap=0.1, steps=0.1, plateau=0.5, rise=0.1, blackbox=0.05)) == {}
    assert "small-sample" in flags_for({"n_ex": 999})
    # Accuracies are counts over n_ex: a gap of exactly the threshold is not more than it, whatever the rounding
    # (and the aa-gap's lower 95% bound must exceed it too: test_checks.py).
    assert flags_for({"n_ex": 10 ** 6, "pgd_acc": 132 / 200, "aa_acc": 122 / 200}) == {}
    assert "masking:aa-gap" in flags_for({"n_ex": 10 ** 6, "pgd_acc": 134 / 200, "aa_acc": 122 / 200})
    # So are the other differences (0.415 - 0.4 and 0.52 - 0.5 exceed 0.015 and 0.02 in floats).
    at_thresholds = {"n_ex": 1000, "pgd_steps_check": {"PGD-10": 0.4, "PGD-50": 0.415},
                     "eps_sweep": {"eps": [0, 0.1, 0.2], "pgd_acc": [0.9, 0.5, 0.52], "chance_bound": 0.42}}
    assert flags_for(at_thresholds) == {}
    assert set(flags_for({"n_ex": 1000, "aa_blackbox_only": 0.01})) == {"masking:blackbox"}
    assert flags_for({"n_ex": 1000, "aa_blackbox_only": 0.009}) == {}
    plateau = flags_for({"eps_sweep": {"eps": [0, 0.5], "pgd_acc": [0.9, 0.4], "chance_bound": 0.1}})
    assert plateau["masking:eps-plateau"] == "PGD accuracy 40.0% at eps=0.5, where no classifier beats 10.0%"


def test_softmax_output_is_caught_by_autoattack_checks(digits_test):
    model = nn.Sequential(_random_model(), nn.Softmax(dim=1))
    result = methods.evaluate(model, digits_test, LINF, ("clean", "autoattack"), n_ex=8)
    assert "aa-check:softmax-output" in result["flags"]


def test_certificate_of_a_non_lipschitz_net_is_refused_and_flagged(digits_test):
    result = methods.evaluate(_random_model(), digits_test, methods.ThreatModel("L2", 0.3), ("clean", "certified"),
                              n_ex=16)
    assert "certified_acc" not in result and "unsound-certificate" in result["flags"]
    assert result["certified_refused"] == result["flag_reasons"]["unsound-certificate"]


def test_certificate_of_a_lipschitz_net_is_reported(digits_test):
    result = methods.evaluate(_random_model("lipschitz_small"), digits_test, methods.ThreatModel("L2", 0.3),
                              ("clean", "certified"), n_ex=16)
    assert 0 <= result["certified_acc"] <= result["clean_acc"]
    assert result["lipschitz_bound"] <= 1.02 and "unsound-certificate" not in result["flags"]
    assert "certified_acc" in result["ci95"]


def test_unknown_attack_is_rejected(digits_test):
    with pytest.raises(ValueError, match="unknown attacks"):
        methods.evaluate(_random_model(), digits_test, LINF, ("clean", "cw"))


def test_accuracies_are_exact_counts():
    assert share(torch.arange(200) < 132) == 0.66 == 132 / 200
    assert share(torch.zeros(0, dtype=torch.bool)) != share(torch.zeros(0, dtype=torch.bool))  # nan on no points


def test_stage_table_declares_what_each_stage_writes_and_logs():
    names = [stage.name for stage in stages.STAGES]
    assert names == ["clean", "pgd", "steps-check", "autoattack", "eps-sweep", "fgsm", "noise", "transfer",
                     "convergence", "unbounded", "certified"]
    assert stages.DEFAULT_ATTACKS == tuple(names[:-1])
    assert set(stages.CHECKS) < set(stages.DEFAULT_ATTACKS)
    assert stages.ACCURACIES == ("clean_acc", "pgd_acc", "aa_acc", "certified_acc")
    for stage in stages.STAGES:
        assert stage.accuracy is None or stage.accuracy in stage.writes
        assert stage.column is None or stage.column == f"test/{stage.accuracy}"
    with pytest.raises(ValueError, match="must come before it"):
        stages._in_order(tuple(reversed(stages.STAGES)))


def test_each_stage_column_is_one_leaderboard_column():
    """The two layers meet at MLflow names only: a stage's column is the leaderboard column of its metric."""
    from otarena.leaderboard.columns import COLUMNS

    shown = [f"test/{column.metric}" for column in COLUMNS if column.metric]
    assert sorted(shown) == sorted(stage.column for stage in stages.STAGES if stage.column)


def test_a_new_stage_is_one_table_entry(digits_test, monkeypatch):
    """A one-step stage: declared once, it runs, gets its interval and its MLflow metrics."""
    from otarena.search.evaluation import to_metrics

    def run_one_step(run: StageInput) -> dict:
        x_adv = fgsm(run.model, run.x, run.y, eps=run.threat.eps, norm=run.threat.norm)
        return {"one_step_acc": stages.accuracy(run.model, x_adv, run.y), "one_step_seen_pgd": "pgd_acc" in run.result}

    one_step = Stage("one-step", "one step", run_one_step, writes=("one_step_acc", "one_step_seen_pgd"),
                     needs=("pgd",), accuracy="one_step_acc", column="test/one_step_acc", default=False)
    monkeypatch.setattr(stages, "STAGES", stages._in_order((*stages.STAGES, one_step)))
    lines = []
    result = methods.evaluate(_random_model(), digits_test, LINF, ("one-step", "clean", "pgd"), n_ex=20,
                              pgd_steps=2, pgd_targets=0, log=lines.append)
    assert result["one_step_seen_pgd"] and 0 <= result["one_step_acc"] <= result["clean_acc"]
    assert lines[-2:] == ["one step on 20 images ...", lines[-1]] and lines[-1].startswith("one step done in")
    assert list(result["stage_seconds"]) == ["clean", "pgd", "one-step"]
    metrics = to_metrics(result)
    assert metrics["test/one_step_acc"] == result["one_step_acc"]
    assert (metrics["test/one_step_acc_ci_low"], metrics["test/one_step_acc_ci_high"]) == \
        result["ci95"]["one_step_acc"]

    def undeclared(run: StageInput) -> dict:
        return {"one_step_acc": 0.0, "surprise": 1}

    monkeypatch.setattr(stages, "STAGES", (Stage("one-step", "one step", undeclared, writes=("one_step_acc",)),))
    with pytest.raises(RuntimeError, match="surprise"):
        methods.evaluate(_random_model(), digits_test, LINF, ("one-step",), n_ex=4)


def test_settings_are_one_dataclass_with_keyword_changes(digits_test):
    result = methods.evaluate(_random_model(), digits_test, LINF, ("clean", "pgd"), EvalSettings(pgd_steps=3),
                              n_ex=10, pgd_targets=1)
    assert result["n_ex"] == 10
    assert {k: result["settings"][k] for k in ("pgd_steps", "pgd_targets", "pgd_step_size")} == \
        {"pgd_steps": 3, "pgd_targets": 1, "pgd_step_size": LINF.eps / 4}
    with pytest.raises(TypeError):
        methods.evaluate(_random_model(), digits_test, LINF, ("clean",), pgd_stpes=3)


def test_per_example_outcomes_are_the_accuracies_per_point(pgd_at_model, digits_test):
    result = methods.evaluate(pgd_at_model, digits_test, LINF, ("clean", "pgd", "autoattack"), n_ex=40)
    points = result["per_example"]
    assert points["index"].tolist() == list(range(40))
    assert points["index_hash"] == stages.index_hash(points["index"]) != stages.index_hash(points["index"][::-1])
    for key, accuracy in (("clean", "clean_acc"), ("pgd", "pgd_acc"), ("aa", "aa_acc")):
        assert points[key].dtype == bool and share(torch.as_tensor(points[key])) == result[accuracy]
    # The cascade's stage per point: 0 wrong clean, i broken by the i-th attack, 5 robust to all four.
    assert ((points["aa_stage"] > 0) == points["clean"]).all() and ((points["aa_stage"] == 5) == points["aa"]).all()
    certified = methods.evaluate(_random_model("lipschitz_small"), digits_test, methods.ThreatModel("L2", 0.3),
                                 ("clean", "certified"), n_ex=16)["per_example"]
    assert set(certified) == {"index", "index_hash", "clean", "certified"}
    assert (certified["clean"] | ~certified["certified"]).all()
