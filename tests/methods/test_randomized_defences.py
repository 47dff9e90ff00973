# SPDX-License-Identifier: Apache-2.0
"""Randomized defences are attacked with EOT and scored by expected accuracy; no check state leaks
from one evaluation to the next; the cascade leaves no gradient on the model.

Each broken defence wraps the session's honest PGD-AT digits model (honest_digits_model).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from pyautoattack import checks

from otarena import methods
from otarena.methods.common.autoattack import autoattack_cascade
from otarena.methods.common.evaluate import STAGES

LINF = methods.ThreatModel("Linf", 0.2)
QUICK = dict(n_ex=16, eot_iters=4, pgd_steps=10, pgd_targets=1)
"""Few points, draws and steps: enough to show each effect, cheap enough for CI."""


def _points(n=16):
    data = methods.data.load("digits", "test")
    return data.x[:n], data.y[:n]


class GaussianNoise(nn.Module):
    """Gaussian noise on the input before the classifier: a new draw at every forward pass."""

    def __init__(self, model: nn.Module, sigma: float):
        super().__init__()
        self.model, self.sigma = model, sigma

    def forward(self, x):
        return self.model(x + self.sigma * torch.randn_like(x))


class ResizeAndPad(nn.Module):
    """Xie et al.'s randomization: a random upscale, then a random zero padding to a fixed size."""

    def __init__(self, model: nn.Module, size: int = 8, largest: int = 12):
        super().__init__()
        self.model, self.size, self.largest = model, size, largest

    def forward(self, x):
        side = int(torch.randint(self.size, self.largest + 1, ()))
        resized = F.interpolate(x, size=(side, side), mode="nearest")
        left, top = (int(v) for v in torch.randint(0, self.largest - side + 1, (2,)))
        padded = F.pad(resized, (left, self.largest - side - left, top, self.largest - side - top))
        return self.model(F.interpolate(padded, size=(self.size, self.size), mode="bilinear", align_corners=False))


class NoisyAwayFromData(nn.Module):
    """Deterministic on the test points it memorized, noisy on inputs far from all of them (L2 beyond
    ``radius``): clean inputs pass pyautoattack's randomness check, perturbed ones are random."""

    def __init__(self, model: nn.Module, data: torch.Tensor, radius: float, sigma: float = 0.3):
        super().__init__()
        self.model, self.data, self.radius, self.sigma = model, data.flatten(1), radius, sigma

    def forward(self, x):
        far = torch.cdist(x.flatten(1), self.data).amin(1) > self.radius
        noise = self.sigma * torch.randn_like(x) * far.view(-1, 1, 1, 1)
        return self.model(x + noise)


class Purified(nn.Module):
    """One gradient step on the input's entropy inside the forward pass: a dynamic defence."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        with torch.enable_grad():
            probe = x.detach().requires_grad_(True)
            entropy = -(self.model(probe).softmax(1) * self.model(probe).log_softmax(1)).sum()
            grad, = torch.autograd.grad(entropy, probe)
        return self.model((x - 0.01 * grad.sign()).clamp(0, 1))


def test_gaussian_noise_gets_eot_autoattack_and_expected_pgd(honest_digits_model):
    model = GaussianNoise(honest_digits_model(0.2), sigma=0.2)
    result = methods.evaluate(model, _points(), LINF, ("clean", "pgd", "autoattack"), **QUICK)
    assert "aa-check:randomized" in result["flags"]
    assert "EOT over 4 draws" in result["aa_ranking"] and "aa_acc is AutoAttack rand" in \
        result["flag_reasons"]["aa-check:randomized"]
    assert list(result["aa_eot_per_attack"]) == ["apgd-ce", "apgd-dlr"]
    assert result["aa_acc"] == result["aa_eot_per_attack"]["apgd-dlr"] < result["aa_acc_deterministic"]
    # PGD's last iterate is scored by its expected accuracy, not by any one of a hundred noisy passes.
    assert "expected accuracy" in result["pgd_scoring"] and result["pgd_acc"] > 0
    assert any("test/aa_acc_deterministic" in stage.metrics(result) for stage in STAGES)


def test_random_resize_and_pad_is_flagged_and_attacked_with_eot(honest_digits_model):
    model = ResizeAndPad(honest_digits_model(0.2))
    result = methods.evaluate(model, _points(), LINF, ("clean", "autoattack"), **QUICK)
    assert "aa-check:randomized" in result["flags"]
    assert result["aa_acc"] <= result["aa_acc_deterministic"] and "aa_eot_per_attack" in result


def test_randomness_only_on_perturbed_inputs_is_caught(honest_digits_model):
    x, y = _points(8)
    model = NoisyAwayFromData(honest_digits_model(0.2), x, radius=0.7 * LINF.eps * x[0].numel() ** 0.5)
    caught = []
    checks.check_randomized(model, x, y, logger=type("Log", (), {"warning": caught.append})())
    assert caught == []  # pyautoattack's check on clean inputs alone misses it
    cascade = autoattack_cascade(model.eval(), x, y, LINF, batch_size=8, seed=0)
    assert "same perturbed input gave different logits" in cascade.checks["aa-check:randomized"]


def test_a_dynamic_model_does_not_flag_the_honest_model_after_it_and_no_gradient_is_left(honest_digits_model):
    x, y = _points(2)
    dynamic = autoattack_cascade(Purified(honest_digits_model(0.2)), x, y, LINF, version="rand", eot_iters=1,
                                 batch_size=2)
    assert "aa-check:dynamic" in dynamic.checks
    honest = copy.deepcopy(honest_digits_model(0.2))
    honest.zero_grad(set_to_none=True)  # training left its last gradients
    after = methods.evaluate(honest, (x, y), LINF, ("clean", "autoattack"))  # the standard cascade: FAB-T calls .backward()
    assert not [flag for flag in after["flags"] if flag.startswith("aa-check:")]
    assert all(p.grad is None and p.requires_grad for p in honest.parameters())


def test_eot_cascade_resumes_with_its_draw_counts(honest_digits_model, tmp_path):
    x, y = _points(4)
    model, state = GaussianNoise(honest_digits_model(0.2), sigma=0.2), str(tmp_path / "aa_rand.pt")

    def preempt(step):
        if step.batch == 1 and step.attack is None:
            raise KeyboardInterrupt

    run = dict(version="rand", eot_iters=2, batch_size=2, seed=0, state_path=state)
    with pytest.raises(KeyboardInterrupt):
        autoattack_cascade(model, x, y, LINF, progress=preempt, **run)
    first = torch.load(state, weights_only=True)["correct"][0]
    resumed = autoattack_cascade(model, x, y, LINF, **run)
    assert resumed.resumed_batches == 1 and torch.equal(resumed.correct_draws[:2], first)
    assert resumed.correct_draws.shape == (4, 3) and int(resumed.correct_draws.max()) <= 2
    assert resumed.robust_acc == int(resumed.correct_draws[:, -1].sum()) / 8
