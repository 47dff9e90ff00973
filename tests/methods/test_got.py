# SPDX-License-Identifier: Apache-2.0
"""GOT: the semi-dual against POT, label matching, beta = 0 against the base methods, resume, and
one epoch of training on digits.
"""
from __future__ import annotations

import copy
import math
from dataclasses import fields

import numpy as np
import ot
import pytest
import torch
import torch.nn.functional as F

from otarena.methods.common import data, nets
from otarena.methods.common.attacks import ThreatModel, eval_mode, pgd
from otarena.methods.common.train import Run, TrainConfig, build_optimizer, build_schedule, fit, validate
from otarena.methods.got import (Got, GotPgdLM, GotPgdS, GotTradesLM, GotTradesS, ground_costs, semi_dual,
                         transport_plan)
from otarena.methods.trades import Trades

VARIANTS = (GotPgdS, GotPgdLM, GotTradesS, GotTradesLM)
THREAT = ThreatModel("Linf", 0.2, steps=3)


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "val")


def _model(digits, seed=0):
    info = digits[0].info
    torch.manual_seed(seed)
    return nets.build("small_cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                      mean=info.mean, std=info.std)


def _method(cls, digits, *, seed=0, optimizer="adam", lr=1e-3, **hparams):
    model = _model(digits, seed)
    opt = build_optimizer(model, TrainConfig(optimizer=optimizer, lr=lr, weight_decay=5e-4))
    return cls(model, opt, THREAT, cls.config_from(hparams))


def _random_problem(seed, n=16, d=8, k=4):
    g = torch.Generator().manual_seed(seed)
    z, z_adv = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)
    logits = 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    logits_adv = 2 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return z, z_adv, logits, logits_adv


# --------------------------------------------------------------------------------------------------
# The OT maths


def test_ground_costs_match_their_definitions():
    z, z_adv, logits, logits_adv = _random_problem(0, n=5)
    p, q = F.softmax(logits, 1), F.softmax(logits_adv, 1)
    for dx, dy in (("cosine", "kl"), ("l2", "l1")):
        cx, cy = ground_costs(z, z_adv, logits, logits_adv, dx=dx, dy=dy)
        assert cx.shape == cy.shape == (5, 5)
        for i in range(5):
            for j in range(5):
                if dx == "cosine":
                    ex = 1 - (z[i] @ z_adv[j]) / (z[i].norm() * z_adv[j].norm())
                else:
                    ex = (z[i] - z_adv[j]).norm()
                ey = (p[i] * (p[i] / q[j]).log()).sum() if dy == "kl" else (p[i] - q[j]).abs().sum()
                assert cx[i, j].item() == pytest.approx(ex.item(), rel=1e-9, abs=1e-12)
                assert cy[i, j].item() == pytest.approx(ey.item(), rel=1e-9, abs=1e-12)
    cx, cy = ground_costs(z, z, logits, logits)   # identical points cost nothing
    torch.testing.assert_close(cx.diagonal(), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(cy.diagonal(), torch.zeros(5, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dx,dy", [("cosine", "kl"), ("l2", "l1")])
@pytest.mark.parametrize("theta", [0.1, 0.5])
def test_semi_dual_at_its_optimum_equals_pot(dx, dy, theta):
    z, z_adv, logits, logits_adv = _random_problem(1)
    cx, cy = ground_costs(z, z_adv, logits, logits_adv, dx=dx, dy=dy)
    cost = 1.0 * cx + cy
    n = cost.shape[0]
    a = b = np.full(n, 1.0 / n)
    plan, log = ot.sinkhorn(a, b, cost.numpy(), theta, method="sinkhorn_log", numItermax=100_000,
                            stopThr=1e-13, log=True)
    # POT minimises <P, C> - reg H(P); on couplings that has the same minimiser as
    # <P, C> + reg KL(P || a b^T), whose value is the semi-dual's maximum.
    pot_value = float((plan * cost.numpy()).sum() + theta * (plan * np.log(plan / np.outer(a, b))).sum())
    assert pot_value > 0.05

    # POT's scaling u gives the potential: P = diag(u) K diag(v), phi = theta log u (+ const).
    phi_pot = theta * torch.from_numpy(log["log_u"])
    assert semi_dual(phi_pot, cost, theta).item() == pytest.approx(pot_value, rel=1e-6)
    implied = transport_plan(phi_pot, cost, theta)
    np.testing.assert_allclose(implied.numpy(), plan, rtol=1e-5, atol=1e-9)
    # The semi-dual is invariant to a constant shift of phi.
    assert semi_dual(phi_pot + 3.0, cost, theta).item() == pytest.approx(pot_value, rel=1e-9)

    # Independently of POT's potentials: maximise over a free phi from zero.
    phi = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([phi], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                              line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = -semi_dual(phi, cost, theta)
        loss.backward()
        return loss

    lbfgs.step(closure)
    best = semi_dual(phi.detach(), cost, theta).item()
    assert best == pytest.approx(pot_value, rel=1e-3)
    np.testing.assert_allclose(transport_plan(phi.detach(), cost, theta).numpy(), plan, rtol=1e-3, atol=1e-6)
    # Weak duality: any other potential gives less.
    for s in range(3):
        other = torch.randn(n, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
        assert semi_dual(other, cost, theta).item() < pot_value
    assert semi_dual(torch.zeros(n, dtype=torch.float64), cost, theta).item() < pot_value - 1e-4


def test_label_matching_never_moves_mass_between_labels():
    z, z_adv, logits, logits_adv = _random_problem(2, n=24)
    cx, cy = ground_costs(z, z_adv, logits, logits_adv)
    cost = cx + cy
    y = torch.arange(24) % 3
    y[-1] = 7   # a class with one member: its column can only keep its own diagonal entry
    mask = y[:, None] == y[None, :]
    phi = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    plan = transport_plan(phi, cost, 0.1, mask)
    assert (plan[~mask] == 0).all()
    assert (plan[mask] > 0).all()
    torch.testing.assert_close(plan.sum(0), torch.full((24,), 1 / 24, dtype=torch.float64))
    assert plan[23, 23].item() == pytest.approx(1 / 24)
    # Masking is the same as an infinite cost across labels.
    blocked = cost.masked_fill(~mask, 1e6)
    assert semi_dual(phi, cost, 0.1, mask).item() == pytest.approx(semi_dual(phi, blocked, 0.1).item(), rel=1e-12)
    # Dropping terms from each column's logsumexp can only raise W (fewer ways to move mass).
    assert semi_dual(phi, cost, 0.1, mask) > semi_dual(phi, cost, 0.1) + 1e-3
    finite = torch.isfinite(torch.autograd.functional.jacobian(lambda p: semi_dual(p, cost, 0.1, mask), phi))
    assert finite.all()


def test_label_matching_method_uses_the_mask(digits):
    train, _ = digits
    x, y = train.x[:48], train.y[:48]
    s, lm = _method(GotPgdS, digits), _method(GotPgdLM, digits)
    lm.model.load_state_dict(s.model.state_dict())
    torch.manual_seed(0)
    s.step(x, y, None)
    torch.manual_seed(0)
    lm.step(x, y, None)
    with torch.no_grad():
        z = lm.model.features(x)
        x_adv = (x + 0.1).clamp(0, 1)
        cx, cy = ground_costs(z, lm.model.features(x_adv), lm.model.head(z), lm.model(x_adv))
        phi = lm.phi(z).squeeze(1)
        plan = transport_plan(phi, cx + cy, lm.cfg.got_theta, y[:, None] == y[None, :])
        _, metrics = lm.loss(x, y, x_adv)
    assert (plan[y[:, None] != y[None, :]] == 0).all()
    assert metrics["ot"].item() == pytest.approx(
        semi_dual(phi, cx + cy, lm.cfg.got_theta, y[:, None] == y[None, :]).item(), rel=1e-5)
    assert not torch.allclose(s.phi.weight, lm.phi.weight)


# --------------------------------------------------------------------------------------------------
# The method


def test_configs_and_search_spaces():
    assert GotPgdS.Config().got_adv_weight == GotPgdLM.Config().got_adv_weight == 1.0
    assert GotTradesS.Config().got_adv_weight == GotTradesLM.Config().got_adv_weight == 6.0
    for cls in VARIANTS:
        assert issubclass(cls, Got) and cls.paper
        own = {f.name: f.default for f in fields(cls.Config)}
        for key, domain in cls.SEARCH_SPACE.items():
            if key in own:
                assert domain.default == own[key] and domain.contains(own[key]), (cls, key)
        assert cls.SEARCH_SPACE["got_beta"].is_valid(0.0)
        assert not cls.SEARCH_SPACE["got_theta"].is_valid(0.0)
        assert cls.SEARCH_SPACE["got_theta"].log and cls.SEARCH_SPACE["got_beta"].contains(10.0)
        assert cls.config_from({"lr": 0.1, "got_beta": 0.0}).got_beta == 0.0
    assert (GotPgdS.base, GotPgdS.label_matching, GotTradesLM.base, GotTradesLM.label_matching) == \
        ("pgd", False, "trades", True)
    with pytest.raises(ValueError):
        GotPgdS.Config(got_dx="cos")


@pytest.mark.parametrize("cls", VARIANTS)
def test_step_metrics_modes_and_phi(cls, digits):
    train, _ = digits
    x, y = train.x[:32], train.y[:32]
    method = _method(cls, digits)
    assert method.phi.in_features == method.model.head.in_features
    assert all(p is not q for p in method.phi.parameters() for g in method.optimizer.param_groups for q in g["params"])
    phi_before = method.phi.weight.detach().clone()
    metrics = method.step(x, y, None)
    assert {"loss", "ot", "ot_dx", "ot_dy", "phi", "adv_acc", "natural", "adv"} <= set(metrics)
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.grad_fn is None, key
        assert value.dim() == 0 and torch.isfinite(value) if key != "adv_acc" else value.tolist()[1] == 32, key
    assert method.model.training
    assert not torch.equal(method.phi.weight, phi_before)   # phi took its ascent steps
    assert metrics["ot_dx"] > 0 and metrics["ot_dy"] >= 0
    # loss() uses phi without updating it, and the model's gradient never reaches phi's weights.
    phi_state = copy.deepcopy(method.phi.state_dict())
    phi_grad = method.phi.weight.grad.clone()   # left by the last ascent step
    loss, _ = method.loss(x, y, x)
    loss.backward()
    assert torch.equal(method.phi.weight.grad, phi_grad)
    assert all(torch.equal(v, method.phi.state_dict()[k]) for k, v in phi_state.items())


def test_ot_term_reaches_the_model(digits):
    """With beta > 0 the OT term's gradient is part of the model's update."""
    train, _ = digits
    x, y = train.x[:32], train.y[:32]
    method = _method(GotTradesS, digits)
    x_adv = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    method.step(x, y, None)   # a non-zero phi
    grads = []
    for beta in (0.0, 10.0):
        m = copy.copy(method)
        m.cfg = GotTradesS.Config(got_beta=beta)
        m.model.zero_grad()
        loss, metrics = m.loss(x, y, x_adv)
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in m.model.parameters()]))
    assert metrics["ot"].abs() > 1e-4
    assert (grads[0] - grads[1]).abs().max() > 1e-6


def test_phi_ascent_approaches_the_optimum(digits):
    """Many phi steps on one batch reach the OT value: a linear phi on D = 128 > B latents can."""
    train, _ = digits
    x, y = train.x[:16], train.y[:16]
    method = _method(GotPgdS, digits, got_phi_lr=1e-2)
    with torch.no_grad():
        z, z_adv = method.model.features(x), method.model.features((x + 0.1).clamp(0, 1))
        logits, logits_adv = method.model.head(z).double(), method.model.head(z_adv).double()
        z, z_adv = z.double(), z_adv.double()
        cx, cy = ground_costs(z, z_adv, logits, logits_adv)
    cost = cx + cy
    method.phi.double()
    method.phi_optimizer = torch.optim.Adam(method.phi.parameters(), lr=1e-2)
    a = np.full(16, 1 / 16)
    plan = ot.sinkhorn(a, a, cost.numpy(), 0.1, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
    optimum = float((plan * cost.numpy()).sum() + 0.1 * (plan * np.log(plan * 256)).sum())
    start = semi_dual(method.phi(z).squeeze(1), cost, 0.1).item()
    for _ in range(400):
        method._fit_phi(z, cost, None)
    end = semi_dual(method.phi(z).squeeze(1), cost, 0.1).item()
    assert start < end <= optimum + 1e-9
    assert (optimum - end) < 0.05 * (optimum - start)


def test_beta_zero_trades_equals_trades_step_for_step(digits):
    train, _ = digits
    hp = dict(optimizer="sgd", lr=0.05)
    got = _method(GotTradesLM, digits, got_beta=0.0, got_adv_weight=6.0, **hp)
    trades = _method(Trades, digits, trades_beta=6.0, **hp)
    for i in range(3):
        x, y = train.x[32 * i:32 * (i + 1)], train.y[32 * i:32 * (i + 1)]
        torch.manual_seed(i)
        out_g = got.step(x, y, None)
        torch.manual_seed(i)
        out_t = trades.step(x, y, None)
        torch.testing.assert_close(out_g["loss"], out_t["loss"], rtol=0, atol=1e-6)
        assert out_g["ot"] != 0   # the OT term was computed, only weighted by zero
    for (n, p), q in zip(got.model.named_parameters(), trades.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    moved = _model(digits)
    assert sum((p - q).abs().sum().item() for p, q in zip(moved.parameters(), got.model.parameters())) > 1e-3


def _pgd_reference_step(model, optimizer, x, y, alpha):
    """Eq. (3) without the OT term: alpha CE(f(x'), y) + CE(f(x), y), x' = PGD on CE."""
    with eval_mode(model):
        x_adv = pgd(model, x, y, eps=THREAT.eps, norm=THREAT.norm, steps=THREAT.steps, step_size=THREAT.step_size)
    model.train()
    loss = alpha * F.cross_entropy(model(x_adv), y) + F.cross_entropy(model(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


@pytest.mark.parametrize("beta,same", [(0.0, True), (10.0, False)])
def test_beta_zero_pgd_equals_eq3_step_for_step(digits, beta, same):
    train, _ = digits
    got = _method(GotPgdS, digits, got_beta=beta, got_adv_weight=3.0)
    model = _model(digits)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adam", lr=1e-3, weight_decay=5e-4))
    for i in range(3):
        x, y = train.x[32 * i:32 * (i + 1)], train.y[32 * i:32 * (i + 1)]
        torch.manual_seed(i)
        out = got.step(x, y, None)
        torch.manual_seed(i)
        ref = _pgd_reference_step(model, optimizer, x, y, 3.0)
        if same:
            torch.testing.assert_close(out["loss"], ref, rtol=0, atol=1e-6)
    close = all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(got.model.parameters(), model.parameters()))
    assert close == same


def test_state_dict_round_trip_resumes_exactly(digits):
    train, _ = digits
    a = _method(GotTradesS, digits)
    for i in range(3):
        a.step(train.x[32 * i:32 * (i + 1)], train.y[32 * i:32 * (i + 1)], None)
    state = copy.deepcopy({"model": a.model.state_dict(), "opt": a.optimizer.state_dict(), "method": a.state_dict()})
    b = _method(GotTradesS, digits, seed=1)
    b.model.load_state_dict(state["model"])
    b.optimizer.load_state_dict(state["opt"])
    assert not torch.equal(a.phi.weight, b.phi.weight)
    b.load_state_dict(state["method"])
    torch.testing.assert_close(b.phi.weight, a.phi.weight, rtol=0, atol=0)
    torch.testing.assert_close(b.phi.bias, a.phi.bias, rtol=0, atol=0)
    sa, sb = a.phi_optimizer.state_dict(), b.phi_optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)
    x, y = train.x[96:128], train.y[96:128]
    torch.manual_seed(5)
    a.step(x, y, None)
    torch.manual_seed(5)
    b.step(x, y, None)
    assert torch.equal(a.phi.weight, b.phi.weight)
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


# --------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("cls", VARIANTS)
def test_one_epoch_improves_val_pgd(cls, digits):
    """Built as ``methods.build_run`` does. beta = 0.3, not the paper's 10: from scratch at beta = 10
    the OT term wins over the cross-entropy in the first epoch and collapses the latents (clean and
    adversarial latents coincide, W -> 0, accuracy at chance); see the module docstring."""
    train, val = digits
    cfg = TrainConfig(epochs=1, batch_size=32, lr=2e-3, optimizer="adam", weight_decay=0.0,
                      attack_steps=5, val_pgd_steps=5, seed=0)
    torch.manual_seed(cfg.seed)
    info = train.info
    model = nets.build("small_cnn", in_channels=info.in_channels, num_classes=info.num_classes,
                       mean=info.mean, std=info.std)
    optimizer = build_optimizer(model, cfg)
    threat = ThreatModel("Linf", 0.2, steps=cfg.attack_steps)
    method = cls(model, optimizer, threat, cls.config_from({"got_beta": 0.3}))
    run = Run(method, build_schedule(optimizer, cfg), train, val, cfg)
    before = validate(model, val, threat, cfg)
    seen = []
    fit(run, lambda metrics, _: seen.append(metrics))
    after = seen[-1]
    for key in ("train/loss", "train/ot", "train/ot_dx", "train/ot_dy", "train/phi"):
        assert math.isfinite(after[key]), key
    assert after["train/ot_dx"] > 0.01   # no collapse
    assert after["val/pgd_acc"] > before["val/pgd_acc"] + 0.07, (before, after)
    assert after["val/clean_acc"] > 0.6, after
