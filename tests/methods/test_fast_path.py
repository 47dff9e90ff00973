# SPDX-License-Identifier: Apache-2.0
"""The training fast path: on-device augmentation, bf16 autocast, channels-last and compile.

Every knob is off by default and must leave a run's results unchanged; switched on, it must leave
what a checkpoint holds (keys, dtypes, loadability into a plain model) unchanged. All of it runs on
CPU; the CUDA cases run where a GPU is present.
"""
from __future__ import annotations

import math
import os

import pytest
import torch
import torchvision.transforms.functional as TF

from otarena import methods
from otarena.methods.common import data as D
from otarena.methods.common import train as T
from otarena.methods.common.train import Run, TrainConfig, fit, prepare, train_step

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]
FAST = {"precision": "bf16", "channels_last": True}
NAMES = sorted(methods.REGISTRY)


@pytest.fixture(scope="module")
def digits():
    return methods.data.load("digits", "train"), methods.data.load("digits", "val")


def _images(n=64, c=3, size=32, seed=0):
    """Random images whose pixels are all distinct and nonzero, so any window or flip is identifiable."""
    x = torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(seed))
    return x * 0.98 + 0.01


def _windows(image, padding):
    """Every crop of ``image`` zero-padded by ``padding``, flipped and not, as torchvision makes them."""
    padded = TF.pad(image, [padding] * 4, fill=0)        # RandomCrop(size, padding=p): zero padding
    size = image.shape[-1]
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = TF.crop(padded, top, left, size, size)
            yield (top, left, False), crop
            yield (top, left, True), TF.hflip(crop)


def _match(image, out, padding):
    hits = [key for key, window in _windows(image, padding) if torch.equal(window, out)]
    assert len(hits) == 1, f"output is not exactly one window of the padded image: {hits}"
    return hits[0]


# --------------------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["crop", "crop_flip"])
def test_augment_is_a_window_of_the_padded_image(kind, device):
    x = _images(n=48).to(device)
    out = D.augment(x, kind, generator=torch.Generator(device=device).manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype and out.device == x.device
    assert out.min() >= 0 and out.max() <= 1
    keys = [_match(x[i].cpu(), out[i].cpu(), 4) for i in range(len(x))]
    offsets = {(top, left) for top, left, _ in keys}
    flips = {flip for _, _, flip in keys}
    assert len(offsets) > 10, "offsets should spread over the 9 x 9 shifts"
    assert flips == ({False, True} if kind == "crop_flip" else {False}), "crop must never flip"


def test_flip_is_exact():
    x = _images(n=32)
    out = D.augment(x, "crop_flip", generator=torch.Generator().manual_seed(1), padding=0)
    flipped = torch.tensor([torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)])
    kept = torch.tensor([torch.equal(o, xi) for o, xi in zip(out, x)])
    assert (flipped ^ kept).all() and flipped.any() and kept.any()
    assert torch.equal(D.augment(x, "crop", padding=0, generator=torch.Generator().manual_seed(1)), x)


def test_augment_crops_like_torchvision_with_zero_padding():
    x = torch.ones(1, 1, 8, 8)
    counts = torch.zeros(9, 9)
    out = D.augment(x.expand(2000, 1, 8, 8), "crop", generator=torch.Generator().manual_seed(0))
    for o in out:                                 # the zero border tells where the window was
        rows, cols = o[0].sum(1).nonzero(), o[0].sum(0).nonzero()
        top = 4 - int(rows[0]) if int(rows[0]) > 0 else 4 + (8 - 1 - int(rows[-1]))
        left = 4 - int(cols[0]) if int(cols[0]) > 0 else 4 + (8 - 1 - int(cols[-1]))
        counts[top, left] += 1
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert (counts > 0).all(), "every one of the 81 offsets occurs"
    assert counts.max() / counts.mean() < 2.5, "offsets are uniform"


@pytest.mark.parametrize("device", DEVICES)
def test_augment_is_deterministic_per_seed(device):
    x = _images(n=16).to(device)
    again = [D.augment(x, "crop_flip", generator=torch.Generator(device=device).manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(again[0], again[1])
    assert not torch.equal(again[0], again[2])
    assert D.augment(x, "none") is x
    with pytest.raises(ValueError, match="augment must be one of"):
        D.augment(x, "flip")


# --------------------------------------------------------------------------------------- config


def test_fast_knobs_default_off_and_are_settings_not_searched():
    cfg = TrainConfig()
    assert (cfg.augment, cfg.precision, cfg.channels_last, cfg.compile) == ("none", "fp32", False, False)
    for key in ("augment", "precision", "channels_last", "compile"):
        assert key not in T.TRAIN_SPACE
        for name in NAMES:
            assert methods.hyperparameters(name)[key] == getattr(cfg, key)   # a plain value: a Fixed setting
            assert key not in methods.get(name).SEARCH_SPACE
    assert TrainConfig.from_hparams({**FAST, "augment": "crop", "compile": True, "lr": 0.1}) == \
        TrainConfig(lr=0.1, augment="crop", compile=True, **FAST)
    for bad in ({"augment": "flip"}, {"precision": "fp16"}, {"channels_last": 1}, {"compile": "yes"}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_search_config_fixes_the_fast_knobs():
    config = pytest.importorskip("search.config")
    raw = {"name": "t", "methods": ["pgd_at"], "threat_model": {"eps": 0.1},
           "train": {"augment": "crop", "precision": "bf16", "channels_last": True, "compile": False}}
    space = config.parse(raw).spaces()["pgd_at"]
    for key, value in raw["train"].items():
        assert isinstance(space[key], methods.space.Fixed) and space[key].value == value
    assert isinstance(config.parse({**raw, "train": {}}).spaces()["pgd_at"]["precision"], methods.space.Fixed)
    for bad in ({"precision": "fp16"}, {"channels_last": 1}, {"precision": {"low": 0, "high": 1}}):
        with pytest.raises(config.ConfigError):
            config.parse({**raw, "train": bad})


# --------------------------------------------------------------------------------------- training


def _run(digits, name="pgd_at", **hparams) -> Run:
    train, val = digits
    hparams = {"epochs": 1, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0,
               "attack_steps": 3, "val_n_ex": 64, "val_pgd_steps": 3, **hparams}
    cls = methods.get(name)
    norm = cls.norm or "Linf"
    return methods.build_run(name, hparams, dataset="digits", arch=cls.archs[0] if cls.archs else "small_cnn",
                             threat=methods.ThreatModel(norm, 0.1 if norm == "Linf" else 0.5),
                             train=train, val=val, device="cpu")


def test_defaults_train_exactly_as_the_plain_loop(digits):
    """With every knob off, ``fit`` is the loop it always was: shuffled batches into ``method.step``."""
    run = _run(digits)                # build_run seeds the global RNG, which the attacks draw from
    fit(run)
    reference = _run(digits)
    generator = torch.Generator().manual_seed(0)
    for x, y, idx in D.batches(reference.train, 64, shuffle=True, generator=generator):
        reference.method.step(x, y, idx)
    for (key, a), b in zip(run.model.state_dict().items(), reference.model.state_dict().values()):
        assert torch.equal(a, b), key


def test_bf16_channels_last_checkpoint_is_a_plain_one(digits):
    plain, fast = _run(digits), _run(digits, **FAST)
    seen = []
    fit(plain)
    fit(fast, lambda metrics, run: seen.append(metrics))
    assert math.isfinite(seen[0]["train/loss"]) and 0 <= seen[0]["val/pgd_acc"] <= 1
    assert fast.model.body[2].weight.is_contiguous(memory_format=torch.channels_last)   # the knob took effect
    state, plain_state = fast.state_dict(), plain.state_dict()
    assert list(state["model"]) == list(plain_state["model"])
    assert all(v.dtype == plain_state["model"][k].dtype for k, v in state["model"].items())
    assert list(fast.best_model) == list(plain.best_model)
    assert all(v.is_contiguous() and v.device.type == "cpu" for v in fast.best_model.values())
    assert state["optimizer"]["state"].keys() == plain_state["optimizer"]["state"].keys()

    fresh = methods.nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.306,), std=(0.385,))
    fresh.load_state_dict(fast.best_model)                                # strict: same keys and shapes
    best = fast.ema.model if fast.ema is not None else fast.model         # best_model: the averaged weights
    best.eval()
    fresh.eval()
    x = digits[1].x[:32]
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), best(x))

    # Checkpoints cross over both ways: a plain run resumes a fast one's, and vice versa.
    for source, target in ((state, _run(digits, epochs=2)), (plain_state, _run(digits, epochs=2, **FAST))):
        target.load_state_dict(source)
        fit(target)
        assert target.epoch == 2 and all(torch.isfinite(v).all() for v in target.model.state_dict().values())


@pytest.mark.parametrize("name", NAMES)
def test_every_method_steps_under_bf16_channels_last_and_augment(name, digits):
    run = _run(digits, name, augment="crop", **FAST)
    prepare(run)
    train = digits[0]
    metrics = train_step(run, train.x[:32], train.y[:32], torch.arange(32), generator=torch.Generator().manual_seed(0))
    assert math.isfinite(float(metrics["loss"]))
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in run.model.parameters())


def test_augmented_fit_is_seeded(digits):
    runs = []
    for hparams in ({"augment": "crop_flip"}, {"augment": "crop_flip"}, {}):
        runs.append(fit(_run(digits, seed=5, **hparams)))   # built (and so seeded) right before training
    weights = [run.model.body[0].weight for run in runs]
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2]), "augmentation changed nothing"


def test_compile_unavailable_warns_and_trains_eagerly(digits, monkeypatch):
    def unavailable(*args, **kwargs):
        raise RuntimeError("no compiler here\nsecond line")

    monkeypatch.setattr(torch, "compile", unavailable)
    run = _run(digits, compile=True, epochs=1)
    with pytest.warns(RuntimeWarning, match=r"^compile: skipped.*\(RuntimeError: no compiler here\)$"):
        fit(run)
    assert run.model._compiled_call_impl is None and run.epoch == 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("OTARENA_SLOW") != "1", reason="slow: set OTARENA_SLOW=1 (inductor compiles C++)")
def test_compiled_run_keeps_its_checkpoint_keys(digits):
    plain, compiled = _run(digits), _run(digits, compile=True, **FAST)
    fit(plain)
    fit(compiled)
    assert compiled.model._compiled_call_impl is not None
    assert list(compiled.state_dict()["model"]) == list(plain.state_dict()["model"])
    fresh = methods.nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.306,), std=(0.385,))
    fresh.load_state_dict(compiled.best_model)
