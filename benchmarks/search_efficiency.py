# SPDX-License-Identifier: Apache-2.0
"""ASHA against FIFO (no pruning): trial-epochs spent and best validation robust accuracy reached.

Both arms are otarena's own search, ``search.run.search_method``: PrunedAwareOptunaSearch (TPE,
sampler seeded with ``seed``) behind a ConcurrencyLimiter, the real ``train_trial`` on digits with
per-epoch checkpoints, ``reuse_actors=True``, and every trial written to MLflow by ``MlflowTrials``
(a temporary sqlite store). The arms differ in one setting only, ``budget.scheduler`` (``asha`` or
``fifo``): Ray's ``FIFOScheduler`` prunes nothing, so every trial trains ``max_epochs``. Both arms get
the same trial budget, the same seed (TPE sampler and the trials' torch seed) and the same data.
The two arms of a seed run back to back, their order alternating between seeds, so that machine
noise hits them alike; the trial-epoch ratio does not depend on machine speed at all.

With two concurrent trials, the order in which trials finish decides what TPE has seen when it
suggests the next one, so two runs with the same seed need not suggest the same configurations
(Ray Tune reports this for any searcher with concurrency above one); averaging over seeds is what makes the accuracy gap meaningful. The parent
run's ``search.scheduler`` param and the experiment name (``search-efficiency-fifo-s0``) tell the
arms apart.

    python benchmarks/search_efficiency.py            # pgd_at, 12 trials x 9 epochs, 3 seeds
    python benchmarks/search_efficiency.py --quick    # CI smoke test: 1 seed, 3 trials x 2 epochs
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from unittest import mock

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._report import save  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import otarena.search.run  # noqa: E402
from otarena import search  # noqa: E402
from otarena.methods.common import data as data_lib  # noqa: E402
from otarena.search import config as config_lib  # noqa: E402
from otarena.search.tracking import Tracker  # noqa: E402

METHOD = "pgd_at"


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "load_avg_at_start": list(os.getloadavg())}


def build_config(args, seed: int, scheduler: str, tmp: str) -> config_lib.SearchConfig:
    """The search config of one arm: digits, pgd_at, lr and weight_decay searched."""
    return config_lib.parse({
        "name": f"search-efficiency-{scheduler}-s{seed}", "dataset": "digits", "arch": "small_cnn",
        "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": [METHOD],
        "train": {"optimizer": "adam", "batch_size": 32, "schedule": "cosine", "attack_steps": args.attack_steps,
                  "val_n_ex": args.val_n_ex},
        # demo.yaml's lr range; weight_decay keeps TRAIN_SPACE's (pgd_at's SEARCH_SPACE) range.
        "space": {METHOD: {"lr": {"low": 3.0e-4, "high": 1.0e-2, "default": 2.0e-3, "log": True}}},
        "budget": {"trials": args.trials, "max_epochs": args.max_epochs, "grace_epochs": args.grace,
                   "reduction_factor": args.reduction_factor, "max_concurrent": args.concurrent, "scheduler": scheduler},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": os.path.join(tmp, "ray"), "seed": seed,
    })


def run_arm(args, seed: int, scheduler: str, tmp: str, refs) -> dict:
    cfg = build_config(args, seed, scheduler, tmp)
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    quiet = mock.patch.object(search.run, "log", search.run.log if args.verbose else (lambda message: None))
    start = time.perf_counter()
    with quiet:
        outcome = search.run.search_method(cfg, METHOD, tracker, *refs)
    wall = time.perf_counter() - start
    tracker.finish(outcome.parent_id)
    epochs = [int((r.metrics or {}).get("training_iteration", 0)) for r in outcome.results]
    winner = max(outcome.results, key=lambda r: (r.metrics or {}).get("val/best_pgd_acc", -1.0))
    best = winner.metrics
    logged = tracker.client.get_run(outcome.parent_id).data.metrics
    trial_runs = tracker.trial_runs(outcome.parent_id)
    # The numbers below must be what otarena logged: one MLflow run per trial, the same trial-epochs.
    assert logged["search/trial_epochs"] == sum(epochs) and len(trial_runs) == len(outcome.results), logged
    assert all(r.error is None for r in outcome.results), [str(r.error) for r in outcome.results if r.error]
    assert tracker.client.get_run(outcome.parent_id).data.params["search.scheduler"] == scheduler
    return {"seed": seed, "scheduler": scheduler, "trials": len(outcome.results), "trial_epochs": sum(epochs),
            "completed": sum(e >= args.max_epochs for e in epochs), "best_val_pgd_acc": best["val/best_pgd_acc"],
            "best_val_clean_acc": best["val/best_clean_acc"], "best_epochs": int(best["training_iteration"]),
            "best_config": {k: winner.config[k] for k in ("lr", "weight_decay") if k in winner.config},
            "wall_s": wall, "fit_wall_s": logged["search/wall_s"], "mlflow_parent_run": outcome.parent_id}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace_period in epochs")
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=None, help="trials at once (default: as otarena, CPUs)")
    parser.add_argument("--attack-steps", type=int, default=2, help="PGD steps of training (epochs of ~1 s)")
    parser.add_argument("--val-n-ex", type=int, default=144, help="validation images (144: digits' whole split)")
    parser.add_argument("--train-n", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--verbose", action="store_true", help="show otarena's per-trial log lines")
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 trials x 2 epochs on a data subset")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "search_efficiency.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.trials, args.max_epochs, args.attack_steps = 1, 3, 2, 1
        args.val_n_ex, args.train_n = 32, 256
    torch.set_num_threads(1)
    host = machine()
    train = data_lib.load("digits", "train").subset(args.train_n)
    val = data_lib.load("digits", "val")
    rows = []
    with tempfile.TemporaryDirectory(prefix="otarena-search-efficiency-") as tmp:
        search.run.init_ray()
        try:
            refs = (ray.put(train), ray.put(val))
            for seed in range(args.seeds):
                order = ("asha", "fifo") if seed % 2 == 0 else ("fifo", "asha")
                for scheduler in order:
                    rows.append(run_arm(args, seed, scheduler, tmp, refs))
                    r = rows[-1]
                    print(f"seed {seed} {scheduler}: {r['trial_epochs']} trial-epochs, best val pgd "
                          f"{r['best_val_pgd_acc']:.1%}, {r['wall_s']:.0f}s", flush=True)
        finally:
            ray.shutdown()

    seeds = []
    for seed in range(args.seeds):
        arm = {r["scheduler"]: r for r in rows if r["seed"] == seed}
        seeds.append({"seed": seed, "epoch_ratio": arm["fifo"]["trial_epochs"] / arm["asha"]["trial_epochs"],
                      "gap_points": 100 * (arm["fifo"]["best_val_pgd_acc"] - arm["asha"]["best_val_pgd_acc"]),
                      "wall_ratio": arm["fifo"]["wall_s"] / arm["asha"]["wall_s"]})
    fifo_epochs = sum(r["trial_epochs"] for r in rows if r["scheduler"] == "fifo")
    asha_epochs = sum(r["trial_epochs"] for r in rows if r["scheduler"] == "asha")
    summary = {"epoch_ratio": fifo_epochs / asha_epochs,
               "mean_gap_points": statistics.mean(s["gap_points"] for s in seeds),
               "worst_gap_points": max(s["gap_points"] for s in seeds),
               "wall_ratio": statistics.median(s["wall_ratio"] for s in seeds)}
    summary["target_met"] = summary["epoch_ratio"] >= 3 and summary["mean_gap_points"] <= 1
    summary["target_met_every_seed"] = all(s["epoch_ratio"] >= 3 and s["gap_points"] <= 1 for s in seeds)

    print(f"\n{METHOD} on digits: {args.trials} trials x <= {args.max_epochs} epochs, ASHA grace {args.grace}, "
          f"rf {args.reduction_factor}; TPE seed = seed")
    print(f"{'seed':>4} {'sched':<5} {'trial-ep':>8} {'done':>5} {'best val pgd':>12} {'best ep':>7} {'wall s':>7}")
    for r in rows:
        print(f"{r['seed']:>4} {r['scheduler']:<5} {r['trial_epochs']:>8} {r['completed']:>5} "
              f"{r['best_val_pgd_acc']:>12.1%} {r['best_epochs']:>7} {r['wall_s']:>7.1f}")
    print(f"{'seed':>4} {'FIFO/ASHA trial-epochs':>23} {'gap FIFO-ASHA (pts)':>20} {'FIFO/ASHA wall':>15}")
    for s in seeds:
        print(f"{s['seed']:>4} {s['epoch_ratio']:>23.2f} {s['gap_points']:>+20.1f} {s['wall_ratio']:>15.2f}")
    print(f" all {summary['epoch_ratio']:>23.2f} {summary['mean_gap_points']:>+20.1f} {summary['wall_ratio']:>15.2f}")
    print(f"target (>= 3x fewer trial-epochs, best val within 1 point): "
          f"{'met' if summary['target_met'] else 'NOT met'} on the mean over seeds, "
          f"{'met' if summary['target_met_every_seed'] else 'not met'} on every seed")

    for r in rows:
        assert r["trial_epochs"] >= r["trials"] and 0 <= r["best_val_pgd_acc"] <= 1
        if r["scheduler"] == "fifo":
            assert r["trial_epochs"] == r["trials"] * args.max_epochs
    report = {"benchmark": "search_efficiency", "method": METHOD, "dataset": "digits", "arch": "small_cnn",
              "budget": {"trials": args.trials, "max_epochs": args.max_epochs, "grace_epochs": args.grace,
                         "reduction_factor": args.reduction_factor, "max_concurrent": args.concurrent},
              "train": {"attack_steps": args.attack_steps, "val_n_ex": args.val_n_ex, "train_n": len(train)},
              "searched": ["lr", "weight_decay"], "machine": host, "runs": rows, "per_seed": seeds,
              "summary": summary}
    if not args.quick:
        save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
