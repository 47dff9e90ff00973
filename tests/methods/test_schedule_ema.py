# SPDX-License-Identifier: Apache-2.0
"""``schedule: rung_cosine`` (cycles that end at the ASHA rungs) and ``ema_decay`` (weight averaging)."""
from __future__ import annotations

import io

import pytest
import torch

from otarena import methods
from otarena.methods.common.data import load
from otarena.methods.common.train import TrainConfig, WeightAverage, build_schedule, rung_milestones

SETTINGS = {"epochs": 3, "optimizer": "sgd", "lr": 0.05, "batch_size": 64, "val_n_ex": 32, "val_pgd_steps": 2,
            "attack_steps": 1, "seed": 3, "rung_grace_epochs": 2, "rung_reduction_factor": 3}
TRAIN = load("digits", "train").subset(200)   # 4 batches per epoch
VAL = load("digits", "val")


def _run(**changes):
    return methods.build_run("pgd_at", {**SETTINGS, **changes}, dataset="digits", arch="small_cnn",
                             threat=methods.ThreatModel("Linf", 0.2), device="cpu", train=TRAIN, val=VAL)


def _fit(run, history=None, stop_after=None):
    def on_epoch_end(metrics, run):
        if history is not None:
            history.append({k: v for k, v in metrics.items() if not k.startswith("time/")})
        if stop_after == run.epoch:
            # The training attack's random start draws on torch's global generator, which no
            # checkpoint holds (a restored trial draws anew); carried here, so that what is compared
            # is what the checkpoint restores.
            raise _Stop(_saved(run.state_dict()), torch.get_rng_state())
    try:
        methods.fit(run, on_epoch_end)
    except _Stop as stop:
        return stop.state, stop.rng
    return None


class _Stop(Exception):
    def __init__(self, state, rng):
        self.state, self.rng = state, rng


def _saved(state: dict) -> dict:
    """The checkpoint as a trial writes and reads it (torch.save, weights_only load)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("epochs, grace, eta, expected", [(9, 1, 3, [1, 3, 9]), (10, 2, 3, [2, 6, 10]),
                                                         (6, 2, 3, [2, 6]), (2, 2, 3, [2]), (16, 1, 2, [1, 2, 4, 8, 16])])
def test_milestones_are_the_asha_rungs(epochs, grace, eta, expected):
    assert rung_milestones(epochs, grace, eta) == expected


def test_rung_cosine_reaches_its_minimum_exactly_at_each_milestone():
    steps_per_epoch, peak = 5, 0.1
    cfg = TrainConfig(epochs=10, lr=peak, schedule="rung_cosine", rung_grace_epochs=2, rung_reduction_factor=3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=peak)
    schedule = build_schedule(optimizer, cfg, steps_per_epoch)
    lrs = []   # the learning rate each step trains at
    for _ in range(cfg.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    milestones = [2, 6, 10]
    start = 0
    for end in milestones:
        cycle = lrs[start * steps_per_epoch:end * steps_per_epoch]
        assert cycle[-1] == 0.0                                   # the step that ends at the rung
        assert min(cycle) == 0.0 and cycle.count(0.0) == 1
        assert cycle[0] > 0.9 * peak                              # a warm restart near the peak
        assert all(a > b for a, b in zip(cycle, cycle[1:]))      # a decay within the cycle
        start = end
    with pytest.raises(ValueError, match="steps_per_epoch"):
        build_schedule(optimizer, cfg)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_resume_mid_cycle_is_bit_for_bit(ema_decay):
    """Stopped after epoch 1 of the first cycle (rung 2), restored into a fresh run: the rest is identical."""
    straight_history = []
    straight = _run(schedule="rung_cosine", ema_decay=ema_decay)
    _fit(straight, straight_history)
    first_history = []
    state, rng = _fit(_run(schedule="rung_cosine", ema_decay=ema_decay), first_history, stop_after=1)
    assert 0 < state["schedule"]["last_epoch"] < 2 * 4             # mid-cycle, counted in steps
    assert (state["ema"] is None) == (ema_decay == 0)
    resumed = _run(schedule="rung_cosine", ema_decay=ema_decay)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    rest = []
    _fit(resumed, rest)
    assert first_history + rest == straight_history
    assert _same(resumed.model.state_dict(), straight.model.state_dict())
    assert _same(resumed.best_model, straight.best_model)
    if ema_decay:
        assert _same(resumed.ema.model.state_dict(), straight.ema.model.state_dict())


def test_ema_decay_zero_equals_no_ema():
    """An average with decay 0 is the training weights themselves: the same metrics, bit for bit."""
    plain, plain_history = _run(epochs=2, ema_decay=0.0), []
    _fit(plain, plain_history)
    assert plain.ema is None and TrainConfig().ema_decay == 0.99   # off only when asked: on by default
    averaged = _run(epochs=2, ema_decay=0.0)
    averaged.ema = WeightAverage(averaged.model, 0.0)
    averaged_history = []
    _fit(averaged, averaged_history)
    for a, b in zip(plain_history, averaged_history):
        assert {k: v for k, v in b.items() if not k.startswith("val/raw_")} == a
        assert b["val/raw_pgd_acc"] == b["val/pgd_acc"]
    assert _same(plain.best_model, averaged.best_model)


def test_best_model_holds_the_averaged_weights():
    run, averages = _run(epochs=2, ema_decay=0.9), {}
    methods.fit(run, lambda metrics, run: averages.update(
        {run.epoch: {k: v.clone() for k, v in run.ema.model.state_dict().items()}}))
    assert run.ema.updates == 2 * 4
    assert _same(run.best_model, averages[run.best["epoch"]])
    assert not _same(run.best_model, {k: v for k, v in run.model.state_dict().items()})
    # BatchNorm-free small_cnn aside, every buffer a model has is averaged alongside (see WeightAverage).
    assert run.best_model.keys() == run.model.state_dict().keys()


def test_batchnorm_statistics_are_averaged_with_the_weights():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)).train()
    average = WeightAverage(model, 0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    model(torch.randn(8, 1, 6, 6))   # moves the running statistics
    average.update(model)
    decay = min(0.9, 2 / 11)         # the warm-up after one update
    for key in ("1.running_mean", "1.running_var"):
        expected = start[key].lerp(model.state_dict()[key], 1 - decay)
        assert torch.equal(average.model.state_dict()[key], expected)
    assert average.model.state_dict()["1.num_batches_tracked"] == 1
