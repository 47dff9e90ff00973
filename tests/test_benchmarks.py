# SPDX-License-Identifier: Apache-2.0
"""Every benchmark script runs in its --quick mode (a smoke test: correctness, never time)."""
import json
import os
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


GPU_CHECK = SCRIPTS[0].parent / "gpu_check.py"
CPU_PARTS = ["pgd_at_epoch", "method_steps", "gpu_throughput", "attack_speed", "autoattack"]
"""gpu_check's parts that run in seconds on a CPU. The packed search starts Ray and MLflow (about two minutes on 2
busy cores; tests/search covers that path) and the compiled epoch waits on the C++ compiler: both run on a GPU."""


def test_gpu_check_without_a_gpu_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(GPU_CHECK)], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("no CUDA GPU here: "), proc.stdout
    assert not list(tmp_path.iterdir()), "it must stop before any work"


def test_gpu_check_runs_its_parts_tiny_on_cpu(tmp_path):
    from otarena import methods

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(GPU_CHECK), "--device", "cpu", "--quick", "--parts", ",".join(CPU_PARTS),
                           "--out", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    errors = {part: record.get("error") for part, record in report["parts"].items() if record["status"] != "ok"}
    assert not errors and list(report["summary"]) == CPU_PARTS, errors
    assert report["device"].startswith("CPU") and report["quick"]
    steps = report["parts"]["method_steps"]["result"]["rows"]
    assert {(r["method"], r["precision"]) for r in steps if r["ok"]} == {
        (name, precision) for name in methods.REGISTRY for precision in ("fp32", "bf16")}
    assert all(r["step_s"] > 0 for r in steps)
    assert set(report["pgd_at_epoch_s"]) == {"fp32", "fast"} and all(s > 0 for s in report["pgd_at_epoch_s"].values())
    throughput = report["parts"]["gpu_throughput"]["result"]["rows"]
    assert {r["method"] for r in throughput} == {"erm", "pgd_at"} and all(r["images_per_s"] > 0 for r in throughput)
    assert {m["model"] for m in report["parts"]["attack_speed"]["result"]["models"]} == {"digits", "resnet"}
    assert report["parts"]["autoattack"]["result"]["points"] == 8


def test_hypervolume_is_exact_in_2d():
    import importlib.util
    import random

    spec = importlib.util.spec_from_file_location("_hypervolume", SCRIPTS[0].parent / "_hypervolume.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    hypervolume = module.hypervolume
    assert hypervolume([]) == 0.0
    assert hypervolume([(0.5, 0.4)]) == 0.5 * 0.4
    assert hypervolume([(1.0, 0.5), (0.5, 1.0)]) == 0.75                  # two boxes less their overlap
    assert hypervolume([(1.0, 0.5), (0.5, 1.0), (0.4, 0.4), (1.0, 0.5)]) == 0.75   # dominated and repeated points add nothing
    assert hypervolume([(-0.2, 0.9), (0.6, -1.0)]) == 0.0                 # below the reference point (0, 0)

    def slabs(points):
        """The same area another way: between consecutive x, the tallest point at least that wide."""
        xs = sorted({0.0, *(x for x, _ in points)})
        return sum((right - left) * max([y for x, y in points if x >= right] + [0.0])
                   for left, right in zip(xs, xs[1:]))

    rng = random.Random(0)
    for _ in range(200):
        points = [(rng.random(), rng.random()) for _ in range(rng.randint(1, 12))]
        assert abs(hypervolume(points) - slabs(points)) < 1e-12


def test_search_efficiency_hypervolume_quick(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS[0].parent / "search_efficiency.py"), "--hypervolume", "--quick"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "multi-objective (optuna-tpe-mo, mo-asha)" in proc.stdout and "single-objective (optuna-tpe, asha)" in proc.stdout
    assert "at equal trial-epochs" in proc.stdout
