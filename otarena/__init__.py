# SPDX-License-Identifier: Apache-2.0
"""otarena: hyperparameter search, tracking and leaderboards for adversarially robust training.

The repository's folders install under this one name: ``methods/`` as ``otarena.methods`` (pure
PyTorch), ``search/`` as ``otarena.search`` (Ray Tune, Optuna, MLflow) and ``leaderboard/`` as
``otarena.leaderboard`` (MLflow records to tables and a site, no torch).
"""
from __future__ import annotations

from importlib import metadata

try:
    __version__ = metadata.version("otarena")
except metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
