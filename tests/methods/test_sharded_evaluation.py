# SPDX-License-Identifier: Apache-2.0
"""An evaluation sharded over workers (methods/common/evaluate.py, Sharding; docs/cluster.md): the shards merge
into the unsharded result point for point, and a lost shard resumes from its own AutoAttack state file."""
from __future__ import annotations

import os

import numpy as np
import pytest

from otarena import methods
from otarena.methods.common import evaluate as stages
from otarena.methods.common.evaluate import evaluate_shard, merge_shards, shard_bounds

THREAT = methods.ThreatModel("Linf", 0.17)
SETTINGS = dict(n_ex=24, batch_size=6, pgd_steps=5, pgd_targets=2, sweep_steps=3, noise_draws=2, surrogate_epochs=1,
                transfer_steps=2, seed=1)
"""Every stage, cheaply: 24 points in 4 batches, so that each of 2 shards holds 2 batches."""


@pytest.fixture(scope="module")
def model(erm_digits_model):
    return erm_digits_model


@pytest.fixture(scope="module")
def data():
    return methods.data.load("digits", "test")


@pytest.fixture(scope="module")
def unsharded(model, data):
    return methods.evaluate(model, data, THREAT, **SETTINGS)


@pytest.fixture(scope="module")
def state(tmp_path_factory):
    """The unsharded evaluation's AutoAttack state file: each shard keeps its own beside it."""
    return str(tmp_path_factory.mktemp("sharded") / "autoattack.pt")


@pytest.fixture(scope="module")
def parts(model, data, state):
    """Both shards' measurements, the second shard's first (in whichever order they come back)."""
    return [evaluate_shard(model, data, THREAT, shard=shard, shards=2, state_path=state, **SETTINGS) for shard in (1, 0)]


def assert_same(merged: dict, whole: dict, *, but: tuple[str, ...] = ()) -> None:
    """Every key of the result equal (the stages' wall times aside), the per-point arrays element by element."""
    skip = {"stage_seconds", *but}
    assert set(merged) == set(whole)
    for key in set(whole) - skip - {"per_example"}:
        assert merged[key] == whole[key], key
    assert merged["per_example"].keys() == whole["per_example"].keys()
    for key, value in whole["per_example"].items():
        assert np.array_equal(merged["per_example"][key], value), key


def test_two_shards_merge_into_the_unsharded_result(model, data, unsharded, parts, state):
    assert [(part["start"], part["stop"]) for part in parts] == [(12, 24), (0, 12)]
    merged = methods.evaluate(model, data, THREAT, shards=parts, **SETTINGS)
    assert_same(merged, unsharded)
    # The comparison means something: the points fall at different stages of the cascade, some survive it,
    # and PGD breaks some of them.
    assert {1, 2, 5} <= set(unsharded["per_example"]["aa_stage"].tolist())
    assert 0 < unsharded["pgd_acc"] < unsharded["clean_acc"]
    # Each shard kept its own AutoAttack state file; the unsharded one was never written.
    assert os.path.exists(f"{state}.shard1of2") and os.path.exists(f"{state}.shard2of2")
    assert not os.path.exists(state)


def test_a_lost_shard_resumes_from_its_own_state_file(model, data, unsharded, parts, tmp_path, monkeypatch):
    monkeypatch.setattr(stages, "PROGRESS_EVERY_S", 0.0)  # every step of the cascade reaches the log
    state = str(tmp_path / "autoattack.pt")

    def preempted(line: str) -> None:
        if line.startswith("AutoAttack batch 2/2"):
            raise KeyboardInterrupt  # what a preemption looks like: the shard's first batch is saved, not its second

    with pytest.raises(KeyboardInterrupt):
        evaluate_shard(model, data, THREAT, shard=1, shards=2, state_path=state, log=preempted, **SETTINGS)
    resumed = evaluate_shard(model, data, THREAT, shard=1, shards=2, state_path=state, **SETTINGS)
    assert resumed["measured"]["autoattack"]["aa_resumed_batches"] == 1
    merged = methods.evaluate(model, data, THREAT, shards=[parts[1], resumed], **SETTINGS)
    assert merged["aa_resumed_batches"] == 1
    assert_same(merged, unsharded, but=("aa_resumed_batches",))


def test_shards_are_whole_batches_covering_the_points_once():
    assert shard_bounds(30, 8, 2) == [(0, 16), (16, 30)]
    assert shard_bounds(30, 8, 3) == [(0, 8), (8, 16), (16, 30)]
    assert shard_bounds(10, 8, 3) == [(0, 0), (0, 8), (8, 10)]  # fewer batches than shards: one gets none
    assert shard_bounds(10, 8, 1) == [(0, 10)]
    part = {"start": 0, "stop": 16, "n_ex": 30, "measured": {}, "stage_seconds": {}}
    with pytest.raises(ValueError, match="do not cover the 30 evaluated points"):
        merge_shards([part], 30)
    with pytest.raises(ValueError, match="do not cover"):
        merge_shards([part, {**part, "start": 8, "stop": 30}], 30)
