# SPDX-License-Identifier: Apache-2.0
"""Every registered method on a fixed batch of 64 digits (torchattacks-style),
then the closed-form identities of TRADES and MART.
"""
from __future__ import annotations

import ast
import math
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from otarena import methods
from otarena.methods.common.attacks import ThreatModel, eval_mode
from otarena.methods.common.functional import boosted_ce, kl_per_example
from otarena.methods.common.train import TRAIN_SPACE, TrainConfig

NAMES = sorted(methods.REGISTRY)
THREATS = {"Linf": ThreatModel("Linf", 0.1), "L2": ThreatModel("L2", 0.5)}

CLEAN_INPUT = {"erm", "ot_mdr", "hkr"}
"""Methods that train on clean inputs (no inner maximization over x)."""


@pytest.fixture(scope="module")
def digits():
    return methods.data.load("digits", "train"), methods.data.load("digits", "val")


@pytest.fixture(scope="module")
def batch(digits):
    train, _ = digits
    return train.x[:64], train.y[:64], torch.arange(64)


def _arch(name):
    """The first architecture a method declares (HKR needs a Lipschitz net), else the small CNN."""
    cls = methods.REGISTRY[name]
    return cls.archs[0] if cls.archs else "small_cnn"


def _threat(name, norm=None):
    """``THREATS[norm]`` (L-inf by default); a method declaring a ``norm`` only runs under that one."""
    declared = methods.REGISTRY[name].norm
    if declared and norm and norm != declared:
        pytest.skip(f"{name} is defined for {declared} only")
    return THREATS[declared or norm or "Linf"]


def _run(name, digits, *, threat=None, **hparams):
    train, val = digits
    hparams = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0, "attack_steps": 3, **hparams}
    return methods.build_run(name, hparams, dataset="digits", arch=_arch(name),
                             threat=threat if threat is not None else _threat(name),
                             train=train, val=val, device="cpu")


@pytest.fixture(scope="module")
def trained_state(digits):
    """Weights of a net trained for a few steps: unlike a fresh one, its outputs depend on the input,
    so KL terms are large enough that a wrong weight on them shows."""
    train, _ = digits
    erm = _run("erm", digits, lr=3e-3).method
    for i in range(40):
        sl = slice(64 * (i % 8), 64 * (i % 8 + 1))
        erm.step(train.x[sl], train.y[sl], None)
    return {k: v.clone() for k, v in erm.model.state_dict().items()}


def _trained(method, state):
    method.model.load_state_dict(state)
    return method


def _objective(method, x, y, seed=0):
    """The method's own loss on (x, y), with the attack's randomness pinned by ``seed``."""
    torch.manual_seed(seed)
    with eval_mode(method.model):
        x_adv = method.perturb(x, y)
    with torch.no_grad():
        loss, _ = method.loss(x, y, x_adv)
    return loss.item()


# --------------------------------------------------------------------------------------------------
# The Method contract, for every registered method


@pytest.mark.parametrize("name", NAMES)
def test_step_lowers_its_own_loss(name, digits, batch):
    x, y, idx = batch
    method = _run(name, digits).method
    before = _objective(method, x, y)
    for i in range(10):
        torch.manual_seed(100 + i)
        method.step(x, y, idx)
    after = _objective(method, x, y)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 0.02, (before, after)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", sorted(THREATS))
def test_step_metrics_and_gradients(name, norm, digits, batch):
    x, y, idx = batch
    method = _run(name, digits, threat=_threat(name, norm)).method
    params = {n: p.detach().clone() for n, p in method.model.named_parameters()}
    metrics = method.step(x, y, idx)
    assert "loss" in metrics
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor), (key, value)
        assert not value.requires_grad and value.grad_fn is None, key
        if value.is_floating_point():
            assert value.dim() == 0 and torch.isfinite(value), (key, value)
        else:   # an accuracy: the (hits, n) pair of the examples this step trained on
            hit, n = value.tolist()
            assert key.endswith("acc") and 0 <= hit <= n and n % len(y) == 0, (key, value)
    assert method.model.training   # step owns the mode: it trains
    for n, p in method.model.named_parameters():
        assert p.requires_grad, n
        assert p.grad is not None, f"{name}: the loss does not reach {n}"
        assert torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, f"{name}: zero gradient for {n}"
        assert not torch.equal(p.detach(), params[n]), f"{name}: {n} was not updated"


@pytest.mark.parametrize("name", NAMES)
def test_loss_metrics_are_detached(name, digits, batch):
    x, y, _ = batch
    method = _run(name, digits).method
    with eval_mode(method.model):
        x_adv = method.perturb(x, y)
    loss, metrics = method.loss(x, y, x_adv)
    assert loss.dim() == 0 and loss.requires_grad and torch.isfinite(loss)
    for key, value in metrics.items():
        assert not (isinstance(value, torch.Tensor) and value.requires_grad), key


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("norm", sorted(THREATS))
def test_perturb_stays_in_ball(name, norm, digits, batch):
    x, y, _ = batch
    threat = _threat(name, norm)
    method = _run(name, digits, threat=threat, attack_step_size=1.0).method   # huge steps test projection
    with eval_mode(method.model):
        x_adv = method.perturb(x, y)
    assert x_adv.shape == x.shape and torch.isfinite(x_adv).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":
        assert delta.abs().max().item() <= threat.eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= threat.eps + 1e-5
    if name not in CLEAN_INPUT:
        assert delta.abs().max() > 0, f"{name} did not perturb"
        assert all(p.grad is None for p in method.model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_search_space_matches_config(name):
    cls = methods.REGISTRY[name]
    resolved = cls.Config()   # a None default may be resolved from other fields (ARMOR's radius)
    own = {f.name: getattr(resolved, f.name) for f in fields(cls.Config)}
    shared = {f.name: f.default for f in fields(TrainConfig)}
    assert not set(own) & set(shared), "method fields must not shadow the shared knobs"
    for key, domain in cls.SEARCH_SPACE.items():
        assert key in own or key in shared, f"{name}: SEARCH_SPACE key {key!r} is not a config field"
        assert domain.contains(domain.default), (key, domain)
        default = own[key] if key in own else shared[key]
        assert domain.contains(default), f"{name}: {key} default {default!r} outside {domain}"
        assert domain.default == default, f"{name}: {key} domain default {domain.default!r} != {default!r}"
    for key, domain in TRAIN_SPACE.items():   # a None default is derived (attack_step_size: 2.5 eps / K)
        assert key in shared and (shared[key] is None or domain.contains(shared[key])), key


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry(name):
    cls = methods.REGISTRY[name]
    assert issubclass(cls, methods.Method)
    assert methods.get(name) is cls
    assert cls.paper
    assert cls.config_from({"lr": 0.1, "epochs": 3}) == cls.Config()   # shared knobs are ignored
    for key in cls.SEARCH_SPACE:
        assert key in methods.hyperparameters(name)
    assert cls.norm in (None, "Linf", "L2")


COMPOSES = {"ot_mdr": {"erm", "pgd_at", "trades"}}
"""Method files that import a base method on purpose: OT-MDR runs its base method's attack and loss."""


def test_method_files_import_only_common():
    """Shared maths live in ``methods/common``: a method file imports another one only to compose it."""
    package = Path(methods.__file__).parent
    offenders = {}
    for path in sorted(package.glob("*.py")):
        if path.stem in ("__init__", "space"):
            continue
        modules = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "methods":   # from methods import trades
                modules.update(f"methods.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                modules.add(node.module)
            elif isinstance(node, ast.Import):
                modules.update(alias.name for alias in node.names)
        others = {m.split(".")[1] for m in modules if m.startswith("methods.")} - {"common", "space"}
        if others - COMPOSES.get(path.stem, set()):
            offenders[path.name] = sorted(others)
    assert not offenders, offenders


def test_erm_loss_is_clean_ce(digits, batch):
    x, y, _ = batch
    method = _run("erm", digits).method
    loss, metrics = method.loss(x, y, torch.rand_like(x))   # x_adv is ignored
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), F.cross_entropy(method.model(x), y))
    assert metrics == {}


def test_pgd_at_loss_is_ce_on_x_adv(digits, batch, trained_state):
    x, y, _ = batch
    method = _trained(_run("pgd_at", digits).method, trained_state)
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    loss, metrics = method.loss(x, y, x_adv)
    with torch.no_grad():
        logits_adv = method.model(x_adv)
        torch.testing.assert_close(loss.detach(), F.cross_entropy(logits_adv, y))
        assert metrics["adv_acc"].tolist() == [int((logits_adv.argmax(1) == y).sum()), len(y)]


# --------------------------------------------------------------------------------------------------
# TRADES


def test_trades_beta_zero_equals_erm_step_for_step(digits):
    train, _ = digits
    hp = {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "trades_beta": 0.0}
    trades = _run("trades", digits, **hp).method
    erm = _run("erm", digits, **hp).method
    assert trades.cfg.trades_beta == 0.0
    for p, q in zip(trades.model.parameters(), erm.model.parameters()):
        assert torch.equal(p, q)   # build_run seeds the init
    for i in range(6):
        sl = slice(32 * i, 32 * (i + 1))
        x, y = train.x[sl], train.y[sl]
        out_t = trades.step(x, y, None)
        out_e = erm.step(x, y, None)
        torch.testing.assert_close(out_t["natural"], out_e["loss"], rtol=0, atol=1e-6)
        torch.testing.assert_close(out_t["loss"], out_e["loss"], rtol=0, atol=1e-6)
    for (n, p), q in zip(trades.model.named_parameters(), erm.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=n)
    init = _run("erm", digits, **hp).model   # the same seeded init: training did move the weights
    assert sum((p - q).abs().sum().item() for p, q in zip(init.parameters(), erm.model.parameters())) > 1e-3


def test_trades_beta_changes_the_update(digits, batch):
    """Control for the test above: with beta > 0 the KL term does move the weights differently."""
    x, y, idx = batch
    a = _run("trades", digits, trades_beta=0.0).method
    b = _run("trades", digits, trades_beta=6.0).method
    torch.manual_seed(0)
    a.step(x, y, idx)
    torch.manual_seed(0)
    b.step(x, y, idx)
    assert any(not torch.allclose(p, q, atol=1e-6) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_kl_per_example_matches_manual_sum():
    g = torch.Generator().manual_seed(0)
    p = F.softmax(torch.randn(5, 4, generator=g), 1)
    q = F.softmax(torch.randn(5, 4, generator=g) * 3, 1)
    manual = torch.tensor([sum(p[i, k].item() * (math.log(p[i, k].item()) - math.log(q[i, k].item()))
                               for k in range(4)) for i in range(5)])
    got = kl_per_example(q.log(), p)
    assert got.shape == (5,)
    torch.testing.assert_close(got, manual, rtol=1e-5, atol=1e-6)
    assert (got > 0).all()
    torch.testing.assert_close(kl_per_example(p.log(), p), torch.zeros(5), rtol=0, atol=1e-6)


def test_kl_per_example_hand_worked():
    # KL([0.5, 0.5] || [0.9, 0.1]) = 0.5 log(0.5/0.9) + 0.5 log(0.5/0.1) = 0.5 log(25/9)
    got = kl_per_example(torch.tensor([[0.9, 0.1]]).log(), torch.tensor([[0.5, 0.5]]))
    assert got.item() == pytest.approx(0.5 * math.log(25 / 9), rel=1e-6)


def test_trades_loss_is_ce_when_x_adv_is_x(digits, batch):
    x, y, _ = batch
    method = _run("trades", digits, trades_beta=6.0).method
    loss, metrics = method.loss(x, y, x)
    with torch.no_grad():
        ce = F.cross_entropy(method.model(x), y)
    torch.testing.assert_close(loss.detach(), ce, rtol=0, atol=1e-5)
    assert abs(metrics["kl"].item()) < 1e-6


def test_trades_loss_formula(digits, batch, trained_state):
    x, y, _ = batch
    method = _trained(_run("trades", digits, trades_beta=2.5).method, trained_state)
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    loss, metrics = method.loss(x, y, x_adv)
    with torch.no_grad():
        p = F.softmax(method.model(x), 1)
        q = F.softmax(method.model(x_adv), 1)
        kl = (p * (p.log() - q.log())).sum(1).mean()
        expected = F.cross_entropy(method.model(x), y) + 2.5 * kl
    assert kl > 0.01   # large enough that a wrong weight on it shows
    torch.testing.assert_close(metrics["kl"], kl, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["natural"], F.cross_entropy(method.model(x), y).detach())
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# MART


def _softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("logits,label", [([2.0, 1.0, 0.0], 0), ([2.0, 1.0, 0.0], 2), ([0.5, 3.0, -1.0], 1)])
def test_mart_boosted_ce_hand_worked(logits, label):
    p = _softmax(logits)
    wrong = max(p[k] for k in range(3) if k != label)
    # Eq. (6): -log p_y(x') - log(1 - max_{k != y} p_k(x')), with the official code's 1.0001 guard.
    expected = -math.log(p[label]) - math.log(1.0001 - wrong + 1e-12)
    got = boosted_ce(torch.tensor([logits]), torch.tensor([label]))
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(-math.log(p[label]) - math.log(1 - wrong), abs=1e-3)


def test_mart_boosted_ce_first_example_by_hand():
    # logits (2, 1, 0): p = (e^2, e, 1) / (e^2 + e + 1) = (0.66524, 0.24473, 0.09003).
    # y = 0: CE = -log 0.66524 = 0.40761; the top wrong class is 1, -log(1.0001 - 0.24473) = 0.28055.
    got = boosted_ce(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0])).item()
    assert got == pytest.approx(0.40761 + 0.28055, abs=2e-5)


def test_mart_boosted_ce_batch_and_gradient():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 5.0]], requires_grad=True)
    y = torch.tensor([0, 2])
    got = boosted_ce(logits, y)
    assert got.shape == (2,)
    # The margin term punishes the top wrong class: its logit's gradient exceeds plain CE's.
    got.sum().backward()
    ce_grad, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), logits)
    assert logits.grad[0, 1] > ce_grad[0, 1] > 0


def test_mart_loss_formula(digits, batch, trained_state):
    x, y, _ = batch
    method = _trained(_run("mart", digits, mart_beta=3.0).method, trained_state)
    x_adv = (x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    loss, metrics = method.loss(x, y, x_adv)
    with torch.no_grad():
        p = F.softmax(method.model(x), 1)
        logits_adv = method.model(x_adv)
        q = F.softmax(logits_adv, 1)
        kl = (p * (p.log() - q.log())).sum(1)
        weighted = (kl * (1 - p.gather(1, y[:, None]).squeeze(1))).mean()
        expected = boosted_ce(logits_adv, y).mean() + 3.0 * weighted
    assert weighted > 0.01   # large enough that a wrong weight on it shows
    torch.testing.assert_close(metrics["kl"], weighted, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(metrics["bce"], boosted_ce(logits_adv, y).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    loss_clean, metrics_clean = method.loss(x, y, x)
    assert abs(metrics_clean["kl"].item()) < 1e-6
