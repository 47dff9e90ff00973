# SPDX-License-Identifier: Apache-2.0
"""A NaN or infinite training loss stops the run with DivergedError (the trial then ends as failed)."""
import pytest
import torch

from otarena import methods
from otarena.methods.common.train import DivergedError


def test_nan_loss_raises_diverged_error():
    run = methods.build_run("pgd_at", {"epochs": 2, "batch_size": 64, "val_n_ex": 16, "attack_steps": 1},
                            dataset="digits", arch="small_cnn", threat=methods.ThreatModel("Linf", 0.2), device="cpu")
    with torch.no_grad():
        run.model.head.weight.fill_(float("nan"))
    with pytest.raises(DivergedError, match="training loss is nan at epoch 1"):
        methods.fit(run)
