# SPDX-License-Identifier: Apache-2.0
"""The shared attack loop: real models, no mocks.

PGD must break an undefended model, stay inside the threat model, grow no weaker with more steps
or restarts at a fixed seed, leave the model's parameters and mode untouched, and be reproducible.
"""
from __future__ import annotations

import pytest
import torch

from otarena import methods
from otarena.methods.common.attacks import ThreatModel, ce_loss, eval_mode, fgsm, pgd, pgd_best, project, random_start
from otarena.methods.common.evaluate import accuracy, pgd_accuracy


@pytest.fixture(scope="module")
def digits_test():
    return methods.data.load("digits", "test")


@pytest.fixture(scope="module")
def erm_model():
    """A SmallCNN briefly trained with ERM on digits: accurate, and not robust."""
    hparams = {"epochs": 3, "optimizer": "adam", "lr": 2e-3, "batch_size": 32, "val_pgd_steps": 1}
    run = methods.build_run("erm", hparams, dataset="digits", arch="small_cnn",
                            threat=ThreatModel("Linf", 0.3), device="cpu")
    methods.fit(run)
    model = run.model.eval()
    return model


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.x[:64], digits_test.y[:64]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _assert_in_ball(x_adv, x, eps, norm):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert torch.isfinite(x_adv).all()
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":
        assert delta.abs().max().item() <= eps + 1e-6
    else:
        assert delta.norm(dim=1).max().item() <= eps + 1e-5


# --------------------------------------------------------------------------------------------------
# PGD breaks an undefended model


def test_pgd_linf_breaks_undefended_model(erm_model, digits_test):
    result = methods.evaluate(erm_model, digits_test, ThreatModel("Linf", 0.3), attacks=("clean", "pgd"),
                              pgd_steps=20, seed=0)
    assert result["n_ex"] == len(digits_test)
    assert result["clean_acc"] > 0.8, result
    assert result["pgd_acc"] < 0.05, result


def test_pgd_l2_breaks_undefended_model(erm_model, digits_test):
    x, y = digits_test.x, digits_test.y
    assert accuracy(erm_model, x, y) > 0.8
    # ThreatModel caps eps at 1; pgd itself takes any radius (an 8x8 image has L2 diameter 8).
    x_adv = pgd(erm_model, x, y, eps=2.0, norm="L2", steps=20, keep_best=True, generator=_gen())
    _assert_in_ball(x_adv, x, 2.0, "L2")
    assert accuracy(erm_model, x_adv, y) < 0.05


def test_small_random_noise_is_not_an_attack(erm_model, digits_test):
    """Control: the accuracy drop above comes from the gradient, not from the size of the ball."""
    x, y = digits_test.x, digits_test.y
    noisy = (x + 0.1 * (torch.rand(x.shape, generator=_gen()) * 2 - 1)).clamp(0, 1)
    x_adv = pgd(erm_model, x, y, eps=0.1, steps=10, generator=_gen())
    assert accuracy(erm_model, noisy, y) > 0.8
    assert accuracy(erm_model, x_adv, y) < accuracy(erm_model, noisy, y) - 0.1


# --------------------------------------------------------------------------------------------------
# Every adversarial example stays in the threat model


PGD_VARIANTS = {
    "random_start": dict(),
    "no_random_start": dict(random_init=False),
    "keep_best": dict(keep_best=True),
    "restarts_keep_best": dict(restarts=3, keep_best=True),
    "huge_step": dict(step_size=5.0),
    "one_step": dict(steps=1),
}


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("Linf", 0.3), ("L2", 0.5), ("L2", 2.0)])
@pytest.mark.parametrize("variant", sorted(PGD_VARIANTS))
def test_pgd_stays_in_ball(erm_model, batch, norm, eps, variant):
    x, y = batch
    kwargs = {"steps": 5, **PGD_VARIANTS[variant]}
    x_adv = pgd(erm_model, x, y, eps=eps, norm=norm, generator=_gen(), **kwargs)
    _assert_in_ball(x_adv, x, eps, norm)
    assert not x_adv.requires_grad


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
@pytest.mark.parametrize("steps", [0, 3])
def test_pgd_projects_an_init_outside_the_ball(erm_model, batch, norm, eps, steps):
    x, y = batch
    init = x + 2.0 * torch.randn(x.shape, generator=_gen(1))   # far outside the ball and [0, 1]
    x_adv = pgd(erm_model, x, y, eps=eps, norm=norm, steps=steps, init=init)
    _assert_in_ball(x_adv, x, eps, norm)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("Linf", 0.3), ("L2", 0.5), ("L2", 2.0)])
def test_fgsm_stays_in_ball_and_takes_a_full_step(erm_model, batch, norm, eps):
    x, y = batch
    x_adv = fgsm(erm_model, x, y, eps=eps, norm=norm)
    _assert_in_ball(x_adv, x, eps, norm)
    if norm == "Linf":
        # Every pixel not clipped by [0, 1] moves by exactly eps (sign of a nonzero gradient).
        delta = (x_adv - x).abs()
        free = ((x - eps) >= 0) & ((x + eps) <= 1) & (delta > 0)
        assert free.any()
        torch.testing.assert_close(delta[free], torch.full_like(delta[free], eps), rtol=0, atol=1e-6)


def test_fgsm_is_deterministic_and_raises_the_loss(erm_model, batch):
    x, y = batch
    a = fgsm(erm_model, x, y, eps=0.1)
    b = fgsm(erm_model, x, y, eps=0.1)
    assert torch.equal(a, b)
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy
        assert ce(erm_model(a), y).item() > ce(erm_model(x), y).item()


def test_project_is_idempotent_inside_the_ball(batch):
    from otarena.methods.common.attacks import project

    x, _ = batch
    for norm, eps in (("Linf", 0.1), ("L2", 0.5)):
        once = project(x + torch.randn(x.shape, generator=_gen(2)), x, eps, norm)
        torch.testing.assert_close(project(once, x, eps, norm), once, rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------------
# A longer or restarted attack is never weaker at a fixed seed


@pytest.mark.parametrize("norm,eps,step_size", [("Linf", 0.1, 0.02), ("L2", 0.5, 0.1)])
def test_more_steps_never_raise_robust_accuracy(erm_model, digits_test, norm, eps, step_size):
    x, y = digits_test.x[:160], digits_test.y[:160]
    threat = ThreatModel(norm, eps)
    # A fixed step size, so that the first k iterates of every run coincide.
    accs = [pgd_accuracy(erm_model, x, y, threat, steps=k, step_size=step_size, generator=_gen())
            for k in (1, 2, 5, 10, 20)]
    assert all(later <= earlier for earlier, later in zip(accs, accs[1:])), accs
    assert accs[-1] < accs[0] - 0.1, accs   # the attack does something, so the check has teeth


@pytest.mark.parametrize("norm,eps,step_size", [("Linf", 0.1, 0.02), ("L2", 0.5, 0.1)])
def test_more_restarts_never_raise_robust_accuracy(erm_model, digits_test, norm, eps, step_size):
    x, y = digits_test.x[:160], digits_test.y[:160]
    threat = ThreatModel(norm, eps)
    accs = [pgd_accuracy(erm_model, x, y, threat, steps=3, step_size=step_size, restarts=r, generator=_gen())
            for r in (1, 2, 4)]
    assert all(later <= earlier for earlier, later in zip(accs, accs[1:])), accs


def test_keep_best_examples_only_get_more_adversarial(erm_model, digits_test):
    """Per example: whatever PGD-k fools, PGD-(k+m) with the same seed fools too."""
    x, y = digits_test.x[:160], digits_test.y[:160]
    fooled = []
    for k in (1, 3, 10):
        x_adv = pgd(erm_model, x, y, eps=0.1, steps=k, step_size=0.02, keep_best=True, generator=_gen())
        with torch.no_grad():
            fooled.append(erm_model(x_adv).argmax(1) != y)
    for short, long in zip(fooled, fooled[1:]):
        assert not (short & ~long).any()
    assert fooled[-1].sum() > fooled[0].sum()


@pytest.mark.parametrize("norm,eps,restarts", [("Linf", 0.1, 1), ("L2", 0.5, 3)])
def test_pgd_best_verdict_matches_a_fresh_forward(erm_model, digits_test, norm, eps, restarts):
    """The evaluation trusts pgd_best's verdict instead of classifying the returned inputs again."""
    x, y = digits_test.x[:160], digits_test.y[:160]
    with eval_mode(erm_model):
        x_adv, fooled = pgd_best(erm_model, x, y, eps=eps, norm=norm, steps=5, restarts=restarts, generator=_gen())
        with torch.no_grad():
            assert torch.equal(fooled, erm_model(x_adv).argmax(1) != y)
    assert torch.equal(x_adv, pgd(erm_model, x, y, eps=eps, norm=norm, steps=5, restarts=restarts, keep_best=True,
                                  generator=_gen()))
    assert 0 < fooled.sum() < len(y)


@pytest.mark.parametrize("norm,eps,step_size", [("Linf", 0.1, 0.02), ("L2", 0.5, 0.1)])
def test_stopping_on_fooled_points_changes_no_verdict(erm_model, digits_test, norm, eps, step_size):
    """keep_best stops attacking a point once it is misclassified; every point still gets the verdict
    of a PGD that attacks all points for all steps from the same starts."""
    x, y = digits_test.x[:160], digits_test.y[:160]
    steps = 10
    with eval_mode(erm_model):
        _, fooled = pgd_best(erm_model, x, y, eps=eps, norm=norm, steps=steps, step_size=step_size, generator=_gen())
        x_adv = random_start(x, eps, norm, _gen())
        ever_fooled = torch.zeros_like(y, dtype=torch.bool)
        for step in range(steps + 1):
            x_adv.requires_grad_(True)
            logits = erm_model(x_adv)
            ever_fooled |= logits.argmax(1) != y
            grad, = torch.autograd.grad(ce_loss(logits, y).sum(), x_adv)
            direction = grad.sign() if norm == "Linf" else grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            x_adv = project(x_adv.detach() + step_size * direction, x, eps, norm)
    assert 0.2 < ever_fooled.float().mean() < 0.95  # points stop at different steps, so the check has teeth
    # The same arithmetic on smaller batches may round differently; at most one verdict in 160 may follow.
    assert (fooled != ever_fooled).sum() <= 1


# --------------------------------------------------------------------------------------------------
# The attack leaves the model alone


def test_pgd_touches_no_parameter_gradient(erm_model, batch):
    x, y = batch
    for p in erm_model.parameters():
        p.grad = None
    pgd(erm_model, x, y, eps=0.1, steps=3, restarts=2, keep_best=True, generator=_gen())
    fgsm(erm_model, x, y, eps=0.1, norm="L2")
    assert all(p.grad is None for p in erm_model.parameters())
    assert all(p.requires_grad for p in erm_model.parameters())


def test_pgd_keeps_existing_gradients_and_flags(erm_model, batch):
    x, y = batch
    params = list(erm_model.parameters())
    try:
        params[0].requires_grad_(False)   # e.g. a frozen first layer
        torch.nn.functional.cross_entropy(erm_model(x), y).backward()
        before = [None if p.grad is None else p.grad.clone() for p in params]
        assert before[0] is None and before[-1] is not None
        pgd(erm_model, x, y, eps=0.1, norm="Linf", steps=3, generator=_gen())
        pgd(erm_model, x, y, eps=0.5, norm="L2", steps=3, keep_best=True, generator=_gen())
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
        for p, g in zip(params, before):
            assert (p.grad is None) if g is None else torch.equal(p.grad, g)
    finally:
        params[0].requires_grad_(True)
        for p in params:
            p.grad = None


def test_parameters_are_frozen_during_the_attack(erm_model, batch):
    """The backward pass of the attack computes input gradients only (no weight-gradient work)."""
    x, y = batch
    seen = []

    def spy_loss(logits, target):
        seen.append([p.requires_grad for p in erm_model.parameters()])
        return torch.nn.functional.cross_entropy(logits, target, reduction="none")

    pgd(erm_model, x, y, eps=0.1, steps=2, loss_fn=spy_loss, generator=_gen())
    assert len(seen) == 2 and not any(any(flags) for flags in seen)
    assert all(p.requires_grad for p in erm_model.parameters())


def test_pgd_restores_requires_grad_after_an_error(erm_model, batch):
    x, y = batch

    def bad_loss(logits, target):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        pgd(erm_model, x, y, eps=0.1, steps=1, loss_fn=bad_loss)
    assert all(p.requires_grad for p in erm_model.parameters())


def test_pgd_does_not_change_weights_or_inputs(erm_model, batch):
    x, y = batch
    x_copy = x.clone()
    weights = {k: v.clone() for k, v in erm_model.state_dict().items()}
    pgd(erm_model, x, y, eps=0.3, steps=3, generator=_gen())
    assert torch.equal(x, x_copy)
    assert all(torch.equal(v, weights[k]) for k, v in erm_model.state_dict().items())


@pytest.mark.parametrize("start_training", [True, False])
def test_eval_mode_is_restored(erm_model, start_training):
    erm_model.train(start_training)
    try:
        with eval_mode(erm_model):
            assert not any(m.training for m in erm_model.modules())
        assert all(m.training == start_training for m in erm_model.modules())
        with pytest.raises(ValueError):
            with eval_mode(erm_model):
                raise ValueError
        assert erm_model.training == start_training
    finally:
        erm_model.eval()


def test_pgd_accuracy_restores_mode(erm_model, batch):
    x, y = batch
    erm_model.train()
    try:
        pgd_accuracy(erm_model, x, y, ThreatModel("Linf", 0.1), steps=2, generator=_gen())
        accuracy(erm_model, x, y)
        assert erm_model.training
    finally:
        erm_model.eval()


# --------------------------------------------------------------------------------------------------
# Reproducibility


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.5)])
@pytest.mark.parametrize("restarts,keep_best", [(1, False), (3, True)])
def test_same_seed_same_adversarial_examples(erm_model, batch, norm, eps, restarts, keep_best):
    x, y = batch
    kwargs = dict(eps=eps, norm=norm, steps=3, restarts=restarts, keep_best=keep_best)
    a = pgd(erm_model, x, y, generator=_gen(7), **kwargs)
    b = pgd(erm_model, x, y, generator=_gen(7), **kwargs)
    c = pgd(erm_model, x, y, generator=_gen(8), **kwargs)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)   # the generator really drives the random start


def test_global_seed_drives_pgd_without_a_generator(erm_model, batch):
    x, y = batch
    torch.manual_seed(3)
    a = pgd(erm_model, x, y, eps=0.1, steps=3)
    torch.manual_seed(3)
    b = pgd(erm_model, x, y, eps=0.1, steps=3)
    assert torch.equal(a, b)


def test_threat_model_validates():
    with pytest.raises(ValueError):
        ThreatModel("L1", 0.1)
    with pytest.raises(ValueError):
        ThreatModel("Linf", 0.0)
    with pytest.raises(ValueError):
        ThreatModel("Linf", 1.5)
    with pytest.raises(ValueError):
        ThreatModel("L2", 0.0)
    assert ThreatModel("L2", 2.0).eps == 2.0          # L2 radii above 1 are common (MNIST: 2.0)
    # One name for the step: None resolves to Madry et al.'s 2.5 eps / steps on construction.
    assert ThreatModel("Linf", 0.3, steps=10).step_size == pytest.approx(0.075)
    assert ThreatModel("Linf", 0.3, steps=10, step_size=0.01).step_size == 0.01
    assert not hasattr(ThreatModel(), "alpha")


def test_restarts_need_keep_best(erm_model, batch):
    model, (x, y) = erm_model, batch
    with pytest.raises(ValueError, match="keep_best"):
        pgd(model, x, y, eps=0.1, restarts=2)


def test_init_only_seeds_the_first_restart(erm_model, batch):
    """Later restarts start at random points, so restarting from ``init`` is not wasted work."""
    model, (x, y) = erm_model, batch
    torch.manual_seed(0)
    one = pgd(model, x, y, eps=0.1, steps=2, init=x, keep_best=True)
    torch.manual_seed(0)
    three = pgd(model, x, y, eps=0.1, steps=2, init=x, keep_best=True, restarts=3)
    assert not torch.equal(one, three)
