# SPDX-License-Identifier: Apache-2.0
"""The literature's MNIST networks (``methods/common/nets.py``) and ``configs/mnist.yaml``.

Each net on a tiny batch of 28x28 random images: its output and latent shapes, its parameter count
(worked out by hand below from the papers' layer lists), one training step, and the refusal of
other input sizes.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from otarena import methods
from otarena.methods.common import nets
from otarena.methods.common.data import INFO, TensorData
from otarena.search import config as config_lib

ROOT = Path(__file__).resolve().parents[2]

# Parameters per layer: a conv holds out * in * k * k weights + out biases, a linear out * in + out.
EXPECTED = {
    # conv 1->32 3x3: 288 + 32 = 320; conv 32->32 3x3: 9,216 + 32 = 9,248; conv 32->64 3x3:
    # 18,432 + 64 = 18,496; conv 64->64 3x3: 36,864 + 64 = 36,928; 28 -> 26 -> 24 -> pool 12 -> 10 -> 8
    # -> pool 4, so fc 1,024->200: 204,800 + 200 = 205,000; fc 200->200: 40,200; fc 200->10: 2,010.
    # 320 + 9,248 + 18,496 + 36,928 + 205,000 + 40,200 + 2,010 = 312,202.
    "cw_mnist": (312_202, 200),
    # conv 1->32 5x5: 800 + 32 = 832; conv 32->64 5x5: 51,200 + 64 = 51,264; 28 -> pool 14 -> pool 7,
    # so fc 3,136->1,024: 3,211,264 + 1,024 = 3,212,288; fc 1,024->10: 10,250.
    # 832 + 51,264 + 3,212,288 + 10,250 = 3,274,634 (the challenge network's known 3.27M).
    "madry_mnist": (3_274_634, 1024),
    # conv 1->64 5x5: 1,600 + 64 = 1,664; conv 64->64 5x5: 102,400 + 64 = 102,464; 28 -> 24 -> 20,
    # so fc 25,600->128: 3,276,800 + 128 = 3,276,928; fc 128->10: 1,290.
    # 1,664 + 102,464 + 3,276,928 + 1,290 = 3,382,346.
    "langevin_mnist_a": (3_382_346, 128),
    # conv 1->32 3x3: 320; conv 32->32 3x3 stride 2: 9,248; conv 32->64 3x3: 18,496; conv 64->64 3x3
    # stride 2: 36,928; 28 -> 14 -> 7, so fc 3,136->100: 313,600 + 100 = 313,700; fc 100->10: 1,010.
    # 320 + 9,248 + 18,496 + 36,928 + 313,700 + 1,010 = 379,702.
    "langevin_mnist_b": (379_702, 100),
}
MNIST_ARCHS = sorted(EXPECTED)


def _build(arch: str) -> nets.Classifier:
    info = INFO["mnist"]
    return nets.build(arch, in_channels=info.in_channels, num_classes=info.num_classes, mean=info.mean, std=info.std)


def _fake_mnist(n: int, seed: int = 0) -> TensorData:
    """Random 28x28 images with MNIST's info: shapes and a step need no real digits."""
    generator = torch.Generator().manual_seed(seed)
    return TensorData("mnist", "train", torch.rand(n, 1, 28, 28, generator=generator),
                      torch.randint(0, 10, (n,), generator=generator), INFO["mnist"])


def test_every_mnist_net_is_registered_for_28x28_only():
    assert set(MNIST_ARCHS) <= set(nets.ARCHS)
    assert all(nets.INPUT_SIZE[arch] == 28 for arch in MNIST_ARCHS)


@pytest.mark.parametrize("arch", MNIST_ARCHS)
def test_shapes_parameters_and_features(arch):
    count, latent = EXPECTED[arch]
    model = _build(arch).eval()
    assert sum(p.numel() for p in model.parameters()) == count
    x = _fake_mnist(4).x
    with torch.no_grad():
        z, logits = model.features(x), model(x)
    assert z.shape == (4, latent) and logits.shape == (4, 10)
    # The contract latent-space methods rely on: forward is the linear head on features.
    assert isinstance(model.head, torch.nn.Linear) and model.head.in_features == latent
    torch.testing.assert_close(model.head(z), logits)


@pytest.mark.parametrize("arch", MNIST_ARCHS)
def test_one_pgd_at_step_trains(arch):
    data = _fake_mnist(8)
    run = methods.build_run("pgd_at", {"optimizer": "adam", "lr": 1e-3, "batch_size": 8, "attack_steps": 2},
                            dataset="mnist", arch=arch, threat=methods.ThreatModel("Linf", 0.3),
                            train=data, val=data, device="cpu")
    before = [p.detach().clone() for p in run.method.model.parameters()]
    metrics = run.method.step(data.x, data.y, torch.arange(8))
    assert torch.isfinite(torch.as_tensor(metrics["loss"]))
    assert all(not torch.equal(b, p) for b, p in zip(before, run.method.model.parameters()))


def test_got_transports_the_cw_latent():
    """GOT's potential reads ``features()``: seed 003's MNIST method on seed 003's MNIST net."""
    data = _fake_mnist(8)
    run = methods.build_run("got_trades_lm", {"optimizer": "adam", "lr": 1e-3, "batch_size": 8, "attack_steps": 2},
                            dataset="mnist", arch="cw_mnist", threat=methods.ThreatModel("Linf", 0.3),
                            train=data, val=data, device="cpu")
    assert run.method.phi.in_features == 200
    metrics = run.method.step(data.x, data.y, torch.arange(8))
    assert torch.isfinite(torch.as_tensor(metrics["loss"]))


def test_other_input_sizes_are_refused_in_one_line():
    assert nets.input_size_error("cw_mnist", 28) is None and nets.input_size_error("small_cnn", 8) is None
    raw = {"name": "t", "dataset": "digits", "arch": "cw_mnist", "methods": ["pgd_at"],
           "threat_model": {"norm": "Linf", "eps": 0.2}}
    with pytest.raises(config_lib.ConfigError, match=r"^arch 'cw_mnist' takes 28x28 images only, not 8x8 "
                                                     r"\(dataset 'digits'\)$"):
        config_lib.parse(raw)


def test_mnist_config_is_the_canonical_benchmark():
    """configs/mnist.yaml parses as written (MNIST offline, no data_dir) and states the literature's setting."""
    cfg = config_lib.load(str(ROOT / "configs" / "mnist.yaml"))
    assert (cfg.dataset, cfg.data_dir, cfg.threat_model.norm, cfg.threat_model.eps) == ("mnist", None, "Linf", 0.3)
    assert nets.INPUT_SIZE[cfg.arch] == 28
    assert cfg.final_eval.n_ex is None   # all 10,000 test images
    assert "hkr" not in cfg.methods      # L2 only, on its own Lipschitz nets
    for method, space in cfg.spaces().items():
        assert (space["attack_steps"].value, space["attack_step_size"].value) == (40, 0.01), method
