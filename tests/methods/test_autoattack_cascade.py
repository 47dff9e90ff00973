# SPDX-License-Identifier: Apache-2.0
"""Our AutoAttack cascade: the same answer as pyautoattack's, per attack, and resumable per batch."""
from __future__ import annotations

import logging
import re

import pytest
import torch
from pyautoattack import AutoAttack

from otarena import methods
from otarena.methods.common import nets
from otarena.methods.common.autoattack import autoattack_cascade

THREAT = methods.ThreatModel("Linf", 0.15)


@pytest.fixture(scope="module")
def model(erm_digits_model):
    """A briefly trained ERM net: some points fall to each attack, some survive."""
    return erm_digits_model


@pytest.fixture(scope="module")
def points():
    data = methods.data.load("digits", "test")
    return data.x[:24], data.y[:24]


def test_cascade_matches_pyautoattack(model, points, caplog):
    x, y = points
    ours = autoattack_cascade(model, x, y, THREAT, batch_size=len(y), seed=0)
    caplog.set_level(logging.DEBUG, logger="auto-attack")  # where pyautoattack logs its per-attack numbers
    _, y_adv = AutoAttack(model, norm="Linf", eps=THREAT.eps, version="standard", seed=0).run_standard_evaluation(
        x, y, batch_size=len(y))
    assert ours.robust_acc == pytest.approx((y_adv == y).float().mean().item())
    theirs = dict(re.findall(r"robust accuracy after (\S+): (\d+\.\d+)%", caplog.text))
    per_attack = ours.per_attack()
    assert list(per_attack) == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert {name.upper(): f"{100 * acc:.2f}" for name, acc in per_attack.items()} == theirs
    assert ours.clean_acc >= per_attack["apgd-ce"] >= per_attack["apgd-t"] >= per_attack["square"] == ours.robust_acc
    assert ours.checks == {}


def test_preempted_cascade_resumes_from_its_state_file(model, points, tmp_path):
    x, y = points
    state = str(tmp_path / "aa_state.pt")
    whole = autoattack_cascade(model, x, y, THREAT, batch_size=8, seed=0)

    def preempt(step):
        if step.batch == 1 and step.attack is None:
            raise KeyboardInterrupt  # what a preemption looks like to the evaluation

    with pytest.raises(KeyboardInterrupt):
        autoattack_cascade(model, x, y, THREAT, batch_size=8, seed=0, state_path=state, progress=preempt)
    seen = []
    resumed = autoattack_cascade(model, x, y, THREAT, batch_size=8, seed=0, state_path=state,
                                 progress=lambda step: seen.append((step.batch, step.batches, step.attack)))
    batches_done = [(batch, total) for batch, total, attack in seen if attack is None]
    assert resumed.resumed_batches == 1 and batches_done == [(1, 3), (2, 3), (3, 3)]
    assert ("apgd-ce" not in {attack for batch, _, attack in seen if batch == 1}  # read back, not attacked
            and ("apgd-ce" in {attack for batch, _, attack in seen if batch == 2}))
    assert torch.equal(resumed.stages, whole.stages)
    # A finished state replays without attacking anything.
    assert autoattack_cascade(model, x, y, THREAT, batch_size=8, seed=0, state_path=state).resumed_batches == 3


def test_state_file_of_another_evaluation_is_refused(model, points, tmp_path):
    x, y = points
    state = str(tmp_path / "aa_state.pt")
    autoattack_cascade(model, x[:8], y[:8], THREAT, batch_size=8, seed=0, state_path=state)
    with pytest.raises(ValueError, match="belongs to another evaluation"):
        autoattack_cascade(model, x[:8], y[:8], methods.ThreatModel("Linf", 0.2), batch_size=8, seed=0,
                           state_path=state)


def test_evaluate_reports_cascade_and_resumes(model, points, tmp_path):
    state = str(tmp_path / "state.pt")
    lines = []
    first = methods.evaluate(model, points, THREAT, ("clean", "autoattack"), batch_size=8, state_path=state,
                             log=lines.append)
    again = methods.evaluate(model, points, THREAT, ("clean", "autoattack"), batch_size=8, state_path=state)
    assert again["aa_resumed_batches"] == 3 and again["aa_acc"] == first["aa_acc"]
    assert any(line.startswith("AutoAttack batch 3/3") for line in lines)


def test_untrained_net_cascade_runs_on_l2():
    torch.manual_seed(0)
    net = nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,)).eval()
    data = methods.data.load("digits", "test")
    result = autoattack_cascade(net, data.x[:8], data.y[:8], methods.ThreatModel("L2", 0.5), batch_size=8)
    assert 0 <= result.robust_acc <= result.clean_acc
