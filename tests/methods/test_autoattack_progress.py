# SPDX-License-Identifier: Apache-2.0
"""AutoAttack reports each attack of each batch with the time left, in few lines (issue #14, item 3)."""
from __future__ import annotations

import pytest
import torch
from pyautoattack import AutoAttack

from otarena import methods
from otarena.methods.common import evaluate as evaluate_module
from otarena.methods.common import nets
from otarena.methods.common.autoattack import _TimeLeft, autoattack_cascade

# Large enough that APGD-CE fools every point it attacks: the later attacks have nothing left to do.
THREAT = methods.ThreatModel("Linf", 0.5)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,)).eval()


@pytest.fixture(scope="module")
def points(net):
    """Test points the untrained net classifies correctly, so that the cascade attacks them."""
    data = methods.data.load("digits", "test")
    with torch.no_grad():
        right = net(data.x).argmax(1) == data.y
    return data.x[right][:6], data.y[right][:6]


def test_time_left_uses_measured_rates_and_the_cost_prior(net):
    adversary = AutoAttack(net, norm="Linf", eps=0.1, version="standard", seed=0, device="cpu")
    clock = _TimeLeft(adversary, tuple(adversary.attacks_to_run))
    stages = torch.tensor([5, 5, 1, 0, 5, 5, 5, 5])   # batch 1: 4 points, two of them still standing
    assert clock.left(stages, 4, slice(0, 4), 1, 4, 1) is None   # nothing timed yet
    clock.record(0, 3, 3.0)                              # APGD-CE: 1 s per point, 100 passes each
    apgd_t = 9 * 100 / 100                               # 9 targets x 100 iterations: 9 s per point
    fab_t, square = 3 * 9 * 100 / 100, 5000 / 100
    standing_now = 2 * (apgd_t + fab_t + square)
    reach = [3 / 4, 2 / 4, 2 / 4, 2 / 4]                 # shares of the points seen that meet each attack
    next_batch = 4 * (reach[0] * 1 + reach[1] * apgd_t + reach[2] * fab_t + reach[3] * square)
    assert clock.left(stages, 4, slice(0, 4), 1, 4, 1) == pytest.approx(standing_now + next_batch)
    clock.record(3, 2, 200.0)                            # Square measured: its own rate replaces the prior
    assert clock.left(stages, 4, slice(0, 4), 4, 4, 0) == 0


def test_progress_after_each_attack_of_each_batch(net, points):
    x, y = points
    steps = []
    autoattack_cascade(net, x, y, THREAT, batch_size=2, progress=steps.append)
    assert [(s.batch, s.attack) for s in steps] == [(1, "apgd-ce"), (1, None), (2, "apgd-ce"), (2, None),
                                                    (3, "apgd-ce"), (3, None)]
    assert [s.seen for s in steps] == [2, 2, 4, 4, 6, 6] and all(s.robust == 0 for s in steps)
    assert all(s.left is not None and s.left >= 0 for s in steps) and steps[-1].left == 0
    assert steps[0].left > 0   # two more batches to attack


def test_evaluate_prints_one_line_per_update_at_most_every_few_seconds(net, points, monkeypatch):
    lines = []
    methods.evaluate(net, points, THREAT, ("autoattack",), batch_size=2, log=lines.append)
    progress = [line for line in lines if line.startswith("AutoAttack batch")]
    # The first update and the last, not one per attack: this cascade takes well under 10 seconds.
    assert [line.split(":")[0] for line in progress] == ["AutoAttack batch 1/3 apgd-ce done",
                                                         "AutoAttack batch 3/3 done"]
    assert "left" in progress[0] and "0/2 robust so far" in progress[0] and "left" not in progress[-1]
    monkeypatch.setattr(evaluate_module, "PROGRESS_EVERY_S", 0.0)
    lines.clear()
    methods.evaluate(net, points, THREAT, ("autoattack",), batch_size=2, log=lines.append)
    assert sum(line.startswith("AutoAttack batch") for line in lines) == 6


@pytest.mark.parametrize("seconds, text", [(4.4, "4s"), (65, "1m05s"), (3725, "1h02m")])
def test_durations_read_at_a_glance(seconds, text):
    assert evaluate_module._duration(seconds) == text
