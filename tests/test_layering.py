# SPDX-License-Identifier: Apache-2.0
"""Layering (docs/architecture.md): methods/ is pure torch, leaderboard/ never needs torch.

Checked twice: dynamically, by importing every module in a fresh interpreter (as Ray's
test_soft_imports and POT's guarded backends do), and statically, by reading every import
statement, including lazy ones inside functions.
"""
from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

IMPORT_ALL = textwrap.dedent("""
    import importlib, pkgutil, sys
    {prelude}
    package = importlib.import_module({package!r})
    names = [package.__name__] + [info.name for info in
                                  pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    banned = sorted(m for m in sys.modules if m.split(".")[0] in {banned!r} and sys.modules[m] is not None)
    assert not banned, f"importing {package!r} pulled in {{banned}}"
    print(len(names))
""")


def _import_all(package: str, banned: set[str], prelude: str = "") -> int:
    script = IMPORT_ALL.format(package=package, banned=sorted(banned), prelude=prelude)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_methods_imports_no_ray_mlflow_or_optuna():
    n = _import_all("methods", {"ray", "mlflow", "optuna"})
    assert n == len(list((ROOT / "methods").rglob("*.py")))   # every file was imported


def test_leaderboard_imports_with_torch_blocked():
    # With sys.modules["torch"] = None, any `import torch` (direct or through a dependency) raises.
    n = _import_all("leaderboard", {"ray", "methods", "search"}, prelude='sys.modules["torch"] = None')
    assert n == len(list((ROOT / "leaderboard").rglob("*.py")))


def _imported_roots(path: Path) -> set[str]:
    """Top-level names of every absolute import in ``path``, at any depth."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in \
                ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(str(node.args[0].value).split(".")[0])
    return roots


@pytest.mark.parametrize("package,banned", [
    ("methods", {"ray", "mlflow", "optuna", "search", "leaderboard"}),
    ("leaderboard", {"torch", "ray", "methods", "search"}),
])
def test_no_banned_import_statements(package, banned):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files
    offenders = {str(f.relative_to(ROOT)): sorted(_imported_roots(f) & banned) for f in files}
    offenders = {f: names for f, names in offenders.items() if names}
    assert not offenders, offenders


def test_import_scanner_sees_lazy_imports(tmp_path):
    """The static check above can fail: it finds imports inside functions and via importlib."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    import ray.tune as tune\n    from mlflow import log_metric\n"
                      "    importlib.import_module('optuna.samplers')\nfrom . import sibling\n")
    assert _imported_roots(sample) == {"ray", "mlflow", "optuna"}
