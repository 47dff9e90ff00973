# SPDX-License-Identifier: Apache-2.0
"""Robust-training methods in pure PyTorch, registered by name.

Adding a method takes one file (a ``Method`` subclass with ``Config``, ``SEARCH_SPACE`` and a
docstring naming its paper and equation), its import line below and one line in ``REGISTRY``
(the recipe: docs/architecture.md, "Add a method"). The registry key is the method's name
everywhere: configs, MLflow tags and the leaderboard.

This package never imports ray, mlflow or optuna (``tests/test_layering.py`` checks it).
"""
from __future__ import annotations

import math
from dataclasses import fields
from typing import Any, Mapping, Optional

import torch

from otarena.methods.common import data as data
from otarena.methods.common import nets as nets
from otarena.methods.common.attacks import ThreatModel
from otarena.methods.common.evaluate import evaluate
from otarena.methods.common.method import Method
from otarena.methods.common.train import TRAIN_SPACE, Run, TrainConfig, build_optimizer, build_schedule, fit, pick_device
from otarena.methods.armor import ArmorMart, ArmorPgd, ArmorTrades
from otarena.methods.erm import Erm
from otarena.methods.got import GotPgdLM, GotPgdS, GotTradesLM, GotTradesS
from otarena.methods.hkr import Hkr
from otarena.methods.langevin import Langevin
from otarena.methods.mart import Mart
from otarena.methods.ot_mdr import OtMdr, OtMdrPgd, OtMdrTrades
from otarena.methods.pgd_at import PgdAT
from otarena.methods.trades import Trades

REGISTRY: dict[str, type[Method]] = {
    "erm": Erm,
    "pgd_at": PgdAT,
    "trades": Trades,
    "mart": Mart,
    "got_pgd_s": GotPgdS,
    "got_pgd_lm": GotPgdLM,
    "got_trades_s": GotTradesS,
    "got_trades_lm": GotTradesLM,
    "langevin": Langevin,
    "ot_mdr": OtMdr,
    "ot_mdr_pgd": OtMdrPgd,
    "ot_mdr_trades": OtMdrTrades,
    "armor_trades": ArmorTrades,
    "armor_mart": ArmorMart,
    "armor_pgd": ArmorPgd,
    "hkr": Hkr,
}

__all__ = ["REGISTRY", "get", "hyperparameters", "defaults", "build_run", "evaluate", "fit", "ThreatModel", "TrainConfig",
           "Method", "Run", "data", "nets"]


def get(name: str) -> type[Method]:
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(REGISTRY)}")
    return REGISTRY[name]


def hyperparameters(name: str) -> dict[str, Any]:
    """Every hyperparameter ``name`` accepts, with its domain: the shared knobs, then its own.

    Method-specific fields without a declared domain (e.g. a categorical switch that is not
    searched) appear with their default value.
    """
    cls = get(name)
    shared = {f.name: TRAIN_SPACE.get(f.name, f.default) for f in fields(TrainConfig)}
    declared = {**cls.OPTIONAL_SPACE, **cls.SEARCH_SPACE}
    own = {f.name: declared.get(f.name, f.default) for f in fields(cls.Config)}
    return {**shared, **own, **cls.SEARCH_SPACE}


def defaults(name: str) -> dict[str, Any]:
    """The ``TrainConfig`` and ``Config`` default of every hyperparameter ``name`` accepts."""
    cls = get(name)
    return {f.name: f.default for f in (*fields(TrainConfig), *fields(cls.Config))}


def build_run(method: str, hparams: Mapping[str, Any], *, dataset: str, arch: str, threat: ThreatModel,
              data_dir: Optional[str] = None, download: bool = False, device: str | torch.device = "auto",
              train=None, val=None) -> Run:
    """Everything one training run needs, from names and a flat hyperparameter dict.

    ``train``/``val`` may be passed in already loaded (Ray shares them through its object store).
    """
    device = pick_device(device) if isinstance(device, str) else device
    cfg = TrainConfig.from_hparams(hparams)
    torch.manual_seed(cfg.seed)
    train = train if train is not None else data.load(dataset, "train", data_dir=data_dir, download=download)
    val = val if val is not None else data.load(dataset, "val", data_dir=data_dir, download=download)
    info = train.info
    model = nets.build(arch, in_channels=info.in_channels, num_classes=info.num_classes,
                       mean=info.mean, std=info.std).to(device)
    optimizer = build_optimizer(model, cfg)
    threat = ThreatModel(threat.norm, threat.eps, steps=cfg.attack_steps, step_size=cfg.attack_step_size)
    cls = get(method)
    instance = cls(model, optimizer, threat, cls.config_from(hparams), n_train=len(train), device=device)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)   # batches() keeps the last partial batch
    return Run(instance, build_schedule(optimizer, cfg, steps_per_epoch), train.to(device), val.to(device), cfg)
