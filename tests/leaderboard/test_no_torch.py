# SPDX-License-Identifier: Apache-2.0
"""Layering: the leaderboard imports and runs with torch blocked (docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
sys.modules["torch"] = None  # any `import torch` now raises ImportError
import otarena.leaderboard.collect, otarena.leaderboard.render, otarena.leaderboard.schema
from otarena import leaderboard
from mlflow import MlflowClient
uri = "sqlite:///" + sys.argv[1] + "/mlflow.db"
MlflowClient(uri).search_experiments()
assert leaderboard.build(uri, sys.argv[1] + "/site") == []
banned = [m for m in ("ray", "otarena.methods", "otarena.search") if m in sys.modules]
assert not banned, banned
"""


def test_leaderboard_imports_and_builds_without_torch(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
