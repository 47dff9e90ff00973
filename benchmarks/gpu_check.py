# SPDX-License-Identifier: Apache-2.0
"""Every GPU check of otarena in one command, in at most 8 minutes on one GPU, into one JSON.

The parts, each in its own process under its own time box (a part that fails, hangs or breaks its
CUDA context is recorded with its error and the next part still runs):

    pgd_at_epoch     seconds of one PGD-10 AT epoch of PreAct-ResNet-18 over 50,000 CIFAR-shaped
                     images (random tensors, batch 500, 100 steps), on the plain fp32 path and on the
                     fast path (bf16 autocast, channels-last, on-device crop+flip). Target <= 10 s on
                     an H100-class GPU; the unoptimized reference the issue cites takes ~70 s.
    method_steps     one training step of every registered method in fp32 and in bf16 (autocast):
                     ok or its error, and the step time (median of the timed steps after one warm-up).
    gpu_throughput   ERM and PGD-10 AT images/s on PreAct-ResNet-18, each fast-path knob alone and
                     all together (benchmarks/gpu_throughput.py's ``throughput``; compile only with
                     ``--compile``).
    attack_speed     PGD images/s against torchattacks and APGD-CE (benchmarks/attack_speed.py's
                     ``measure``): a random PreAct-ResNet-18 and a SmallCNN briefly trained on digits.
    autoattack       standard AutoAttack (methods.common.autoattack) on 1,000 random CIFAR-shaped
                     points against a PreAct-ResNet-18 with random weights whose own predictions are
                     the labels, so every point starts correct: a speed check, not a robustness
                     figure. APGD-CE breaks nearly every point of a random network, so the later
                     attacks have little left to do: a robust model takes longer.
    packed_search    otarena's real search path (search.run.run_search: Ray Tune, Optuna, MLflow) on
                     digits, two PGD-AT trials at ``resources.gpu: 0.5`` on the one GPU: their MLflow
                     runs must overlap in time, and nvidia-smi is sampled for the processes on the GPU.
    pgd_at_epoch_compiled   the fast path of pgd_at_epoch with ``compile`` on (last: compiling takes a while).

Run it where a GPU is: ``python benchmarks/gpu_check.py`` writes
``benchmarks/results/gpu_check-<device>.json``. Without a GPU it prints one line and exits 0 before
any work. ``--device cpu --quick`` runs every part tiny on the CPU (the test's smoke mode; its
figures measure nothing and it writes only to ``--out``).

On the device machine of the project's device tool (no registry, no otarena install, a Python with
torch but without Ray, MLflow, Optuna, pyautoattack, torchattacks or deel-torchlip): a source tree
that was never pip-installed still imports (``use_source_tree``); each missing package is named with
what to ``pip install``. The README's Performance section gives the commands that carry the small
wheels there; Ray's wheel (79 MB) is over the tool's 64 MiB, so the packed search records that Ray
is missing there and runs wherever otarena is installed (``make install``).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

BUDGET_S = 480.0
"""The issue's limit for the whole check on one GPU."""
PARTS = {  # name -> its time box in seconds on a GPU, most wanted first
    "pgd_at_epoch": 120, "method_steps": 75, "gpu_throughput": 75, "attack_speed": 60, "autoattack": 60,
    "packed_search": 120, "pgd_at_epoch_compiled": 120}
QUICK_BOX_S, QUICK_BUDGET_S = 300, 900
"""Each part's box and the whole budget in ``--quick`` mode: a smoke test on a shared CPU, never a timing
(the packed search alone starts Ray and MLflow: about two minutes on 2 busy cores)."""
AUTOATTACK_POINTS = 1000
EPOCH_BATCH = 500
"""50,000 / 500: the epoch is exactly 100 full steps."""
DISTRIBUTIONS = {"deel": "deel-torchlip", "sklearn": "scikit-learn", "yaml": "pyyaml", "ray": "'ray[tune]'",
                 "mlflow": "mlflow", "optuna": "optuna", "pydantic": "pydantic", "pyautoattack": "pyautoattack",
                 "torchattacks": "torchattacks", "zarr": "zarr", "scipy": "scipy", "numpy": "numpy",
                 "torch": "torch", "torchvision": "torchvision"}


def pip_hint(err: BaseException) -> str:
    """What to install for a failed import, in pip's words (pyproject.toml pins the versions)."""
    module = (getattr(err, "name", None) or "").split(".")[0]
    if not module or module == "otarena":
        return f"{err} (run from a checkout of otarena: python benchmarks/gpu_check.py)"
    return (f"{module} is not importable here ({err}): pip install {DISTRIBUTIONS.get(module, module)} "
            f"(versions: pyproject.toml; everything: pip install -e '.[dev]')")


def use_source_tree() -> None:
    """Import ``otarena.methods`` (and ``.search``) from this checkout even where it was never installed.

    pip maps the repository's top-level folders into the ``otarena`` namespace (pyproject.toml); a bare
    checkout has only ``otarena/__init__.py``, so its package path is widened to the repository root,
    where ``methods/``, ``search/`` and ``leaderboard/`` are.
    """
    import otarena

    if importlib.util.find_spec("otarena.methods") is None:
        otarena.__path__.append(REPO)


# ------------------------------------------------------------------------------------------- parts
# Each part runs in a child process (``--part NAME``) and returns a JSON-able dict.

PART_OUT = None
"""The child's result file: a part with a loop also writes what it has so far (``so_far``), which a timeout keeps."""


def so_far(rows) -> None:
    if PART_OUT:
        with open(PART_OUT, "w") as f:
            json.dump({"status": "partial", "result": {"rows_so_far": rows}}, f, default=str)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_pgd_at_epoch(device, quick: bool, compiled: bool = False) -> dict:
    """One timed PGD-10 AT epoch per path, after a few warm-up steps (allocator, cuDNN autotuning, compiling)."""
    from benchmarks import gpu_throughput as G

    n, batch = (64, 32) if quick else (G.EPOCH_IMAGES, EPOCH_BATCH)
    spec = {"arch": "small_cnn" if quick else "preact_resnet18", "batch_size": batch,
            "attack_steps": 2 if quick else 10}
    data = G.synthetic(n, device)
    paths = {"fast+compile": {**G.FAST, "compile": True}} if compiled else {"fp32": {}, "fast": G.FAST}
    rows = {}
    for path, knobs in paths.items():
        run = G.build(G.TRIAL_METHOD, knobs, spec, data, device)
        start = time.perf_counter()
        G.time_steps(run, 1 if quick else 5, device)
        warmup = time.perf_counter() - start
        seconds = G.time_steps(run, n // batch, device, seed=1)
        rows[path] = {"knobs": knobs, "epoch_s": seconds, "images_per_s": n / seconds, "warmup_s": warmup,
                      "projected_50k_epoch_s": seconds * G.EPOCH_IMAGES / n}
        print(f"PGD-{spec['attack_steps']} AT epoch over {n:,} images, {path}: {seconds:.1f} s "
              f"(warm-up {warmup:.1f} s)", flush=True)
        so_far(rows)
        del run
        free(device)
    best = min(rows.values(), key=lambda r: r["epoch_s"])
    return {"arch": spec["arch"], "images": n, "batch_size": batch, "attack_steps": spec["attack_steps"],
            "data": "random CIFAR-shaped tensors (throughput does not depend on the pixels)", "paths": rows,
            "target_epoch_s": G.TARGET_EPOCH_S, "reference_epoch_s": G.REFERENCE_EPOCH_S,
            "target_met": None if quick else best["epoch_s"] <= G.TARGET_EPOCH_S}


def free(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()


def part_method_steps(device, quick: bool) -> dict:
    """Every registered method, fp32 and bf16: build, one warm-up step, then timed steps; finite weights after."""
    import torch

    from benchmarks import gpu_throughput as G
    from otarena import methods

    batch, steps = (8, 1) if quick else (128, 5)
    data = G.synthetic(batch * (steps + 1), device)
    rows = []
    for name, cls in sorted(methods.REGISTRY.items()):
        norm = cls.norm or "Linf"
        threat = methods.ThreatModel(norm, 8 / 255 if norm == "Linf" else 0.5)   # CIFAR's usual radii
        arch = "small_cnn" if quick else "preact_resnet18"
        if cls.archs:   # a certified method trains its own (1-Lipschitz) networks
            arch = cls.archs[0] if quick or "lipschitz_cifar" not in cls.archs else "lipschitz_cifar"
        spec = {"arch": arch, "batch_size": batch, "attack_steps": 2 if quick else 10}
        for precision in ("fp32", "bf16"):
            row = {"method": name, "precision": precision, "arch": arch, "norm": norm}
            try:
                run = G.build(name, {"precision": precision}, spec, data, device, threat=threat)
                G.time_steps(run, 1, device)
                seconds = [G.time_steps(run, 1, device, seed=s + 1) for s in range(steps)]
                finite = all(torch.isfinite(p).all() for p in run.model.parameters())
                row.update(ok=finite, step_s=statistics.median(seconds), images_per_s=batch / statistics.median(seconds),
                           **({} if finite else {"error": "non-finite weights after the steps"}))
                del run
            except Exception as err:  # noqa: BLE001 (recorded: the other methods still run)
                row.update(ok=False, error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc()[-2000:])
            free(device)
            print(f"{name:<14} {precision:<5} {'ok' if row['ok'] else 'FAILED':<6} "
                  + (f"{row['step_s'] * 1000:8.1f} ms/step" if "step_s" in row else row.get("error", "")), flush=True)
            rows.append(row)
            so_far(rows)
    return {"batch_size": batch, "timed_steps": steps, "rows": rows, "all_ok": all(r["ok"] for r in rows),
            "failed": [f"{r['method']}/{r['precision']}" for r in rows if not r["ok"]]}


def part_gpu_throughput(device, quick: bool, compile: bool = False) -> dict:
    from benchmarks import gpu_throughput as G

    args = argparse.Namespace(batch_size=8 if quick else 512, steps=2 if quick else 10, warmup=1 if quick else 3,
                              rounds=1 if quick else 3, attack_steps=10, compile=compile)
    spec = {"arch": "small_cnn" if quick else "preact_resnet18", "batch_size": args.batch_size,
            "attack_steps": 2 if quick else args.attack_steps}
    rows = G.throughput(args, device, spec)
    G.report_throughput(args, rows)
    return {"arch": spec["arch"], **vars(args), "attack_steps": spec["attack_steps"], "rows": rows}


def part_attack_speed(device, quick: bool) -> dict:
    from benchmarks import attack_speed as A   # exits with its pip hint if torchattacks is missing

    args = argparse.Namespace(steps=2 if quick else 10, rounds=1 if quick else 15)
    results = [A.measure("digits", *A.digits_model(device, quick), args, device)]
    args.rounds = 1 if quick else 7
    model, x, y, eps = A.resnet_model(device, 2 if quick else 256, arch="small_cnn" if quick else "preact_resnet18")
    results.append(A.measure("resnet", model, x, y, eps, args, device))
    target = A.verdict(results)
    return {"steps": args.steps, "target_speedup": A.TARGET_SPEEDUP, "target": target, "models": results}


def part_autoattack(device, quick: bool) -> dict:
    from benchmarks import attack_speed as A
    from otarena import methods
    from otarena.methods.common.autoattack import autoattack_cascade

    n, arch = (8, "small_cnn") if quick else (AUTOATTACK_POINTS, "preact_resnet18")
    model, x, y, eps = A.resnet_model(device, n, arch=arch)
    if quick:
        # A random SmallCNN is nearly constant, hence "robust": the whole cascade would run for minutes on a
        # CPU. Wrong labels make every point misclassified clean, so the smoke test runs the call, not the attacks.
        y = (y + 1) % 10
    sync(device)
    start = time.perf_counter()
    result = autoattack_cascade(model, x, y, methods.ThreatModel("Linf", eps), version="standard",
                                batch_size=500)
    sync(device)
    seconds = time.perf_counter() - start
    print(f"AutoAttack (standard, Linf {eps:.4f}) on {n} points: {seconds:.1f} s, robust accuracy "
          f"{result.robust_acc:.3f}", flush=True)
    return {"points": n, "arch": arch, "weights": "random (speed only)",
            "labels": "the model's own predictions, shifted by one class" if quick else "the model's own predictions",
            "eps": eps, "version": "standard", "seconds": seconds, "points_per_s": n / seconds,
            "clean_acc": result.clean_acc, "robust_acc": result.robust_acc, "per_attack": result.per_attack(),
            "checks": result.checks}


class GpuProcesses(threading.Thread):
    """Samples the processes holding a CUDA context (nvidia-smi) until stopped: the most seen at once."""

    def __init__(self, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.every_s, self.most, self.samples, self.error = every_s, 0, 0, None
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every_s):
            try:
                out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid", "--format=csv,noheader"],
                                     capture_output=True, text=True, timeout=10, check=True).stdout
            except (OSError, subprocess.SubprocessError) as err:
                self.error = f"{type(err).__name__}: {err}"
                return
            self.samples += 1
            self.most = max(self.most, len([line for line in out.splitlines() if line.strip()]))


def part_packed_search(device, quick: bool) -> dict:
    """Two trials of a real search at gpu: 0.5 (cpu: 1 on a CPU), both started at once: do they overlap?"""
    import ray
    from mlflow import MlflowClient

    from otarena.search import config as config_lib
    from otarena.search.run import run_search

    cuda = device.type == "cuda"
    folder = tempfile.mkdtemp(prefix="gpu_check_search_")
    cfg = config_lib.parse({
        "name": "gpu-check-packed", "dataset": "digits", "arch": "small_cnn",
        "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": ["pgd_at"],
        "train": {"optimizer": "adam", "batch_size": 64, "val_n_ex": 64, "attack_steps": 2 if quick else 5},
        "space": {"common": {"lr": {"low": 1e-3, "high": 5e-3, "log": True}}},
        "budget": {"trials": 2, "max_epochs": 1 if quick else 3, "grace_epochs": 1, "scheduler": "fifo",
                   "max_concurrent": 2},
        "resources": {"cpu": 1, "gpu": 0.5 if cuda else 0},
        "final_eval": {"top_k": 1, "n_ex": 32 if quick else 200, "pgd_steps": 2 if quick else 10, "autoattack": None,
                       "eps_sweep": False, "checks": [], "seeds": 1},
        "tracking_uri": f"sqlite:///{folder}/mlflow.db", "storage_path": os.path.join(folder, "ray"),
    })
    watcher = GpuProcesses() if cuda and shutil.which("nvidia-smi") else None
    start = time.perf_counter()
    if watcher:
        watcher.start()
    try:
        run_search(cfg, out_dir=None)
    finally:
        if watcher:
            watcher.stopped.set()
        cluster = ray.cluster_resources() if ray.is_initialized() else {}
        ray.shutdown()
    seconds = time.perf_counter() - start
    client = MlflowClient(cfg.tracking_uri)
    experiment = client.get_experiment_by_name(cfg.name)
    trials = client.search_runs([experiment.experiment_id], filter_string="tags.`otarena.role` = 'trial'")
    spans = sorted((r.info.start_time / 1000, (r.info.end_time or 0) / 1000) for r in trials)
    overlap = min(end for _, end in spans) - max(begin for begin, _ in spans) if len(spans) == 2 else None
    shutil.rmtree(folder, ignore_errors=True)
    print(f"packed search: {len(trials)} trials, overlapping {overlap if overlap is not None else 'n/a'} s, "
          f"{seconds:.0f} s in all", flush=True)
    return {"resources": {"cpu": 1, "gpu": 0.5 if cuda else 0}, "ray_cluster": cluster, "trials": len(trials),
            "outcomes": sorted(r.data.tags.get("otarena.outcome", "?") for r in trials),
            "trial_spans_s": [[round(b - spans[0][0], 2), round(e - spans[0][0], 2)] for b, e in spans],
            "overlap_s": overlap, "overlapped": overlap is not None and overlap > 0, "seconds": seconds,
            "gpu_processes_at_once": watcher.most if watcher else None,
            "gpu_process_samples": watcher.samples if watcher else None,
            "gpu_process_error": watcher.error if watcher else "nvidia-smi not here" if cuda else None}


def run_part(name: str, device_name: str, quick: bool, out: str) -> int:
    """The child: one part, its result or its error into ``out``."""
    import torch

    global PART_OUT
    PART_OUT, started = out, time.perf_counter()
    try:
        use_source_tree()
        device = torch.device(device_name)
        if device.type == "cpu":
            torch.set_num_threads(1)   # a smoke test beside other jobs on few cores
        if name == "pgd_at_epoch_compiled":
            result = part_pgd_at_epoch(device, quick, compiled=True)
        else:
            result = globals()[f"part_{name}"](device, quick)
        record = {"status": "ok", "result": result}
    except ImportError as err:
        record = {"status": "error", "error": pip_hint(err), "traceback": traceback.format_exc()[-3000:]}
    except BaseException as err:  # noqa: BLE001 (SystemExit too: attack_speed exits when torchattacks is missing)
        record = {"status": "error", "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
    record["seconds"] = time.perf_counter() - started
    with open(out, "w") as f:
        json.dump(record, f, default=str)
    return 0


# ------------------------------------------------------------------------------------------- driver


def run_in_child(name: str, device: str, quick: bool, timeout_s: float) -> dict:
    """One part in its own process group, killed with all it started (Ray's too) past ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        out = os.path.join(folder, "part.json")
        command = [sys.executable, os.path.abspath(__file__), "--part", name, "--device", device, "--part-out", out]
        start = time.perf_counter()
        child = subprocess.Popen(command + (["--quick"] if quick else []), start_new_session=True)
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            partial = {}
            try:   # what a part with a loop had finished (so_far), unless the kill came mid-write
                with open(out) as f:
                    partial = {"result": json.load(f)["result"]}
            except (OSError, ValueError, KeyError):
                pass
            return {"status": "timeout", "error": f"stopped after its {timeout_s:.0f} s box",
                    "seconds": time.perf_counter() - start, **partial}
        finally:
            try:   # whatever the part left running in its group (Ray's raylet, workers)
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if not os.path.exists(out):
            return {"status": "error", "error": f"the part's process died (exit code {code}) before reporting",
                    "seconds": time.perf_counter() - start}
        with open(out) as f:
            return json.load(f)


def no_gpu_line(torch) -> str:
    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (f"no CUDA GPU here: torch {torch.__version__} ({build}) sees none; run it where a GPU is "
            f"(python benchmarks/gpu_check.py), or --device cpu --quick for a smoke test")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else exit 0), cuda[:i] or cpu")
    parser.add_argument("--quick", action="store_true", help="every part tiny (a smoke test; measures nothing)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from: {', '.join(PARTS)}")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the whole check's wall-time limit (default {BUDGET_S:g}; {QUICK_BUDGET_S:g} with --quick)")
    parser.add_argument("--out", default=None, help="default: benchmarks/results/gpu_check-<device>.json "
                        "(--quick writes only here)")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    parser.add_argument("--part-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError as err:
        print(f"gpu_check: {pip_hint(err)}")
        return 1
    if args.part:
        return run_part(args.part, args.device, args.quick, args.part_out)

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else None
    elif args.device.startswith("cuda") and not torch.cuda.is_available():
        args.device = None
    if args.device is None:
        print(no_gpu_line(torch))
        return 0
    try:
        use_source_tree()
        from benchmarks import gpu_throughput as G
        from benchmarks._report import save
    except ImportError as err:
        print(f"gpu_check: {pip_hint(err)}")
        return 1
    device = torch.device(args.device)
    if args.budget_s is None:
        args.budget_s = QUICK_BUDGET_S if args.quick else BUDGET_S
    names = [p for p in args.parts.split(",") if p]
    unknown = set(names) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {list(PARTS)}")
    name = G.device_name(device)
    print(f"gpu_check on {name}: {', '.join(names)}; {args.budget_s:.0f} s in all"
          + (" (--quick: a smoke test, these figures measure nothing)" if args.quick else ""), flush=True)
    start = time.perf_counter()
    parts = {}
    for part in names:
        left = args.budget_s - (time.perf_counter() - start)
        box = min(QUICK_BOX_S if args.quick else PARTS[part], left)
        if box < 5:
            parts[part] = {"status": "skipped", "error": f"the {args.budget_s:.0f} s budget is spent"}
        else:
            print(f"\n== {part} (box {box:.0f} s)", flush=True)
            parts[part] = run_in_child(part, args.device, args.quick, box)
        print(f"== {part}: {parts[part]['status']}" + (f": {parts[part]['error']}" if "error" in parts[part] else "")
              + (f" ({parts[part]['seconds']:.0f} s)" if "seconds" in parts[part] else ""), flush=True)
    seconds = time.perf_counter() - start
    summary = {part: record["status"] for part, record in parts.items()}
    epoch = parts.get("pgd_at_epoch", {}).get("result")
    report = {"benchmark": "gpu_check", "device": name, "machine": G.machine(device), "quick": args.quick,
              "budget_s": args.budget_s, "seconds": seconds, "summary": summary,
              "pgd_at_epoch_s": {p: r["epoch_s"] for p, r in (epoch.get("paths") or epoch["rows_so_far"]).items()}
              if epoch else None,
              "parts": parts}
    print(f"\ngpu_check done in {seconds:.0f} s: " + ", ".join(f"{p} {s}" for p, s in summary.items()), flush=True)
    out = args.out or (None if args.quick else os.path.join(REPO, "benchmarks", "results",
                                                             f"gpu_check-{G.slug(name)}.json"))
    if out:
        save(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
