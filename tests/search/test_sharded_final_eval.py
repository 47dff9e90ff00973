# SPDX-License-Identifier: Apache-2.0
"""``final_eval.shards`` in a search (docs/cluster.md, multi-GPU AutoAttack): each shard is a Ray task, the merge
one more, and the result is the unsharded evaluation's, point for point."""
from __future__ import annotations

import os

import numpy as np
import ray
import torch
from ray import tune

from otarena import methods
from otarena.search import config as config_lib
from otarena.search import evaluation
from otarena.search import run as search_run
from otarena.search.trainable import STATE_FILE, TrialSpec


def test_sharded_final_evaluation_runs_as_ray_tasks_and_equals_the_unsharded_one(ray_local, tmp_path):
    threat = methods.ThreatModel("Linf", 0.2)
    hparams = {"epochs": 1, "optimizer": "adam", "lr": 2e-3, "batch_size": 32, "val_pgd_steps": 1}
    trained = methods.build_run("erm", hparams, dataset="digits", arch="small_cnn", threat=threat, device="cpu")
    methods.fit(trained)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    torch.save({"best_model": trained.best_model}, folder / STATE_FILE)
    cfg = config_lib.parse({
        "name": "sharded", "threat_model": {"norm": "Linf", "eps": threat.eps}, "methods": ["erm"],
        "final_eval": {"n_ex": 24, "batch_size": 6, "shards": 2, "pgd_steps": 3, "pgd_targets": 1, "sweep_steps": 2,
                       "checks": ["fgsm", "noise"]},
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "ray")})
    spec = TrialSpec("erm", "digits", "small_cnn", threat.norm, threat.eps, fixed={})
    test = methods.data.load("digits", "test")

    merging, shards = search_run._evaluation_task(cfg, tune.Checkpoint.from_directory(str(folder)), spec,
                                                  ray.put(test), "erm-t1")
    assert len(shards) == 2  # one task per shard, and the merging task Ray starts once both are done
    result, weights = ray.get(merging)
    whole = evaluation.evaluate_weights(weights, method="erm", arch="small_cnn", norm=threat.norm, eps=threat.eps,
                                        test_data=test, eval_cfg=cfg.final_eval.model_dump(), seed=cfg.seed)
    assert set(result) == set(whole)
    for key in set(whole) - {"stage_seconds", "per_example"}:
        assert result[key] == whole[key], key
    for key, value in whole["per_example"].items():
        assert np.array_equal(result["per_example"][key], value), key
    state = search_run._aa_state_path(cfg, "erm-t1")
    assert os.path.exists(f"{state}.shard1of2") and os.path.exists(f"{state}.shard2of2")  # the shards' own
