# SPDX-License-Identifier: Apache-2.0
"""OT-MDR on real digits: radius 0 is the base method, SAM mode is SAM by hand, the chain by hand
(gradient at theta_2, applied at theta), weight noise, frozen running statistics, particles, and one
epoch of training.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from otarena.methods.common import data, nets
from otarena.methods.common.attacks import ThreatModel, eval_mode, pgd
from otarena.methods.common.train import Run, TrainConfig, build_optimizer, build_schedule, fit, validate
from otarena.methods.erm import Erm
from otarena.methods.ot_mdr import Config, OtMdr, OtMdrPgd, OtMdrTrades, TradesConfig
from otarena.methods.pgd_at import PgdAT
from otarena.methods.trades import Trades

THREAT = ThreatModel("Linf", 0.2, steps=3)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "val")


class TinyBN(nets.Classifier):
    """A small classifier with 2-d and 1-d batch norm, for the running-statistics checks."""

    def __init__(self, info):
        super().__init__(info.mean, info.std)
        self.body = nn.Sequential(
            nn.Conv2d(info.in_channels, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(8 * 16, 32), nn.BatchNorm1d(32), nn.ReLU())
        self.head = nn.Linear(32, info.num_classes)


def _model(digits, arch="small_cnn", seed=0):
    info = digits[0].info
    torch.manual_seed(seed)
    if arch == "tiny_bn":
        return TinyBN(info)
    return nets.build(arch, in_channels=info.in_channels, num_classes=info.num_classes, mean=info.mean, std=info.std)


def _method(cls, model, *, lr=0.1, momentum=0.0, weight_decay=0.0, **hparams):
    opt = build_optimizer(model, TrainConfig(optimizer="sgd", lr=lr, momentum=momentum, weight_decay=weight_decay))
    return cls(model, opt, THREAT, cls.config_from(hparams))


def _batch(digits, start=0, size=32):
    train, _ = digits
    return train.x[start:start + size], train.y[start:start + size]


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _norm(tensors):
    return torch.sqrt(sum((t ** 2).sum() for t in tensors))


def _assert_params(model, expected, atol=1e-6):
    for (name, p), q in zip(model.named_parameters(), expected):
        torch.testing.assert_close(p.detach(), q, rtol=0, atol=atol, msg=name)


# --------------------------------------------------------------------------------------------------
# Special cases: radius 0 is the base method, SAM mode is SAM


@pytest.mark.parametrize("cls,base,particles", [(OtMdr, Erm, 1), (OtMdr, Erm, 2), (OtMdrPgd, PgdAT, 1),
                                                (OtMdrTrades, Trades, 1)])
def test_radius_zero_without_noise_is_the_base_step(cls, base, particles, digits):
    hp = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}
    ours = _method(cls, _model(digits), ot_mdr_radius=0.0, ot_mdr_noise_std=0.0, ot_mdr_particles=particles, **hp)
    ref = _method(base, _model(digits), **hp)
    moved = _method(cls, _model(digits), ot_mdr_radius=0.1, ot_mdr_noise_std=0.0, **hp)   # control
    for i in range(4):
        x, y = _batch(digits, 32 * i)
        outs = []
        for method in (ours, ref, moved):
            torch.manual_seed(i)   # the same attack draws
            outs.append(method.step(x, y, None))
        torch.testing.assert_close(outs[0]["loss"], outs[1]["loss"], rtol=0, atol=1e-6)
        assert outs[0]["ascent_norm"] == 0
    _assert_params(ours.model, _params(ref.model))
    assert max((p - q).abs().max().item() for p, q in zip(moved.model.parameters(), ref.model.parameters())) > 1e-3


def test_sam_mode_is_sam_by_hand(digits):
    model = _model(digits, "tiny_bn")
    hand = copy.deepcopy(model)
    method = _method(OtMdr, model, momentum=0.9, weight_decay=5e-4, ot_mdr_radius=0.1, ot_mdr_noise_std=0.0,
                     ot_mdr_chain=False)
    x, y = _batch(digits)
    out = method.step(x, y, None)

    params = list(hand.parameters())
    theta = _params(hand)
    g = torch.autograd.grad(F.cross_entropy(hand(x), y), params)
    buffers = [b.clone() for b in hand.buffers()]   # a plain step's one forward at theta
    with torch.no_grad():
        for p, gi in zip(params, g):
            p.add_(0.1 * gi / _norm(g))
    ascent = _norm([p - t for p, t in zip(params, theta)])
    loss = F.cross_entropy(hand(x), y)
    g_tilde = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, t, gi in zip(params, theta, g_tilde):
            p.copy_(t)
            p.grad = gi
    torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4).step()

    _assert_params(model, _params(hand))
    for b, expected in zip(model.buffers(), buffers):
        torch.testing.assert_close(b, expected, rtol=0, atol=0)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["ascent_norm"], ascent, rtol=1e-5, atol=0)
    assert out["ascent_norm"].item() == pytest.approx(0.1, rel=1e-5)


# --------------------------------------------------------------------------------------------------
# The chain, by hand


def test_chain_gradient_is_taken_at_theta2_and_applied_at_theta(digits):
    """theta_after = theta - lr * grad L_B(theta_2), with x_adv crafted once at theta; plain SGD."""
    model = _model(digits, "tiny_bn")
    hand = copy.deepcopy(model)
    method = _method(OtMdrPgd, model, lr=0.1, ot_mdr_radius=0.1, ot_mdr_ratio=2.0, ot_mdr_noise_std=0.0)
    x, y = _batch(digits, size=31)   # odd: the halves are 15 and 16
    torch.manual_seed(0)
    out = method.step(x, y, None)

    torch.manual_seed(0)
    with eval_mode(hand):
        x_adv = pgd(hand, x, y, eps=THREAT.eps, steps=THREAT.steps, step_size=THREAT.step_size)
    params = list(hand.parameters())
    theta = _params(hand)

    def grad(part):
        return torch.autograd.grad(F.cross_entropy(hand(x_adv[part]), y[part]), params)

    g_theta = grad(slice(None))   # control: the plain gradient at theta
    g1 = grad(slice(0, 15))
    with torch.no_grad():
        for p, a in zip(params, g1):
            p.add_(0.1 * a / _norm(g1))
    g2 = grad(slice(15, 31))
    with torch.no_grad():
        for p, a, b in zip(params, g1, g2):
            p.add_(0.2 * (a + b) / _norm(g2))   # merged gradient, normalised by ||g2||
    ascent = _norm([p - t for p, t in zip(params, theta)])
    loss = F.cross_entropy(hand(x_adv), y)
    g = torch.autograd.grad(loss, params)
    expected = [t - 0.1 * gi for t, gi in zip(theta, g)]

    _assert_params(model, expected)
    torch.testing.assert_close(out["loss"], loss.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(out["ascent_norm"], ascent, rtol=1e-5, atol=0)
    torch.testing.assert_close(out["grad_norm"], _norm(g), rtol=1e-5, atol=0)
    assert 0.1 < ascent.item() < 0.1 + 0.2 * 2 + 1e-6   # the second step is not of length rho_2
    assert max((a - b).abs().max().item() for a, b in zip(g, g_theta)) > 1e-3   # theta_2 did matter


def test_particles_average_their_chains(digits):
    model = _model(digits)
    hand = copy.deepcopy(model)
    method = _method(OtMdr, model, lr=0.1, ot_mdr_radius=0.05, ot_mdr_noise_std=0.0, ot_mdr_particles=2)
    x, y = _batch(digits)
    torch.manual_seed(3)
    method.step(x, y, None)

    torch.manual_seed(3)
    orders = [torch.arange(32), torch.randperm(32)]   # chain 1 as given, chain 2 reshuffled (same draw)
    params = list(hand.parameters())
    theta = _params(hand)
    total = [torch.zeros_like(t) for t in theta]
    for order in orders:
        b1, b2 = order[:16], order[16:]
        g1 = torch.autograd.grad(F.cross_entropy(hand(x[b1]), y[b1]), params)
        with torch.no_grad():
            for p, a in zip(params, g1):
                p.add_(0.05 * a / _norm(g1))
        g2 = torch.autograd.grad(F.cross_entropy(hand(x[b2]), y[b2]), params)
        with torch.no_grad():
            for p, a, b in zip(params, g1, g2):
                p.add_(0.1 * (a + b) / _norm(g2))
        g = torch.autograd.grad(F.cross_entropy(hand(x), y), params)
        with torch.no_grad():
            for p, t, s, gi in zip(params, theta, total, g):
                p.copy_(t)
                s.add_(gi / 2)
    _assert_params(model, [t - 0.1 * s for t, s in zip(theta, total)])


# --------------------------------------------------------------------------------------------------
# Noise and running statistics


def test_weight_noise_is_applied_with_its_std(digits):
    x, y = _batch(digits)

    def run(sigma, seed, radius=0.0):
        method = _method(OtMdr, _model(digits), ot_mdr_radius=radius, ot_mdr_noise_std=sigma)
        torch.manual_seed(seed)
        return method, method.step(x, y, None)

    quiet, out0 = run(0.0, 0)
    noisy, out = run(1e-3, 0)
    again, _ = run(1e-3, 0)
    other, _ = run(1e-3, 1)
    d = sum(p.numel() for p in noisy.model.parameters())
    # radius 0: theta_2 - theta = sigma (xi_1 + xi_2), whose norm is about sigma sqrt(2 d)
    assert out0["ascent_norm"] == 0
    assert out["ascent_norm"].item() == pytest.approx(1e-3 * math.sqrt(2 * d), rel=0.05)
    _assert_params(again.model, _params(noisy.model), atol=0)   # same seed, same draws
    assert any(not torch.equal(p, q) for p, q in zip(other.model.parameters(), noisy.model.parameters()))
    assert any(not torch.equal(p, q) for p, q in zip(quiet.model.parameters(), noisy.model.parameters()))


@pytest.mark.parametrize("chain", [True, False])
def test_running_statistics_move_only_in_the_pass_at_theta(chain, digits):
    model = _model(digits, "tiny_bn")
    ref = copy.deepcopy(model)
    init = [b.clone() for b in model.buffers()]
    # A large radius and noise: passes at the perturbed weights would leave clearly different statistics.
    method = _method(OtMdr, model, ot_mdr_radius=1.0, ot_mdr_noise_std=1e-2, ot_mdr_particles=2, ot_mdr_chain=chain)
    x, y = _batch(digits)
    method.step(x, y, None)
    ref.train()
    with torch.no_grad():
        ref(x[:16] if chain else x)   # the first pass of the step, at theta
    moved = False
    for (name, b), expected, b0 in zip(model.named_buffers(), ref.buffers(), init):
        torch.testing.assert_close(b, expected, rtol=0, atol=0, msg=name)
        moved |= not torch.equal(expected, b0)
    assert moved
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 2 and all(m.num_batches_tracked.item() == 1 for m in norms)


# --------------------------------------------------------------------------------------------------
# Contract: config, search space, passes, metrics, state, training


def test_config_search_space_and_base_config():
    for cls in (OtMdr, OtMdrPgd, OtMdrTrades):
        defaults = cls.Config()
        for key, domain in cls.SEARCH_SPACE.items():
            if key != "lr":
                assert getattr(defaults, key) == domain.default and domain.contains(domain.default), key
    assert Config().ot_mdr_ratio == 2.0 and Config().ot_mdr_particles == 1
    # The official single-model runs are noise-free (they never pass noise_var); noise stays searchable.
    assert Config().ot_mdr_noise_std == 0.0 and OtMdr.SEARCH_SPACE["ot_mdr_noise_std"].contains(1e-4)
    assert OtMdr.SEARCH_SPACE["ot_mdr_radius"].is_valid(0.0)
    assert OtMdrTrades.config_from({"lr": 0.1, "trades_beta": 3.0}) == TradesConfig(trades_beta=3.0)
    for bad in ({"ot_mdr_radius": -0.1}, {"ot_mdr_noise_std": -1e-4}, {"ot_mdr_particles": 0},
                {"ot_mdr_ratio": -1.0}):
        with pytest.raises(ValueError):
            Config(**bad)


def test_base_method_gets_the_same_objects_and_its_hyperparameters(digits):
    model = _model(digits)
    method = _method(OtMdrTrades, model, trades_beta=2.5)
    assert isinstance(method.base, Trades) and method.base.cfg.trades_beta == 2.5
    assert method.base.model is model and method.base.optimizer is method.optimizer and method.base.threat is THREAT
    assert isinstance(_method(OtMdr, _model(digits)).base, Erm)
    assert method.state_dict() == {}


def test_passes(digits):
    k = THREAT.steps
    assert _method(OtMdr, _model(digits)).passes() == 2
    assert _method(OtMdrPgd, _model(digits)).passes() == k + 2
    assert _method(OtMdrPgd, _model(digits), ot_mdr_particles=3).passes() == k + 6
    assert _method(OtMdrTrades, _model(digits)).passes() == pytest.approx(k + 1 / 3 + 4)


def test_one_epoch_improves_validation_pgd_accuracy(digits):
    train, val = digits
    threat = ThreatModel("Linf", 0.2, steps=5)
    cfg = TrainConfig(optimizer="adam", lr=2e-3, weight_decay=0.0, batch_size=32, epochs=1, attack_steps=5,
                      val_n_ex=144)
    torch.manual_seed(cfg.seed)
    info = train.info
    model = nets.build("small_cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                       mean=info.mean, std=info.std)
    optimizer = build_optimizer(model, cfg)
    # rho_1 = 0.01, the low end of the search range. At the default 0.05 (a CIFAR value; total ascent
    # ~0.2 here) PGD-AT of this fresh 200k-weight net stalls at chance for ~3 epochs before it learns
    # (measured: val clean 0.13 after 1 epoch, 0.70 after 6), so one epoch would show nothing.
    method = OtMdrPgd(model, optimizer, threat, OtMdrPgd.Config(ot_mdr_radius=0.01), n_train=len(train))
    run = Run(method, build_schedule(optimizer, cfg), train, val, cfg)
    before = validate(run.model, val, threat, cfg)
    epochs = []
    fit(run, lambda metrics, _: epochs.append(metrics))
    after = validate(run.model, val, threat, cfg)
    # The training weights' validation (val/raw_*: val/* holds the averaged weights').
    assert after["val/pgd_acc"] == epochs[0]["val/raw_pgd_acc"]
    assert after["val/pgd_acc"] > before["val/pgd_acc"] + 0.1, (before, after)
    assert after["val/clean_acc"] > before["val/clean_acc"] + 0.3, (before, after)
    for key in ("train/loss", "train/adv_acc", "train/ascent_norm", "train/grad_norm"):
        assert math.isfinite(epochs[0][key]), key
    assert epochs[0]["train/ascent_norm"] > 0.01   # at least rho_1
    # An exact count over the epoch's examples (the loop sums (hits, n) pairs), not a float32 mean.
    share = epochs[0]["train/adv_acc"]
    assert round(share * len(train)) / len(train) == share
