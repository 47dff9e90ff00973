# SPDX-License-Identifier: Apache-2.0
"""Accuracies are exact counts over n, from the attacks to the MLflow store.

Two hand-built classifiers whose every answer on 200 digits test points is fixed: 132 (then 140)
points survive PGD and 122 survive AutoAttack. A float32 mean stored 132/200 as 0.6600000262 and
flagged the first model ``masking:aa-gap`` at exactly 5 points; counted exactly, it is 0.66 in
MLflow and the flag needs more than 5 points beyond sampling noise, which the second model (9
points, 95% interval 5.8 to 13.8) has.
"""
from __future__ import annotations

import json

import torch
import torch.nn as nn
import torch.nn.functional as F

from otarena import methods
from otarena.methods.common.train import TrainConfig, validate
from otarena.search import evaluation
from otarena.search.config import FinalEval
from otarena.search.tracking import Tracker

EPS = 0.03
"""Under half a grey level: digits' pixels are multiples of 1/16, so rounding recovers the clean point."""
N = 200


class Lookup(nn.Module):
    """Answers each input with the stored answer of its clean point, whatever the perturbation.

    A ``trapped`` point is answered wrongly once at least 8 pixels sit at the full +-eps: the
    corners Square's stripes start from, which a uniform random start (PGD, APGD) almost never
    reaches. Its input gradient is zero, so no gradient attack moves away from its start. So an
    answer fixed correct survives every attack, a trapped one survives PGD and falls to AutoAttack.
    """

    def __init__(self, points: torch.Tensor, answers: torch.Tensor, trapped: torch.Tensor):
        super().__init__()
        self.register_buffer("points", points.flatten(1).clone())
        self.register_buffer("answers", answers.clone())
        self.register_buffer("trapped", trapped.clone())

    def forward(self, x):
        flat = x.flatten(1)
        nearest = torch.cdist((flat.detach() * 16).round() / 16, self.points).argmin(1)
        cornered = ((flat.detach() - self.points[nearest]).abs() >= 0.999 * EPS).sum(1) >= 8
        answer = self.answers[nearest]
        answer = torch.where(self.trapped[nearest] & cornered, (answer + 1) % 10, answer)
        # A graph to the input, with zero gradient, so that the attacks can differentiate it.
        return 10 * F.one_hot(answer, 10).float() + 0 * flat.sum(1, keepdim=True)


def _lookup(x, y, robust: int, trapped: int) -> Lookup:
    """``robust`` points right under every attack, then ``trapped`` right until Square; the rest wrong."""
    index = torch.arange(len(y))
    correct = index < robust + trapped
    return Lookup(x, torch.where(correct, y, (y + 1) % 10), correct & (index >= robust)).eval()


def test_pgd_66_and_autoattack_61_percent_are_logged_exactly_and_not_flagged(tmp_path):
    test = methods.data.load("digits", "test")
    x, y = test.x[:N], test.y[:N]
    eval_cfg = FinalEval(n_ex=N, eps_sweep=False, checks=[]).model_dump()
    cpu = torch.device("cpu")

    at_threshold = _lookup(x, y, robust=122, trapped=10)
    result = evaluation.evaluate_model(at_threshold, norm="Linf", eps=EPS, test_data=test, eval_cfg=eval_cfg,
                                       seed=0, method="erm", device=cpu)
    assert (result["clean_acc"], result["pgd_acc"], result["aa_acc"]) == (0.66, 0.66, 0.61)
    assert result["aa_per_attack"]["square"] == 0.61 and result["aa_blackbox_only"] == 0.05
    assert "masking:aa-gap" not in result["flags"]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = Tracker(uri, "exact")
    parent = tracker.start_search("erm-search", {"otarena.method": "erm"}, {})
    run_id = tracker.trial_run(parent, "lookup_00000", name="lookup", tags={"otarena.method": "erm"}, params={})
    evaluation.log_evaluation(tracker, run_id, result, params={"eval.seed": 0})
    tracker.finish(run_id)
    tracker.finish(parent)
    stored = tracker.client.get_run(run_id).data
    assert stored.metrics["test/pgd_acc"] == 0.66 and stored.metrics["test/clean_acc"] == 0.66
    assert stored.metrics["test/aa_acc"] == 0.61 and stored.metrics["test/aa/apgd-ce"] == 0.66
    assert stored.metrics["test/pgd_check/pgd-50_with_restarts"] == 0.66
    assert "masking:aa-gap" not in stored.tags["otarena.flags"].split(",")
    assert "masking:aa-gap" not in json.loads(stored.tags["otarena.flag_reasons"])

    beyond = evaluation.evaluate_model(_lookup(x, y, robust=122, trapped=18), norm="Linf", eps=EPS, test_data=test,
                                       eval_cfg=eval_cfg, seed=0, method="erm", device=cpu)
    assert (beyond["pgd_acc"], beyond["aa_acc"]) == (0.7, 0.61)
    assert beyond["flag_reasons"]["masking:aa-gap"] == "AutoAttack 9.0 points below PGD-50 (95% interval 5.8 to 13.8)"


def test_validation_accuracies_are_exact():
    test = methods.data.load("digits", "test")
    model = _lookup(test.x[:N], test.y[:N], robust=122, trapped=10)
    cfg = TrainConfig(val_n_ex=N, val_pgd_steps=3)
    metrics = validate(model, test.subset(N), methods.ThreatModel("Linf", EPS), cfg)
    assert metrics == {"val/clean_acc": 0.66, "val/pgd_acc": 0.66}
