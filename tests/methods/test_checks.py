# SPDX-License-Identifier: Apache-2.0
"""The cheap checks of Carlini et al.'s checklist, and the aa-gap rule: real models, no mocks.

Honest PGD-AT digits models at eps 0.2 and 0.3 carry no ``masking:*`` flag; broken defences built
here around the same real model are caught: a non-differentiable transform whose backward pass
gives a random sign, gradients masked off the data's pixel grid (FGSM beats PGD), softmax outputs,
and a detector that answers one fixed class (or all-zero logits) far from the data.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from otarena import methods
from otarena.methods.common import evaluate as stages
from otarena.methods.common.attacks import correct
from otarena.methods.common.evaluate import aa_gap_interval, flags_for

LINF = methods.ThreatModel("Linf", 0.2)
CHECKS_ONLY = ("clean", "pgd", "fgsm", "noise", "transfer", "convergence", "unbounded")


@pytest.fixture(scope="module")
def digits_test():
    return methods.data.load("digits", "test")


def _masking(result):
    return sorted(f for f in result["flags"] if f.startswith("masking:"))


class _RandomSignRound(torch.autograd.Function):
    """Rounding to the digits' 1/16 pixel grid, whose backward pass returns the incoming gradient with a random sign."""

    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 16) / 16

    @staticmethod
    def backward(ctx, grad):
        sign = torch.randint(0, 2, grad.shape, device=grad.device).to(grad.dtype) * 2 - 1
        return grad.abs() * sign


class RandomSignGradient(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(_RandomSignRound.apply(x))


class MaskedOffGrid(nn.Module):
    """The model's own outputs everywhere, but a gradient only on the digits' 1/16 pixel grid (the clean images)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        logits = self.model(x)
        on_grid = ((x * 16 - torch.round(x * 16)).abs() < 1e-4).flatten(1).all(1)
        return torch.where(on_grid[:, None], logits, logits.detach())


class RejectFarInputs(nn.Module):
    """The model near the training images; farther (L2) than any test image from all of them, a fixed answer."""

    def __init__(self, model, train_x, test_x, answer):
        super().__init__()
        self.model = model
        self.register_buffer("train_images", train_x.flatten(1))
        self.register_buffer("answer", answer)
        self.radius = self._nearest(test_x).max().item()

    def _nearest(self, x):
        return torch.cdist(x.flatten(1), self.train_images).min(1).values

    def forward(self, x):
        far = self._nearest(x) > self.radius
        return torch.where(far[:, None], self.answer.expand(len(x), -1), self.model(x))


def test_honest_model_at_large_eps_carries_no_masking_flag(honest_digits_model, digits_test):
    """PGD with 9 targets and an aa-gap beyond sampling noise; test_evaluate.py's model at eps 0.2 runs the same stages."""
    result = methods.evaluate(honest_digits_model(0.3), digits_test, methods.ThreatModel("Linf", 0.3),
                              ("clean", "pgd", "autoattack", *stages.CHECKS), n_ex=200)
    assert set(stages.CHECKS) <= set(result["stage_seconds"])
    assert _masking(result) == [], result["flag_reasons"]
    assert result["settings"]["pgd_targets"] == 9
    assert result["unbounded_pgd_acc"] == result["unbounded_acc"] == 0
    assert result["fgsm_acc"] >= result["pgd_acc"]


def test_random_sign_backward_is_flagged(honest_digits_model, digits_test):
    model = RandomSignGradient(honest_digits_model(0.2))
    result = methods.evaluate(model, digits_test, LINF, CHECKS_ONLY, n_ex=60, pgd_steps=10, pgd_targets=3)
    assert {"masking:transfer", "masking:convergence"} <= set(result["flags"]), result["flag_reasons"]
    assert "ERM" in result["transfer_surrogate"]
    assert result["transfer_only"] >= 0.01


def test_fgsm_beating_pgd_is_flagged(honest_digits_model, digits_test):
    result = methods.evaluate(MaskedOffGrid(honest_digits_model(0.2)), digits_test, LINF, ("clean", "pgd", "fgsm"),
                              n_ex=100, pgd_steps=10, pgd_targets=3)
    assert "masking:fgsm" in result["flags"], result["flag_reasons"]
    assert result["fgsm_acc"] < result["pgd_acc"]


def test_softmax_outputs_are_flagged(honest_digits_model, digits_test):
    # The model trained at eps 0.3 falls fast there, so AutoAttack's later attacks have little left to do.
    model = nn.Sequential(honest_digits_model(0.3), nn.Softmax(dim=1))
    result = methods.evaluate(model, digits_test, methods.ThreatModel("Linf", 0.3), ("clean", "autoattack"), n_ex=10)
    assert "aa-check:softmax-output" in result["flags"], result["flag_reasons"]


@pytest.mark.parametrize("answer", ["class 3", "all-zero logits"])
def test_detector_answering_far_from_the_data_scores_no_more_than_its_class(honest_digits_model, digits_test, answer):
    train = methods.data.load("digits", "train")
    logits = torch.zeros(10)
    if answer == "class 3":
        logits[3] = 10.0
    x, y = digits_test.x[:100], digits_test.y[:100]
    model = RejectFarInputs(honest_digits_model(0.2), train.x, x, logits)
    result = methods.evaluate(model, (x, y), LINF, ("clean", "pgd", "unbounded"))
    share_of_3 = (y == 3).float().mean().item()
    assert result["unbounded_acc"] <= share_of_3
    if answer == "class 3":  # the gradient attack cannot leave the fixed answer: it failed, and says so
        assert "masking:unbounded" in result["flags"]
        assert 0 < result["unbounded_pgd_acc"] <= share_of_3
    else:  # a tie at the top is no answer: class 0's points are not counted correct
        assert result["unbounded_pgd_acc"] == 0 and "masking:unbounded" not in result["flags"]


def test_a_tie_or_nan_at_the_top_is_never_correct():
    y = torch.tensor([0, 1, 2])
    assert not correct(torch.zeros(3, 4), y).any()
    assert not correct(torch.tensor([[float("nan"), 0, 0, 0], [0, float("nan"), 0, 0], [1, 1, 1, 0]]), y).any()
    assert correct(torch.tensor([[2.0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 3, 5]]), y).tolist() == [True, True, False]


def test_transfer_uses_the_given_surrogate(honest_digits_model, digits_test):
    model = honest_digits_model(0.2)
    result = methods.evaluate(model, digits_test, LINF, ("clean", "transfer"), n_ex=40, surrogate=model)
    assert result["transfer_surrogate"] == "the given surrogate"
    assert result["transfer_acc"] < result["clean_acc"]   # the model's own PGD examples fool it


def test_aa_gap_needs_a_gap_beyond_sampling_noise():
    # 12 of 200 points: a gap PGD's sampling cannot tell from a weaker attack.
    low, high = aa_gap_interval(50 / 200, 38 / 200, 200)
    assert low < 0.05 < 0.06 < high
    assert "masking:aa-gap" not in flags_for({"n_ex": 200, "pgd_acc": 50 / 200, "aa_acc": 38 / 200})
    # The same gap on 5,000 points is masking, and so is a large gap on few points.
    assert "masking:aa-gap" in flags_for({"n_ex": 5000, "pgd_acc": 0.25, "aa_acc": 0.19})
    assert "masking:aa-gap" in flags_for({"n_ex": 60, "pgd_acc": 40 / 60, "aa_acc": 10 / 60})


def test_checklist_flags_follow_their_thresholds():
    n = {"n_ex": 1000, "settings": {"pgd_steps": 50}}
    flags = flags_for({**n, "pgd_acc": 0.5, "fgsm_acc": 0.48, "noise_only": 0.01, "transfer_only": 0.02,
                       "convergence_rising": 0.06, "unbounded_pgd_acc": 0.001})
    assert set(flags) == {"masking:fgsm", "masking:noise", "masking:transfer", "masking:convergence",
                          "masking:unbounded"}
    assert flags["masking:fgsm"] == ("FGSM leaves 48.0% correct, 2.0 points below PGD-50: one step beats the "
                                     "iterative attack")
    assert flags_for({**n, "pgd_acc": 0.5, "fgsm_acc": 0.49, "noise_only": 0.009, "transfer_only": 0.0,
                      "convergence_rising": 0.05, "unbounded_pgd_acc": 0.0}) == {}


def test_final_eval_switches_each_check_off():
    from otarena.search.evaluation import attacks_for

    assert set(stages.CHECKS) <= set(attacks_for("pgd_at", {}))
    assert not set(stages.CHECKS) & set(attacks_for("pgd_at", {"checks": []}))
    assert [a for a in attacks_for("pgd_at", {"checks": ["noise"]}) if a in stages.CHECKS] == ["noise"]
