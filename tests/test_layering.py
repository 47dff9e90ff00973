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
    banned = sorted(m for m in sys.modules if sys.modules[m] is not None
                    and any(m == b or m.startswith(b + ".") for b in {banned!r}))
    assert not banned, f"importing {package!r} pulled in {{banned}}"
    print(len(names))
""")


def _import_all(package: str, banned: set[str], prelude: str = "") -> int:
    script = IMPORT_ALL.format(package=package, banned=sorted(banned), prelude=prelude)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.split()[-1])


def test_methods_imports_no_ray_mlflow_or_optuna():
    n = _import_all("otarena.methods", {"ray", "mlflow", "optuna"})
    assert n == len(list((ROOT / "methods").rglob("*.py")))   # every file was imported


def test_leaderboard_imports_with_torch_blocked():
    # With sys.modules["torch"] = None, any `import torch` (direct or through a dependency) raises.
    n = _import_all("otarena.leaderboard", {"ray", "otarena.methods", "otarena.search"},
                    prelude='sys.modules["torch"] = None')
    assert n == len(list((ROOT / "leaderboard").rglob("*.py")))


def _layer(module: str) -> str:
    """``otarena.methods.common`` -> ``methods``: otarena's layers by their folder, others by their top name."""
    parts = module.split(".")
    return parts[1] if parts[0] == "otarena" and len(parts) > 1 else parts[0]


def _imported_roots(path: Path) -> set[str]:
    """Layers (or top-level names) of every absolute import in ``path``, at any depth."""
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(_layer(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "otarena":  # `from otarena import methods`
                roots.update(alias.name for alias in node.names)
            else:
                roots.add(_layer(node.module))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in \
                ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            roots.add(_layer(str(node.args[0].value)))
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


def test_layers_install_under_the_otarena_namespace():
    """No file imports the bare folder names, which would shadow (or be shadowed by) a user's module."""
    files = [f for d in ("methods", "search", "leaderboard", "otarena", "tests", "benchmarks")
             for f in (ROOT / d).rglob("*.py")]
    bare = {}
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
            hits = [n for n in names if n.split(".")[0] in {"methods", "search", "leaderboard"}]
            if hits:
                bare[str(f.relative_to(ROOT))] = hits
    assert not bare, bare
    proc = subprocess.run([sys.executable, "-c", "import otarena.methods, otarena.search, otarena.leaderboard\n"
                           "import importlib.util as u; assert u.find_spec('methods') is None"],
                          cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
