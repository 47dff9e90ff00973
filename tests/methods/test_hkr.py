# SPDX-License-Identifier: Apache-2.0
"""HKR: the loss against deel-torchlip, the Lipschitz architectures, bounds and certificates.

The certificate tests train ``lipschitz_small`` on digits for a few epochs and check the certificate
against attacks: no radius may exceed the distance to an adversarial example found by a strong
L2 attack, and no certified point may be broken by PGD or APGD.
"""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn as nn
from deel import torchlip

from otarena import methods
from otarena.methods.common import lipschitz
from otarena.methods.common.attacks import ThreatModel, pgd
from otarena.methods.common.certify import (UncertifiableError, certified_accuracy, certified_radius, certify)
from otarena.methods.common.lipschitz import export, lipschitz_bound, lipschitz_estimate, operator_norm
from otarena.methods.common.train import Run, TrainConfig, build_optimizer, build_schedule, fit, validate
from otarena.methods.hkr import SEARCH_SPACE, Config, Hkr, hkr_loss, hkr_terms

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def digits():
    return tuple(methods.data.load("digits", split) for split in ("train", "val", "test"))


def _hkr_run(digits, *, epochs, seed=0, **hparams):
    """A run built as ``methods.build_run`` builds one (the arch is not in ``nets.ARCHS`` yet)."""
    train, val, _ = digits
    hparams = {"epochs": epochs, "batch_size": 32, "lr": 5e-3, "optimizer": "adam", "weight_decay": 0.0,
               "schedule": "constant", "val_pgd_steps": 5, "seed": seed, **hparams}
    cfg = TrainConfig.from_hparams(hparams)
    torch.manual_seed(cfg.seed)
    info = train.info
    model = lipschitz.lipschitz_small(info.in_channels, info.num_classes, info.mean, info.std)
    optimizer = build_optimizer(model, cfg)
    threat = ThreatModel("L2", 0.5, steps=cfg.attack_steps, step_size=cfg.attack_step_size)
    method = Hkr(model, optimizer, threat, Hkr.config_from(hparams))
    return Run(method, build_schedule(optimizer, cfg), train, val, cfg)


@pytest.fixture(scope="module")
def trained(digits):
    """The exported net after 5 epochs of HKR (about 95% clean accuracy on digits)."""
    run = fit(_hkr_run(digits, epochs=5))
    return run.model, export(run.model)


@pytest.fixture(scope="module")
def correct_points(digits, trained):
    """The first 30 test points the trained net classifies correctly."""
    _, _, test = digits
    _, net = trained
    with torch.no_grad():
        ok = net(test.x).argmax(1) == test.y
    assert ok.float().mean() > 0.85
    return test.x[ok][:30], test.y[ok][:30]


def _margin_loss(logits, y):
    """max_{k != y} f_k - f_y: ascending it reaches the decision boundary directly."""
    return logits.scatter(1, y[:, None], -math.inf).max(1).values - logits.gather(1, y[:, None]).squeeze(1)


# --------------------------------------------------------------------------------------------------
# The loss


def _random_problem(seed, n=48, k=10, classes=10):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=g, dtype=torch.float64) * 0.5
    y = torch.randint(0, classes, (n,), generator=g)
    return logits, y


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99, 0.999, 1.0])
@pytest.mark.parametrize("margin", [0.1, 0.25, 1.0])
@pytest.mark.parametrize("classes", [10, 7])   # 7: classes 7-9 absent from the batch
def test_loss_equals_deel_torchlip(alpha, margin, classes):
    logits, y = _random_problem(int(alpha * 1000 + margin * 10 + classes), classes=classes)
    logits.requires_grad_(True)
    onehot = torch.nn.functional.one_hot(y, 10).to(logits.dtype)
    reference = torchlip.HKRMulticlassLoss(alpha=alpha, min_margin=margin)(logits, onehot)
    ours = hkr_loss(logits, y, alpha, margin)
    torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
    grad_ours, = torch.autograd.grad(ours, logits)
    grad_ref, = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-10, atol=1e-12)
    # Per example, against the library's hinge and KR terms.
    hinge, kr = hkr_terms(logits.detach(), y, margin)
    torch.testing.assert_close(hinge, torchlip.functional.hinge_multiclass_loss(logits.detach(), onehot, margin))
    torch.testing.assert_close(kr, torchlip.functional.kr_loss(logits.detach(), onehot))
    assert abs(reference.item()) > 1e-3 or alpha == 0.0   # not a trivial zero


def test_loss_terms_by_hand():
    # K = 3, two examples of class 0 and one of class 2; margin 1 (each side 0.5).
    logits = torch.tensor([[1.0, 0.0, -1.0], [0.2, 0.4, 0.0], [0.0, -0.6, 0.3]])
    y = torch.tensor([0, 0, 2])
    hinge, kr = hkr_terms(logits, y, 1.0)
    # Example 1: true class weight K - 1 = 2: 2*relu(0.5 - 1) + relu(0.5 + 0) + relu(0.5 - 1) = 0.5, /3.
    # Example 2: 2*relu(0.5 - 0.2) + relu(0.5 + 0.4) + relu(0.5 + 0) = 0.6 + 0.9 + 0.5 = 2.0, /3.
    # Example 3: relu(0.5 + 0) + relu(0.5 - 0.6) + 2*relu(0.5 - 0.3) = 0.5 + 0 + 0.4 = 0.9, /3.
    torch.testing.assert_close(hinge, torch.tensor([0.5, 2.0, 0.9]) / 3)
    # KR per class: k=0: mean(1, 0.2) - 0 = 0.6; k=1: absent, -mean(0, 0.4, -0.6) = 0.0667;
    # k=2: 0.3 - mean(-1, 0) = 0.8. KR = (0.6 + 0.0667 + 0.8) / 3.
    assert kr.mean().item() == pytest.approx((0.6 + 0.2 / 3 + 0.8) / 3, rel=1e-6)


@pytest.mark.parametrize("alpha_paper,margin_paper", [(10.0, 1.0), (100.0, 0.25), (1000.0, 0.05)])
def test_paper_convention_converts_as_documented(alpha_paper, margin_paper):
    """L_paper = -KR + a HIN with hinge (m - s f)_+ equals (1 + a) L_v1 at a / (1 + a) and 2 m."""
    logits, y = _random_problem(3)
    onehot = torch.nn.functional.one_hot(y, 10).to(logits.dtype)
    sign = 2 * onehot - 1
    weight = 1 + 8 * onehot
    hin_paper = (torch.relu(margin_paper - sign * logits) * weight).mean()
    kr = torchlip.functional.kr_loss(logits, onehot).mean()
    paper = -kr + alpha_paper * hin_paper
    v1 = hkr_loss(logits, y, alpha_paper / (1 + alpha_paper), 2 * margin_paper)
    assert (1 + alpha_paper) * v1.item() == pytest.approx(paper.item(), rel=1e-10)


def test_config_and_search_space():
    assert Config() == Config(hkr_alpha=99.0, hkr_margin=0.25)
    with pytest.raises(ValueError, match=r"is 99 here"):   # 0.99 / 0.01: the message gives the conversion
        Config(hkr_alpha=0.99)
    for bad in (dict(hkr_alpha=-0.1), dict(hkr_alpha=0.0), dict(hkr_margin=0.0), dict(hkr_margin=11.0)):
        with pytest.raises(ValueError):
            Config(**bad)
    alpha = SEARCH_SPACE["hkr_alpha"]
    assert alpha.log and alpha.contains(99.0) and alpha.contains(10.0) and alpha.contains(1000.0)
    assert not alpha.is_valid(0.99)
    assert SEARCH_SPACE["hkr_margin"].contains(0.25) and not SEARCH_SPACE["hkr_margin"].is_valid(0.0)
    assert (Hkr.archs, Hkr.certified, Hkr.norm) == (("lipschitz_small", "lipschitz_cifar"), True, "L2")
    assert methods.Method.archs is None and methods.Method.certified is False


def test_loss_has_no_attack_and_reaches_every_parameter(digits):
    run = _hkr_run(digits, epochs=1)
    train = digits[0]
    x, y = train.x[:64], train.y[:64]
    assert torch.equal(run.method.perturb(x, y), x)
    assert run.method.passes() == 1.0
    loss, metrics = run.method.loss(x, y, x)
    loss.backward()
    with torch.no_grad():
        expected = hkr_loss(run.model(x), y, 0.99, 0.25)
    torch.testing.assert_close(loss.detach(), expected)
    assert set(metrics) == {"hinge", "kr", "acc"}
    for name, p in run.model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


# --------------------------------------------------------------------------------------------------
# Architectures, export and bounds


def test_architectures_fit_the_classifier_contract(digits):
    info = digits[0].info
    model = lipschitz.lipschitz_small(1, 10, info.mean, info.std)
    assert isinstance(model, methods.nets.Classifier)
    torch.testing.assert_close(model.std.flatten(), torch.ones(1))   # no division by std
    torch.testing.assert_close(model.mean.flatten(), torch.tensor(info.mean))
    for size in (8, 28):
        x = torch.rand(3, 1, size, size)
        assert model.features(x).shape == (3, model.head.in_features)
        assert model(x).shape == (3, 10)
    cifar = lipschitz.lipschitz_cifar(3, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    x = torch.rand(2, 3, 32, 32)
    assert cifar.features(x).shape == (2, cifar.head.in_features) and cifar(x).shape == (2, 10)
    cifar.eval()
    torch.testing.assert_close(export(cifar)(x), cifar(x))


def test_export_is_plain_torch_and_a_copy(digits, trained):
    model, net = trained
    x = digits[2].x[:50]
    model.train()
    again = export(model)
    assert model.training   # export left the mode alone
    assert not any(hasattr(m, "parametrizations") for m in again.modules())
    assert {type(m) for m in again.body if isinstance(m, (nn.Conv2d, nn.Linear))} == {nn.Conv2d, nn.Linear}
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
        again.head.weight.mul_(2)
        torch.testing.assert_close(net(x), model(x), rtol=0, atol=0)   # the model did not change
    model.train()


def test_state_dict_round_trip_keeps_the_function(digits, trained):
    """Checkpoints (and the loop's best-epoch copy) carry the normalizers' cached weights."""
    model, net = trained
    info = digits[0].info
    fresh = lipschitz.lipschitz_small(1, 10, info.mean, info.std)
    fresh.load_state_dict({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
    x = digits[2].x[:50]
    with torch.no_grad():
        torch.testing.assert_close(export(fresh)(x), net(x), rtol=0, atol=0)
        assert not torch.allclose(export(lipschitz.lipschitz_small(1, 10, info.mean, info.std))(x), net(x))


@pytest.mark.parametrize("shape,stride", [((2, 5, 5), 1), ((2, 9, 7), 1), ((3, 8, 8), 2)])
def test_operator_norm_of_a_conv_is_its_exact_spectral_norm(shape, stride):
    g = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(shape[0], 4, 3, stride=stride, padding=1).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g))
    matrix = torch.autograd.functional.jacobian(conv, torch.zeros((1, *shape), dtype=torch.float64))
    exact = torch.linalg.matrix_norm(matrix.reshape(-1, math.prod(shape)), ord=2).item()
    assert operator_norm(conv, shape) == pytest.approx(exact, rel=1e-5)
    # The input size matters through the zero padding: a bigger input has a bigger norm.
    bigger = (shape[0], shape[1] * 2, shape[2] * 2)
    assert operator_norm(conv, bigger) > exact * (1 + 1e-4)


def test_pooling_and_activation_constants():
    x = torch.randn(20, 4, 6, 6, dtype=torch.float64)
    d = torch.randn(20, 4, 6, 6, dtype=torch.float64) * 1e-2
    for layer in (torchlip.GroupSort2(), nn.LPPool2d(2, 2), torchlip.ScaledAdaptiveAvgPool2d((1, 1))):
        norms = lipschitz.layer_norms(nn.Sequential(layer), (4, 6, 6))
        assert norms[0][1] == pytest.approx(1.0, abs=1e-6), (layer, norms)
        ratio = (layer(x + d) - layer(x)).flatten(1).norm(dim=1) / d.flatten(1).norm(dim=1)
        assert ratio.max().item() <= 1 + 1e-9
    assert operator_norm(nn.AvgPool2d(2), (1, 4, 4)) == pytest.approx(0.5, rel=1e-6)   # 1 / sqrt(4)
    with pytest.raises(lipschitz.UnsupportedLayerError):
        lipschitz_bound(nn.Sequential(nn.Flatten(), nn.Linear(4, 2), nn.Softplus()), (1, 2, 2))
    with pytest.raises(lipschitz.UnsupportedLayerError):
        lipschitz_bound(nn.Sequential(nn.LPPool2d(2, 3, stride=1)), (1, 6, 6))   # overlapping windows


def test_trained_net_is_one_lipschitz(digits, trained):
    _, net = trained
    x = digits[2].x[:128]
    bound = lipschitz_bound(net, (1, 8, 8))
    estimate = lipschitz_estimate(net, x)
    assert bound <= 1 + TOLERANCE
    assert estimate <= 1 + TOLERANCE
    assert 0.1 < estimate <= bound + 1e-6   # a lower bound, and a non-trivial one
    # The library's own Jacobian estimate agrees with ours.
    ref = torchlip.utils.evaluate_lip_const(net, x[:16], evaluation_type="jacobian_norm")
    assert lipschitz_estimate(net, x[:16]) == pytest.approx(ref, rel=1e-4)


def test_certify_refuses_nets_that_are_not_one_lipschitz(digits, trained):
    _, net = trained
    test = digits[2]
    x, y = test.x[:64], test.y[:64]
    result = certify(net, x, y, [0.1])
    assert result["lipschitz"] == max(result["lipschitz_bound"], 1.0)
    assert result["lipschitz_bound"] <= 1 + TOLERANCE
    # A plain CNN, with its 1/std normalization.
    info = test.info
    cnn = methods.nets.build("small_cnn", in_channels=1, num_classes=10, mean=info.mean, std=info.std)
    with pytest.raises(UncertifiableError) as err:
        certify(cnn, x, y, [0.1])
    assert err.value.bound > 1 + TOLERANCE
    # One layer scaled by 2: the bound doubles, and the certificate is refused.
    doubled = copy.deepcopy(net)
    with torch.no_grad():
        doubled.head.weight.mul_(2)
    assert lipschitz_bound(doubled, (1, 8, 8)) == pytest.approx(2 * result["lipschitz_bound"], rel=1e-6)
    with pytest.raises(UncertifiableError, match="exceeds"):
        certify(doubled, x, y, [0.1])
    # A layer with no known bound.
    with pytest.raises(UncertifiableError, match="cannot bound"):
        certify(nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.Softplus()), x, y, [0.1])


# --------------------------------------------------------------------------------------------------
# Certificates


def _linear(weight):
    model = nn.Sequential(nn.Flatten(), nn.Linear(weight.shape[1], weight.shape[0], bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight)
    return model


def test_divisor_sqrt2_and_2_as_documented():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 1, 2, 2, generator=g)
    y = torch.randint(0, 3, (40,), generator=g)
    # Orthonormal rows: the whole map is 1-Lipschitz, and M / sqrt(2) is exactly the distance to
    # the nearest decision boundary, min_k (f_y - f_k) / ||w_y - w_k|| with ||w_y - w_k|| = sqrt(2).
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=g))
    ortho = _linear(q[:3])
    logits = ortho(x).detach()
    margin = logits.gather(1, y[:, None]).squeeze(1) - logits.scatter(1, y[:, None], -math.inf).max(1).values
    r = certified_radius(ortho, x, y)
    torch.testing.assert_close(r, (margin / math.sqrt(2)).double())
    torch.testing.assert_close(certified_radius(ortho, x, y, divisor="2"), (margin / 2).double())
    torch.testing.assert_close(certified_radius(ortho, x, y, lipschitz=2.0), (margin / (2 * math.sqrt(2))).double())
    w = q[:3]
    exact = torch.stack([min((logits[i, y[i]] - logits[i, k]) / (w[y[i]] - w[k]).norm()
                             for k in range(3) if k != y[i]) for i in range(40)])
    torch.testing.assert_close(r, exact.double(), rtol=1e-5, atol=1e-6)
    result = certify(ortho, x, y, [0.0, 0.1])
    assert result["lipschitz_bound"] == pytest.approx(1.0, abs=1e-6) and result["divisor"] == "sqrt2"
    assert result["certified_acc"][0.1] == pytest.approx((r > 0.1).double().mean().item())
    assert certified_accuracy(ortho, x, y, [0.1]) == {0.1: result["certified_acc"][0.1]}
    # Unit rows w and -w (disjoint neurons): each logit is 1-Lipschitz but the map is sqrt(2)-
    # Lipschitz, and the exact boundary distance is M / 2, so sqrt(2) would overstate it.
    u = torch.nn.functional.normalize(torch.randn(1, 4, generator=g), dim=1)
    disjoint = _linear(torch.cat([u, -u]))
    y2 = (disjoint(x)[:, 1] > disjoint(x)[:, 0]).long()   # all correctly classified
    logits = disjoint(x).detach()
    exact = (logits[:, 0] - logits[:, 1]).abs() / 2
    with pytest.raises(UncertifiableError):
        certify(disjoint, x, y2, [0.1])   # whole-map bound sqrt(2)
    result = certify(disjoint, x, y2, [0.1], divisor="2")
    assert result["lipschitz_bound"] == pytest.approx(1.0, abs=1e-6)
    torch.testing.assert_close(certified_radius(disjoint, x, y2, divisor="2"), exact.double())
    assert result["certified_acc"][0.1] == pytest.approx((exact > 0.1).double().mean().item())
    with pytest.raises(ValueError):
        certified_radius(ortho, x, y, divisor="3")
    with pytest.raises(ValueError):
        certified_accuracy(ortho, x, y, [-0.1])


def test_misclassified_points_are_never_certified():
    g = torch.Generator().manual_seed(1)
    model = _linear(torch.linalg.qr(torch.randn(4, 4, generator=g))[0][:3])
    x = torch.rand(30, 1, 2, 2, generator=g)
    wrong = (model(x).argmax(1) + 1) % 3
    assert certified_accuracy(model, x, wrong, [0.0, 0.01]) == {0.0: 0.0, 0.01: 0.0}
    assert (certified_radius(model, x, wrong) < 0).all()


def _minimal_adversarial_distance(net, x, y, eps_grid, *, steps=50, restarts=3):
    """Per point, the L2 size of the smallest adversarial example found over a grid of radii."""
    found = torch.full((len(y),), math.inf, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    for eps in eps_grid:
        todo = torch.isinf(found).nonzero().squeeze(1)
        if len(todo) == 0:
            break
        x_adv = pgd(net, x[todo], y[todo], eps=eps, norm="L2", steps=steps, step_size=eps / 8,
                    restarts=restarts, keep_best=True, loss_fn=_margin_loss, generator=generator)
        with torch.no_grad():
            fooled = net(x_adv).argmax(1) != y[todo]
        dist = (x_adv - x[todo]).flatten(1).norm(dim=1).double()
        found[todo[fooled]] = dist[fooled]
    return found


def test_certificate_never_exceeds_the_closest_adversarial_example(trained, correct_points):
    _, net = trained
    x, y = correct_points
    r = certified_radius(net, x, y)
    assert (r > 0).all()
    eps_grid = [0.05 * 1.2 ** i for i in range(22)]   # 0.05 ... 2.3
    distance = _minimal_adversarial_distance(net, x, y, eps_grid)
    assert torch.isfinite(distance).float().mean() >= 0.9, distance   # the attack does find examples
    assert (r <= distance + 1e-4).all(), torch.stack([r, distance], 1)
    # Control: claiming a Lipschitz constant 10 times too small breaks the inequality.
    overclaimed = certified_radius(net, x, y, lipschitz=0.1)
    assert (overclaimed > distance).any()


def test_empirical_robust_accuracy_is_never_below_certified(digits, trained):
    from pyautoattack import AutoAttack

    _, net = trained
    test = digits[2]
    x, y = test.x[:100], test.y[:100]
    r = certified_radius(net, x, y)
    generator = torch.Generator().manual_seed(0)
    for radius in (0.1, 0.2):
        certified = r > radius
        x_pgd = pgd(net, x, y, eps=radius, norm="L2", steps=50, step_size=radius / 4, restarts=3, keep_best=True,
                    generator=generator)
        adversary = AutoAttack(net, norm="L2", eps=radius, version="custom", attacks=["apgd-ce"], seed=0)
        adversary.apgd.n_restarts = 2
        adversary.verbose = False
        x_aa, y_aa = adversary.run_standard_evaluation(x, y, batch_size=100)
        with torch.no_grad():
            survives = (net(x_pgd).argmax(1) == y) & (y_aa == y) & (net(x_aa).argmax(1) == y)
        assert (x_aa - x).flatten(1).norm(dim=1).max() <= radius + 1e-4
        assert survives.float().mean() >= certified.float().mean()
        assert survives[certified].all()   # no certified point is broken
        assert certified.float().mean() == pytest.approx(certified_accuracy(net, x, y, [radius])[radius])
    assert (r > 0.1).float().mean() > 0.3   # the comparison is not vacuous


# --------------------------------------------------------------------------------------------------
# Training


def test_one_epoch_improves_val_clean_accuracy(digits):
    run = _hkr_run(digits, epochs=1)
    before = validate(run.model, run.val, run.method.threat, run.cfg)
    seen = []
    fit(run, lambda metrics, _: seen.append(metrics))
    after = seen[-1]
    for key in ("train/loss", "train/hinge", "train/kr", "train/acc"):
        assert math.isfinite(after[key]), key
    assert after["train/kr"] > 0   # the one-vs-all class means have separated
    assert after["val/clean_acc"] > before["val/clean_acc"] + 0.3, (before, after)
    assert lipschitz_bound(export(run.model), (1, 8, 8)) <= 1 + TOLERANCE


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OTARENA_SLOW") != "1", reason="slow: set OTARENA_SLOW=1")
def test_cifar_net_is_one_lipschitz_at_init():
    model = lipschitz.lipschitz_cifar(3, 10, (0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
    model.train()
    model(torch.rand(4, 3, 32, 32)).sum().backward()   # one training forward: Björck's cache is set
    assert lipschitz_bound(export(model), (3, 32, 32)) <= 1 + TOLERANCE
