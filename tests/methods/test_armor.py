# SPDX-License-Identifier: Apache-2.0
"""ARMOR_D: the duals' closed forms (f*_alpha, KL log-mean-exp, lambda*), the sample weights, the
limit r -> 0, the transport steps, resume, and one epoch of training on digits.
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from otarena.methods.armor import ArmorMart, ArmorPgd, ArmorTrades
from otarena.methods.common import data, nets
from otarena.methods.common.attacks import ThreatModel, eval_mode
from otarena.methods.common.dro import (LAMBDA_MIN, UDR_CAP, DualVariables, alpha_dual, f_star_alpha, kl_dual, kl_dual_slope,
                                kl_optimal_lambda, udr_cost, weight_stats)
from otarena.methods.common.functional import mart_loss_per_example, trades_loss_per_example
from otarena.methods.common.train import Run, TrainConfig, build_optimizer, build_schedule, fit, validate
from otarena.methods.mart import Mart
from otarena.methods.pgd_at import PgdAT
from otarena.methods.trades import Trades

THREAT = ThreatModel("Linf", 0.2, steps=3)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "val")


@pytest.fixture(scope="module")
def batch(digits):
    return digits[0].x[:64], digits[0].y[:64]


def _model(digits, seed=0):
    info = digits[0].info
    torch.manual_seed(seed)
    return nets.build("small_cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                      mean=info.mean, std=info.std)


def _method(cls, digits, *, threat=THREAT, seed=0, lr=1e-3, **hparams):
    model = _model(digits, seed)
    opt = build_optimizer(model, TrainConfig(optimizer="adam", lr=lr, weight_decay=0.0))
    return cls(model, opt, threat, cls.config_from(hparams))


@pytest.fixture(scope="module")
def trained_state(digits):
    """A briefly trained net: its per-example losses differ, so weights and duals have something to do."""
    method = _method(ArmorPgd, digits, lr=3e-3, armor_natural_weight=0.5)
    train, _ = digits
    for i in range(30):
        sl = slice(64 * (i % 8), 64 * (i % 8 + 1))
        method.step(train.x[sl], train.y[sl], None)
    return {k: v.clone() for k, v in method.model.state_dict().items()}


def _losses(seed=0, n=32):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, generator=g, dtype=torch.float64) * 3).requires_grad_(True)


# --------------------------------------------------------------------------------------------------
# The alpha-divergence dual


@pytest.mark.parametrize("alpha", [2.0, 3.0, 6.0, 10.0, 20.0])
def test_f_star_alpha_is_the_conjugate_of_f_alpha(alpha):
    def f(t):
        return (t ** alpha - 1) / (alpha * (alpha - 1))

    for s in (-1.0, 0.0, 0.3, 1.0, 2.5):
        # sup_{t >= 0} s t - f(t), numerically.
        res = scipy.optimize.minimize_scalar(lambda t: -(s * t - f(t)), bounds=(0.0, 50.0), method="bounded",
                                             options={"xatol": 1e-12})
        got = f_star_alpha(torch.tensor(s, dtype=torch.float64), alpha).item()
        assert got == pytest.approx(-res.fun, rel=1e-7, abs=1e-9), (alpha, s)
    # alpha = 2: f(t) = (t^2 - 1) / 2, so f*(s) = s^2 / 2 + 1/2 for s >= 0.
    if alpha == 2.0:
        s = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
        torch.testing.assert_close(f_star_alpha(s, 2.0), s ** 2 / 2 + 0.5)


def test_alpha_weights_are_exactly_zero_below_the_threshold():
    lam, nu = torch.tensor(0.5, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)
    losses = torch.tensor([0.2, 0.9, 1.0, 1.1, 2.0, 3.5], dtype=torch.float64, requires_grad=True)
    costs = torch.tensor([0.0, 0.0, 0.0, 0.1, 0.5, 0.0], dtype=torch.float64)
    s = (losses.detach() - nu) / lam - costs   # (-1.6, -0.2, 0, 0.1, 1.5, 5)
    J, w = alpha_dual(losses, costs, lam, nu, radius=0.3, alpha=6.0)
    below = s <= 0
    assert below.tolist() == [True, True, True, False, False, False]
    assert (w[below] == 0).all() and (w[~below] > 0).all()
    assert w.sum().item() == pytest.approx(1.0)
    torch.testing.assert_close(w[~below], F.relu(s[~below]) ** 0.2 / (F.relu(s) ** 0.2).sum())
    # The weights are the theta-gradient's: dJ/dL_i is 0 exactly below the threshold.
    grad, = torch.autograd.grad(J, losses)
    assert (grad[below] == 0).all() and (grad[~below] > 0).all()
    torch.testing.assert_close(grad / grad.sum(), w)
    entropy, zero_frac = weight_stats(w)
    assert zero_frac.item() == pytest.approx(0.5)
    assert 0 < entropy.item() < math.log(3)


def test_alpha_weights_all_below_threshold_are_all_zero():
    J, w = alpha_dual(torch.tensor([0.1, 0.2]), torch.zeros(2), torch.tensor(1.0), torch.tensor(5.0),
                      radius=0.5, alpha=6.0)
    assert (w == 0).all() and torch.isfinite(J)
    assert weight_stats(w)[1].item() == 1.0


def test_lambda_stays_positive_when_the_dual_pushes_it_down():
    # Losses below nu: J = lambda (r + 1/(alpha(alpha-1))) + nu, whose gradient drives lambda to 0 at every step.
    dual = DualVariables(1.0, 1.0)
    optimizer = torch.optim.AdamW([dual.rho], lr=0.5, weight_decay=0.0)
    losses = 0.01 * torch.rand(32, generator=torch.Generator().manual_seed(0))
    smallest = math.inf
    for _ in range(600):
        J, _ = alpha_dual(losses, torch.zeros(32), dual.lam, dual.nu, radius=1.0, alpha=2.0)
        optimizer.zero_grad()
        J.backward()
        optimizer.step()
        assert dual.lam.item() > 0 and torch.isfinite(J), (dual.lam.item(), J.item())
        smallest = min(smallest, dual.lam.item())
    assert smallest < 1e-3   # it was pushed down hard...
    assert dual.lam.item() >= LAMBDA_MIN   # ...and stopped at the floor


@pytest.mark.parametrize("lam", [1e-5, 0.5, 1.0, 2.0, 1e3])
def test_dual_variables_start_at_their_inits(lam):
    dual = DualVariables(lam, -0.35)
    assert dual.lam.item() == pytest.approx(lam, rel=1e-5)
    assert dual.nu.item() == pytest.approx(-0.35)


# --------------------------------------------------------------------------------------------------
# The KL dual


def test_kl_dual_is_log_mean_exp():
    losses = _losses(1)
    costs = torch.rand(32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for lam, kappa, radius in ((0.7, 0.1, 0.02), (3.0, 0.0, 0.2), (0.0, 0.5, 1.0)):
        J, w = kl_dual(losses, costs, torch.tensor(lam, dtype=torch.float64), radius=radius, kappa=kappa)
        T = lam + kappa
        L, c = losses.detach().numpy(), costs.numpy()
        expected = radius * lam + T * math.log(np.mean(np.exp(L / T - c)))
        assert J.item() == pytest.approx(expected, rel=1e-12)
        torch.testing.assert_close(w, torch.softmax(losses.detach() / T - costs, 0))
        grad, = torch.autograd.grad(J, losses)   # the theta-gradient's weights are softmax(z)
        torch.testing.assert_close(grad, w)


@pytest.mark.parametrize("radius,kappa,with_costs", [(0.02, 0.1, False), (0.2, 0.12, False), (0.5, 0.0, False),
                                                     (0.05, 0.1, True), (0.5, 0.0, True), (3.0, 0.1, False)])
def test_kl_optimal_lambda_minimizes_the_dual(radius, kappa, with_costs):
    losses = _losses(3).detach()
    g = torch.Generator().manual_seed(4)
    costs, stay = torch.zeros_like(losses), None
    if with_costs:   # transported losses L_i pay c_i; staying at x gives a lower loss for free
        costs = 0.3 * torch.rand(32, generator=g, dtype=torch.float64)
        stay = losses - 0.5 * torch.rand(32, generator=g, dtype=torch.float64)

    def J(lam):
        lam = torch.tensor(lam, dtype=torch.float64)
        return kl_dual(losses, costs, lam, radius=radius, kappa=kappa, stay=stay)[0].item()

    lam = kl_optimal_lambda(losses, costs, radius=radius, kappa=kappa, stay=stay).item()
    reference = scipy.optimize.minimize_scalar(J, bounds=(0.0, 1e3), method="bounded", options={"xatol": 1e-10})
    assert J(lam) == pytest.approx(reference.fun, rel=1e-9, abs=1e-12)
    assert J(lam) <= min(J(lam * 1.01 + 1e-9), J(lam * 0.99)) + 1e-12
    if reference.x > 1e-4:   # an interior optimum: the slope vanishes there
        assert lam == pytest.approx(reference.x, rel=1e-4)
        slope = kl_dual_slope(losses, costs, torch.tensor([lam], dtype=torch.float64), radius=radius,
                              kappa=kappa, stay=stay)
        assert abs(slope.item()) < 1e-5
    else:   # a radius this large lets the adversary put all mass on the worst loss: lambda* = 0
        assert lam == 0.0


def test_kl_with_costs_needs_the_stay_option():
    """Transported samples held fixed: costs above r make J decrease for ever in lambda, unless z_i may
    also keep x at no cost; then lambda* is finite and the dual is at least the clean mean loss."""
    losses = _losses(8).detach()
    costs = torch.full_like(losses, 0.5)
    stay = losses - 0.2
    runaway = kl_optimal_lambda(losses, costs, radius=0.1, kappa=0.1)
    assert runaway.item() == pytest.approx(1e6)
    lam = kl_optimal_lambda(losses, costs, radius=0.1, kappa=0.1, stay=stay)
    assert 0 < lam.item() < 1e3
    J, w = kl_dual(losses, costs, lam, radius=0.1, kappa=0.1, stay=stay)
    assert J.item() >= stay.mean().item()
    assert w.sum().item() == pytest.approx(1.0)


def test_kl_dual_at_its_optimum_is_the_worst_case_expectation():
    """Strong duality (kappa = 0): J(lambda*) = sum_i w_i L_i over the tilted w = softmax(L / lambda*),
    which lies exactly on the ball's surface KL(w || uniform) = r."""
    losses = _losses(5).detach()
    zeros = torch.zeros_like(losses)
    for radius in (0.01, 0.1, 0.5):
        lam = kl_optimal_lambda(losses, zeros, radius=radius, kappa=0.0)
        J, w = kl_dual(losses, zeros, lam, radius=radius, kappa=0.0)
        kl = (w * (w * len(w)).log()).sum()
        assert kl.item() == pytest.approx(radius, rel=1e-4)
        assert J.item() == pytest.approx((w * losses).sum().item(), rel=1e-6)
        assert J.item() > losses.mean().item()


def test_kl_small_radius_gives_uniform_weights_and_the_mean_loss():
    losses = _losses(6).detach()
    zeros = torch.zeros_like(losses)
    gaps, entropies = [], []
    for radius in (1e-1, 1e-2, 1e-3, 1e-4, 1e-6):
        lam = kl_optimal_lambda(losses, zeros, radius=radius, kappa=0.1)
        J, w = kl_dual(losses, zeros, lam, radius=radius, kappa=0.1)
        gaps.append(J.item() - losses.mean().item())
        entropies.append(weight_stats(w)[0].item())
    assert all(g > 0 for g in gaps) and gaps == sorted(gaps, reverse=True)
    assert entropies == sorted(entropies)
    # sqrt(2 r Var L) ~ 1.2e-3 at r = 1e-6; weights uniform to within KL(w || u) = r.
    assert gaps[-1] < 3e-3
    assert entropies[-1] == pytest.approx(math.log(32), abs=1e-5)


@pytest.mark.parametrize("armor_cls,base_cls", [(ArmorTrades, Trades), (ArmorMart, Mart), (ArmorPgd, PgdAT)])
def test_armor_kl_with_tiny_radius_is_the_base_method(armor_cls, base_cls, digits, batch, trained_state):
    """r -> 0 (KL, t = 0): uniform weights, and the base method's loss and gradient."""
    x, y = batch
    armor = _method(armor_cls, digits, armor_divergence="kl", armor_radius=1e-6, armor_natural_weight=0.0)
    base = _method(base_cls, digits)
    armor.model.load_state_dict(trained_state)
    base.model.load_state_dict(trained_state)
    torch.manual_seed(0)
    with eval_mode(armor.model):
        x_adv = armor.perturb(x, y)
    loss_a, metrics = armor.loss(x, y, x_adv)
    loss_b, _ = base.loss(x, y, x_adv)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=5e-3)
    assert loss_a.item() >= loss_b.item() - 1e-6   # a worst case is never below the average
    assert metrics["weights_entropy"].item() == pytest.approx(math.log(64), abs=1e-4)
    grad_a = torch.cat([g.flatten() for g in torch.autograd.grad(loss_a, list(armor.model.parameters()))])
    grad_b = torch.cat([g.flatten() for g in torch.autograd.grad(loss_b, list(base.model.parameters()))])
    assert F.cosine_similarity(grad_a, grad_b, dim=0).item() > 0.999


# --------------------------------------------------------------------------------------------------
# Base losses and transport


def test_per_example_base_losses_average_to_the_base_methods(digits, batch, trained_state):
    x, y = batch
    trades, mart = _method(Trades, digits, trades_beta=2.5), _method(Mart, digits, mart_beta=3.0)
    trades.model.load_state_dict(trained_state)
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    with torch.no_grad():
        logits, logits_adv = trades.model(x), trades.model(x_adv)
        per_t = trades_loss_per_example(logits, logits_adv, y, 2.5)
        per_m = mart_loss_per_example(logits, logits_adv, y, 3.0)
    mart.model.load_state_dict(trained_state)
    assert per_t.shape == per_m.shape == (64,) and per_t.std() > 0.01
    torch.testing.assert_close(per_t.mean(), trades.loss(x, y, x_adv)[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(per_m.mean(), mart.loss(x, y, x_adv)[0].detach(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("armor_cls,base_cls", [(ArmorTrades, Trades), (ArmorMart, Mart), (ArmorPgd, PgdAT)])
def test_hard_cost_transport_is_the_base_attack(armor_cls, base_cls, digits, batch, trained_state):
    x, y = batch
    armor, base = _method(armor_cls, digits), _method(base_cls, digits)
    for method in (armor, base):
        method.model.load_state_dict(trained_state)
    outs = []
    for method in (armor, base):
        torch.manual_seed(7)
        with eval_mode(method.model):
            outs.append(method.perturb(x, y))
    assert torch.equal(*outs)
    assert (outs[0] - x).abs().max() > 0


def test_udr_transport_may_leave_the_ball_but_is_capped_and_in_unit_box(digits, batch, trained_state):
    x, y = batch
    threat = ThreatModel("Linf", 0.1, steps=10, step_size=0.05)
    deltas = {}
    for lam in (0.05, 2.0, 1e3):
        method = _method(ArmorPgd, digits, threat=threat, armor_cost="udr", armor_lambda_init=lam)
        method.model.load_state_dict(trained_state)
        torch.manual_seed(0)
        with eval_mode(method.model):
            x_adv = method.perturb(x, y)
        assert x_adv.min() >= 0 and x_adv.max() <= 1
        deltas[lam] = (x_adv - x).abs()
    assert deltas[0.05].max() > threat.eps + 0.02   # small lambda: transported outside the ball...
    assert deltas[0.05].max() <= UDR_CAP * threat.eps + 1e-6   # ...but never past the cap
    # A pixel settles at most tau / lambda outside the ball (tau = 0.25 eps); large lambda is the hard ball.
    for lam in (2.0, 1e3):
        assert deltas[lam].max() <= threat.eps + 0.25 * threat.eps / lam + 1e-6
    assert deltas[0.05].mean() > deltas[2.0].mean()


def test_udr_tau_is_its_own_knob_not_the_attack_step(digits, batch, trained_state):
    """tau = armor_udr_tau * eps whatever the attack step: it bounds how far past the ball a pixel
    settles (tau / lambda) and scales the cost s / tau * 0.5 ||excess||^2."""
    x, y = batch
    lam, excess = 2.0, {}
    for step, tau in ((0.05, 0.25), (0.02, 0.25), (0.05, 1.0)):
        threat = ThreatModel("Linf", 0.1, steps=10, step_size=step)
        method = _method(ArmorPgd, digits, threat=threat, armor_cost="udr", armor_lambda_init=lam, armor_udr_tau=tau)
        method.model.load_state_dict(trained_state)
        torch.manual_seed(0)
        with eval_mode(method.model):
            x_adv = method.perturb(x, y)
        excess[step, tau] = ((x_adv - x).abs() - threat.eps).clamp_min(0)
        assert excess[step, tau].max() <= tau * threat.eps / lam + 1e-6
        _, metrics = method.loss(x, y, x_adv)
        expected = udr_cost(x_adv, x, threat.eps, weight=0.1 / (tau * threat.eps)).mean()
        torch.testing.assert_close(metrics["cost"], expected)
    assert excess[0.05, 1.0].max() > 0.25 * 0.1 / lam   # a larger tau lets pixels further out


def test_udr_cost_is_zero_inside_the_ball_and_quadratic_outside():
    x = torch.full((2, 1, 2, 2), 0.5)
    x_adv = x.clone()
    x_adv[0] += 0.05   # inside eps = 0.1
    x_adv[1, 0, 0, 0] += 0.3   # 0.2 outside
    x_adv[1, 0, 1, 1] -= 0.15   # 0.05 outside
    cost = udr_cost(x_adv, x, 0.1, weight=4.0)
    torch.testing.assert_close(cost, torch.tensor([0.0, 4.0 * 0.5 * (0.2 ** 2 + 0.05 ** 2)]))


def test_udr_needs_linf(digits):
    with pytest.raises(ValueError, match="L-inf"):
        _method(ArmorPgd, digits, threat=ThreatModel("L2", 0.5), armor_cost="udr")


# --------------------------------------------------------------------------------------------------
# The method: config, step, metrics, resume, training


@pytest.mark.parametrize("bad", [{"armor_alpha": 1.0}, {"armor_alpha": 0.5}, {"armor_alpha": -2.0},
                                 {"armor_divergence": "chi2"}, {"armor_cost": "soft"}, {"armor_radius": 0.0},
                                 {"armor_natural_weight": 1.5}, {"armor_lambda_init": 0.0}, {"armor_udr_tau": 0.0}])
def test_config_rejects_invalid_values(bad):
    for cls in (ArmorTrades, ArmorMart, ArmorPgd):
        with pytest.raises(ValueError):
            cls.Config(**bad)


def test_config_defaults_follow_the_code():
    assert ArmorTrades.Config().armor_natural_weight == 0.5 and ArmorTrades.Config().trades_beta == 6.0
    assert ArmorMart.Config().armor_alpha == 10.0 and ArmorMart.Config().armor_nu_init == 1.0
    assert ArmorPgd.Config().armor_alpha == 6.0 and ArmorPgd.Config().armor_cost == "hard"
    # The radius defaults to the code's for each divergence: 0.5 (alpha-div), 0.02 (KL, CIFAR-10).
    assert ArmorTrades.Config().armor_radius == 0.5 and ArmorTrades.Config(armor_divergence="kl").armor_radius == 0.02
    assert ArmorPgd.Config(armor_divergence="kl", armor_radius=0.2).armor_radius == 0.2
    assert ArmorPgd.Config().armor_udr_tau == 0.25   # the code's tau, 2/255 at eps 8/255


@pytest.mark.parametrize("hparams", [{}, {"armor_divergence": "kl", "armor_radius": 0.02},
                                     {"armor_cost": "udr", "armor_natural_weight": 0.5}])
def test_step_metrics(hparams, digits, batch):
    x, y = batch
    method = _method(ArmorPgd, digits, **hparams)
    metrics = method.step(x, y, None)
    expected = {"loss", "J", "base", "lambda", "weights_entropy", "weights_zero_frac", "adv_acc"}
    if "armor_divergence" not in hparams:
        expected.add("nu")
    if "armor_cost" in hparams:
        expected |= {"cost", "natural"}
    assert set(metrics) == expected
    for key, value in metrics.items():
        assert not value.requires_grad, key
        assert value.dim() == 0 and torch.isfinite(value) if key != "adv_acc" else value.tolist()[1] == len(y), key
    assert 0 < metrics["weights_entropy"].item() <= math.log(64) + 1e-5
    assert 0 <= metrics["weights_zero_frac"].item() <= 1 and metrics["lambda"].item() > 0
    if "armor_natural_weight" in hparams:
        torch.testing.assert_close(metrics["loss"], 0.5 * metrics["natural"] + 0.5 * metrics["J"])
    else:
        torch.testing.assert_close(metrics["loss"], metrics["J"])


def test_dual_variables_move_with_their_own_lr(digits, batch):
    x, y = batch
    frozen_duals = _method(ArmorTrades, digits, armor_dual_lr=0.0)
    moving = _method(ArmorTrades, digits, armor_dual_lr=1e-2)
    for _ in range(3):
        frozen_duals.step(x, y, None)
        moving.step(x, y, None)
    assert frozen_duals.dual.lam.item() == pytest.approx(1.0, rel=1e-6)
    assert frozen_duals.dual.nu.item() == pytest.approx(-0.35)
    assert abs(moving.dual.lam.item() - 1.0) > 1e-3 and abs(moving.dual.nu.item() + 0.35) > 1e-3


def test_passes():
    model = nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.3,), std=(0.4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    threat = ThreatModel("Linf", 0.1, steps=10)
    assert ArmorTrades(model, opt, threat).passes() == Trades(model, opt, threat).passes()
    assert ArmorMart(model, opt, threat).passes() == Mart(model, opt, threat).passes() == 12
    assert ArmorPgd(model, opt, threat).passes() == PgdAT(model, opt, threat).passes() == 11
    assert ArmorPgd(model, opt, threat, ArmorPgd.Config(armor_natural_weight=0.5)).passes() == 12


@pytest.mark.parametrize("divergence", ["alpha", "kl"])
def test_state_dict_round_trip_resumes_exactly(divergence, digits):
    train, _ = digits
    hparams = {"armor_divergence": divergence, "armor_dual_lr": 1e-2, "armor_radius": 0.1}
    a = _method(ArmorTrades, digits, **hparams)

    def steps(method, start, n):
        outs = []
        for i in range(start, start + n):
            torch.manual_seed(i)
            outs.append(method.step(train.x[32 * i:32 * (i + 1)], train.y[32 * i:32 * (i + 1)], None))
        return outs

    steps(a, 0, 3)
    saved = copy.deepcopy({"model": a.model.state_dict(), "opt": a.optimizer.state_dict(), "method": a.state_dict()})
    b = _method(ArmorTrades, digits, seed=1, **hparams)
    b.model.load_state_dict(saved["model"])
    b.optimizer.load_state_dict(saved["opt"])
    b.load_state_dict(saved["method"])
    assert torch.equal(a.kl_lambda, b.kl_lambda) and torch.equal(a.dual.rho, b.dual.rho)
    out_a, out_b = steps(a, 3, 2), steps(b, 3, 2)
    for oa, ob in zip(out_a, out_b):
        assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    assert torch.equal(a.dual.rho, b.dual.rho) and torch.equal(a.dual.nu, b.dual.nu)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
    if divergence == "alpha":
        assert a.dual.lam.item() != pytest.approx(1.0, abs=1e-3)   # the duals did move


def test_one_epoch_on_digits_improves_pgd_accuracy(digits):
    train, val = digits
    cfg = TrainConfig(optimizer="adam", lr=2e-3, batch_size=32, epochs=1, attack_steps=5, weight_decay=0.0)
    model = _model(digits)
    optimizer = build_optimizer(model, cfg)
    threat = ThreatModel("Linf", 0.2, steps=cfg.attack_steps)
    run = Run(ArmorTrades(model, optimizer, threat), build_schedule(optimizer, cfg), train, val, cfg)
    before = validate(model, val, threat, cfg)
    reported = []
    fit(run, lambda metrics, _: reported.append(metrics))
    after = validate(model, val, threat, cfg)
    assert after["val/pgd_acc"] > before["val/pgd_acc"] + 0.1, (before, after)
    assert after["val/clean_acc"] > 0.5
    assert math.isfinite(reported[0]["train/J"]) and reported[0]["train/lambda"] > 0
