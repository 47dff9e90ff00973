# SPDX-License-Identifier: Apache-2.0
"""Every benchmark script runs in its --quick mode (a smoke test: correctness, never time)."""
import pathlib
import subprocess
import sys

import pytest

SCRIPTS = sorted(p for p in (pathlib.Path(__file__).resolve().parents[1] / "benchmarks").glob("*.py")
                 if not p.name.startswith("_"))  # _report.py is a shared helper, not a benchmark


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_benchmark_quick(script, tmp_path):
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
