# SPDX-License-Identifier: Apache-2.0
import socket

import pytest


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test: data must load offline."""
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def erm_digits_model():
    """A SmallCNN briefly trained by ERM on digits (2 epochs, seed 0), once for the whole session: at L-inf eps
    0.15 some points fall to each attack of AutoAttack's cascade and some survive. Tests never change it."""
    from otarena import methods

    hparams = {"epochs": 2, "optimizer": "adam", "lr": 2e-3, "batch_size": 32, "val_pgd_steps": 1}
    run = methods.build_run("erm", hparams, dataset="digits", arch="small_cnn",
                            threat=methods.ThreatModel("Linf", 0.15), device="cpu")
    methods.fit(run)
    return run.model.eval()


@pytest.fixture(scope="session")
def honest_digits_model():
    """``honest_digits_model(eps=0.2)``: a SmallCNN trained with PGD-AT on digits at L-inf ``eps`` (6 epochs,
    the demo's settings, seed 0), trained once per eps for the whole session: an honest robust model."""
    import functools

    from otarena import methods

    @functools.lru_cache(maxsize=None)
    def train(eps: float = 0.2):
        hparams = {"epochs": 6, "optimizer": "adam", "lr": 2e-3, "batch_size": 32, "weight_decay": 0.0,
                   "schedule": "cosine", "attack_steps": 5, "val_pgd_steps": 5, "seed": 0}
        run = methods.build_run("pgd_at", hparams, dataset="digits", arch="small_cnn",
                                threat=methods.ThreatModel("Linf", eps), device="cpu")
        methods.fit(run)
        run.model.load_state_dict(run.best_model)
        return run.model.eval()   # shared by the whole session: a test wraps it, never trains or changes it

    return train
