# SPDX-License-Identifier: Apache-2.0
"""ASHA against FIFO on real MNIST, per learning-rate schedule and weight averaging: trial-epochs,
regret, and the rank fidelity of every rung.

Every arm is otarena's own search, ``search.run.search_method``: PrunedAwareOptunaSearch (TPE,
sampler seeded with ``seed``) behind a ConcurrencyLimiter, the real ``train_trial`` with per-epoch
checkpoints, ``reuse_actors=True``, and every trial written to MLflow by ``MlflowTrials`` (a
temporary sqlite store). Per seed:

- **Ground truth**: one FIFO search per schedule (``cosine`` over ``max_epochs``, today's default, and
  ``rung_cosine``, whose cycles end at the rungs), every trial trained to ``max_epochs``, with weight
  averaging on. Each trial then logs both its averaged weights' validation PGD accuracy
  (``val/pgd_acc``) and its training weights' (``val/raw_pgd_acc``): the average never feeds back into
  training, so one FIFO search is the ground truth of an option with EMA on and of the same option with
  EMA off (only TPE's view differs: it is fed the averaged metric).
- **Rank fidelity** of an option at each rung (``search.fidelity.rank_fidelity``): Spearman's rho,
  over the FIFO trials, between the metric at the rung epoch and the trial's final selection metric
  (its best-epoch validation PGD accuracy, of the same weights: averaged or raw).
- **ASHA with each option** (its schedule and ``ema_decay``), the same trial budget and seed as FIFO;
  regret = FIFO's best final selection metric (the same option's) minus ASHA's, in points.

Arms of a seed run back to back, their order rotated between seeds, so that machine noise hits
them alike; trial-epoch ratios do not depend on machine speed at all. With two concurrent trials the
order in which trials finish decides what TPE has seen when it suggests the next one, so two runs
with the same seed need not suggest the same configurations; averaging over seeds is what makes the
regret meaningful.

    python benchmarks/search_efficiency.py            # the committed run (reductions in its JSON)
    python benchmarks/search_efficiency.py --quick    # CI smoke test: 1 seed, 3 trials x 2 epochs
    python benchmarks/search_efficiency.py --reanalyze benchmarks/results/search_efficiency-mnist.json
    python benchmarks/search_efficiency.py --add-arms benchmarks/results/search_efficiency-mnist.json --options cosine+ema
    python benchmarks/search_efficiency.py --hypervolume          # multi- against single-objective (digits)
    python benchmarks/search_efficiency.py --hypervolume --quick  # its smoke test

``--hypervolume`` compares, per seed, a two-objective search (``objectives: [val/pgd_acc,
val/clean_acc]``: multi-objective TPE and MO-ASHA, ``search/moasha.py``) with today's single-objective
one (TPE and ASHA on ``val/pgd_acc``), TRADES on digits with its trade-off knob ``trades_beta`` and
``lr`` searched, the same trial budget, seed and data. The measure is the hypervolume, exact in 2-D
(``benchmarks/_hypervolume.py``), of the (validation clean, validation PGD) accuracies with reference point (0, 0):

- **at the same trial-epochs**: every epoch a trial reports is a model with its validation point;
  each arm's epochs in the order they were reported, cut at the smaller arm's total trial-epochs;
- **recorded**: the points a search's Pareto set is taken from (``search/pareto.json``): each completed
  trial's best-epoch clean and PGD accuracy, over the whole search.
"""
from __future__ import annotations

import argparse
import json
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

from benchmarks._hypervolume import hypervolume  # noqa: E402
from benchmarks._report import save  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402

import otarena.search.run  # noqa: E402
from otarena import search  # noqa: E402
from otarena.methods.common import data as data_lib  # noqa: E402
from otarena.search import config as config_lib  # noqa: E402
from otarena.search.fidelity import rank_fidelity, rungs  # noqa: E402
from otarena.search.objectives import pareto_front  # noqa: E402
from otarena.search.tracking import Tracker  # noqa: E402

METHOD = "pgd_at"
SCHEDULES = ("cosine", "rung_cosine")
OPTIONS = {"cosine": ("cosine", False), "cosine+ema": ("cosine", True),
           "rung_cosine": ("rung_cosine", False), "rung_cosine+ema": ("rung_cosine", True)}
"""An option: its learning-rate schedule and whether the weights are averaged."""
TARGET = {"epoch_ratio": 3.0, "mean_regret_points": 0.5, "first_rung_fidelity": 0.8}


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "load_avg_at_start": list(os.getloadavg())}


def build_config(args, seed: int, scheduler: str, schedule: str, ema_decay: float, tmp: str, *,
                 method: str = METHOD, dataset: str = "mnist",
                 objectives: tuple[str, ...] = ("val/pgd_acc",)) -> config_lib.SearchConfig:
    """The search config of one arm: MNIST, pgd_at, lr and weight_decay searched (or ``method``'s own space
    on ``dataset``, for ``objectives``)."""
    name = f"search-efficiency-{scheduler}-{schedule}-ema{ema_decay:g}-{len(objectives)}obj-s{seed}"
    return config_lib.parse({
        "name": name, "dataset": dataset, "arch": "small_cnn", "objectives": list(objectives),
        "threat_model": {"norm": "Linf", "eps": args.eps}, "methods": [method],
        "train": {"optimizer": "adam", "batch_size": args.batch_size, "schedule": schedule, "ema_decay": ema_decay,
                  "attack_steps": args.attack_steps, "val_n_ex": args.val_n_ex, "val_pgd_steps": args.val_pgd_steps},
        # demo.yaml's lr range; weight_decay keeps TRAIN_SPACE's (pgd_at's SEARCH_SPACE) range.
        "space": {method: {"lr": {"low": 3.0e-4, "high": 1.0e-2, "default": 2.0e-3, "log": True}}},
        "budget": {"trials": args.trials, "max_epochs": args.max_epochs, "grace_epochs": args.grace,
                   "reduction_factor": args.reduction_factor, "max_concurrent": args.concurrent, "scheduler": scheduler},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": os.path.join(tmp, "ray"), "seed": seed,
    })


def curves(result, key: str) -> dict[int, float]:
    """One trial's validation metric ``key`` at each epoch it trained."""
    frame = result.metrics_dataframe
    return {int(epoch): float(value) for epoch, value in zip(frame["training_iteration"], frame[key])}


def search_once(args, cfg: config_lib.SearchConfig, method: str, refs):
    """otarena's search of ``method`` (quiet unless ``--verbose``), its parent run finished, no trial failed:
    its tracker, outcome and wall seconds."""
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    quiet = mock.patch.object(search.run, "log", search.run.log if args.verbose else (lambda message: None))
    start = time.perf_counter()
    with quiet:
        outcome = search.run.search_method(cfg, method, tracker, *refs)
    wall = time.perf_counter() - start
    tracker.finish(outcome.parent_id)
    assert all(r.error is None for r in outcome.results), [str(r.error) for r in outcome.results if r.error]
    return tracker, outcome, wall


def run_arm(args, seed: int, scheduler: str, schedule: str, ema: bool, tmp: str, refs) -> dict:
    """One search; its trials' curves of both the averaged (``ema``) and training (``raw``) weights."""
    ema_decay = args.ema_decay if ema else 0.0
    cfg = build_config(args, seed, scheduler, schedule, ema_decay, tmp)
    tracker, outcome, wall = search_once(args, cfg, METHOD, refs)
    epochs = [int((r.metrics or {}).get("training_iteration", 0)) for r in outcome.results]
    logged = tracker.client.get_run(outcome.parent_id).data.metrics
    # The numbers below must be what otarena logged: one MLflow run per trial, the same trial-epochs.
    assert logged["search/trial_epochs"] == sum(epochs), logged
    assert len(tracker.trial_runs(outcome.parent_id)) == len(outcome.results)
    assert tracker.client.get_run(outcome.parent_id).data.params["search.scheduler"] == scheduler
    trials = {}
    for i, result in enumerate(outcome.results):
        trial = {"epochs": epochs[i], "config": {k: result.config[k] for k in ("lr", "weight_decay")}}
        for weights, key in (("ema", "val/pgd_acc"), ("raw", "val/raw_pgd_acc")) if ema else (("raw", "val/pgd_acc"),):
            curve = curves(result, key)
            # The final selection metric: the best epoch's validation PGD accuracy (fit's best).
            trial[weights] = {"curve": curve, "best": max(curve.values())}
        trials[str(i)] = trial
    return {"seed": seed, "scheduler": scheduler, "schedule": schedule, "ema_decay": ema_decay,
            "trials": len(outcome.results), "trial_epochs": sum(epochs),
            "completed": sum(e >= args.max_epochs for e in epochs), "wall_s": wall,
            "fit_wall_s": logged["search/wall_s"], "mlflow_parent_run": outcome.parent_id, "per_trial": trials}


def weights_of(option: str) -> str:
    return "ema" if OPTIONS[option][1] else "raw"


def best(arm: dict, weights: str) -> float:
    return max(t[weights]["best"] for t in arm["per_trial"].values())


def fidelity(fifo: dict, weights: str, rung_epochs: list[int]) -> list[dict]:
    """Per rung: rho of the FIFO trials' metric there against their final selection metric."""
    trials = fifo["per_trial"]
    got = rank_fidelity({t: trials[t][weights]["curve"] for t in trials},
                        {t: trials[t][weights]["best"] for t in trials if trials[t]["epochs"] >= fifo_epochs(fifo)},
                        rung_epochs)
    return [{"epoch": f.epoch, "n_trials": f.n_trials, "rho": f.rho, "reason": f.reason} for f in got]


def fifo_epochs(fifo: dict) -> int:
    return max(t["epochs"] for t in fifo["per_trial"].values())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--max-epochs", type=int, default=9)
    parser.add_argument("--grace", type=int, default=1, help="ASHA grace_period in epochs (the first rung)")
    parser.add_argument("--reduction-factor", type=int, default=3)
    parser.add_argument("--concurrent", type=int, default=None, help="trials at once (default: as otarena, CPUs)")
    parser.add_argument("--options", default=",".join(OPTIONS), help=f"ASHA arms, of {list(OPTIONS)}")
    parser.add_argument("--ema-decay", type=float, default=0.99)
    parser.add_argument("--eps", type=float, default=0.1, help="L-inf radius (MNIST's usual 0.3 learns too slowly here)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--attack-steps", type=int, default=2, help="PGD steps of training")
    parser.add_argument("--val-n-ex", type=int, default=200, help="validation images (the first N of the split)")
    parser.add_argument("--val-pgd-steps", type=int, default=5)
    parser.add_argument("--train-n", type=int, default=500, help="the first N MNIST training images")
    parser.add_argument("--verbose", action="store_true", help="show otarena's per-trial log lines")
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 trials x 2 epochs on 128 images, "
                        "one option (rung_cosine+ema) against its FIFO")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "search_efficiency-mnist.json"))
    parser.add_argument("--reanalyze", metavar="JSON", help="recompute the analysis of a saved report, run nothing")
    parser.add_argument("--add-arms", metavar="JSON", help="run the ASHA arms of --options that a saved report "
                        "lacks, with its settings, and add them to it")
    parser.add_argument("--hypervolume", action="store_true", help="multi- against single-objective search: "
                        "hypervolume on the (val clean, val PGD) plane (TRADES on digits; settings: HV_DEFAULTS)")
    parser.add_argument("--dataset", default="mnist")
    args = parser.parse_args(argv)
    if args.hypervolume:
        parser.set_defaults(**HV_DEFAULTS)    # what the command line says still wins
        args = parser.parse_args(argv)
        if args.quick:
            vars(args).update(HV_QUICK)
        return hypervolume_main(args)
    if args.reanalyze:
        return analyze(load(args.reanalyze), args.reanalyze)
    if args.add_arms:
        return add_arms(args.add_arms, args.options.split(","))
    if args.quick:
        args.seeds, args.trials, args.max_epochs, args.reduction_factor, args.attack_steps = 1, 3, 2, 2, 1
        args.val_n_ex, args.val_pgd_steps, args.train_n, args.options = 32, 2, 128, "rung_cosine+ema"
    options = args.options.split(",")
    unknown = set(options) - set(OPTIONS)
    if unknown:
        parser.error(f"unknown options {sorted(unknown)}; choose from {list(OPTIONS)}")
    torch.set_num_threads(1)
    host = machine()
    train = data_lib.load("mnist", "train").subset(args.train_n)
    val = data_lib.load("mnist", "val")
    rung_epochs = rungs(args.grace, args.reduction_factor, args.max_epochs)
    # Both schedules' ground truth, for the fidelity of every option; --quick only its option's.
    schedules = sorted({OPTIONS[o][0] for o in options}) if args.quick else SCHEDULES
    arms = [("fifo", schedule, True) for schedule in schedules] + \
           [("asha", *OPTIONS[option]) for option in options]
    rows = run_arms(args, arms, train, val)
    analysis = summarize(rows, options, args.seeds, rung_epochs)
    for r in rows:
        assert r["trial_epochs"] >= r["trials"]
        if r["scheduler"] == "fifo":
            assert r["trial_epochs"] == r["trials"] * args.max_epochs
    report = {"benchmark": "search_efficiency", "method": METHOD, "dataset": "mnist", "arch": "small_cnn",
              "threat_model": {"norm": "Linf", "eps": args.eps},
              "budget": {"trials": args.trials, "max_epochs": args.max_epochs, "grace_epochs": args.grace,
                         "reduction_factor": args.reduction_factor, "rungs": rung_epochs,
                         "max_concurrent": args.concurrent},
              "train": {"optimizer": "adam", "batch_size": args.batch_size, "attack_steps": args.attack_steps,
                        "val_n_ex": args.val_n_ex, "val_pgd_steps": args.val_pgd_steps, "ema_decay": args.ema_decay},
              "reductions": {"train_n": len(train), "train_subset": f"the first {len(train)} of MNIST's 55,000 "
                             "training images (otarena's train split)", "val_n_ex": args.val_n_ex,
                             "eps": args.eps, "attack_steps": args.attack_steps, "val_pgd_steps": args.val_pgd_steps,
                             "max_epochs": args.max_epochs, "trials": args.trials},
              "searched": ["lr", "weight_decay"], "targets": TARGET, "machine": host, **analysis, "runs": rows}
    show(report)
    if not args.quick:
        save(report, args.out)
    return 0


def run_arms(args, arms: list[tuple], train, val, run_one=None) -> list[dict]:
    """Every arm for every seed, in one Ray session; the arms' order rotated between seeds. ``run_one(seed, arm,
    tmp, refs)`` runs an arm of another kind (and says what it found)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="otarena-search-efficiency-") as tmp:
        search.run.init_ray()
        try:
            refs = (ray.put(train), ray.put(val))
            for seed in range(args.seeds):
                shift = seed % len(arms)
                for arm in arms[shift:] + arms[:shift]:
                    if run_one:
                        rows.append(run_one(seed, arm, tmp, refs))
                        continue
                    scheduler, schedule, ema = arm
                    rows.append(run_arm(args, seed, scheduler, schedule, ema, tmp, refs))
                    r = rows[-1]
                    print(f"seed {seed} {scheduler} {schedule} ema {r['ema_decay']:g}: {r['trial_epochs']} "
                          f"trial-epochs, best val pgd {best(r, 'ema' if ema else 'raw'):.1%}, {r['wall_s']:.0f}s",
                          flush=True)
        finally:
            ray.shutdown()
    return rows


def add_arms(path: str, options: list[str]) -> int:
    """Run the ASHA arms of ``options`` that a saved report lacks, with its settings, seeds and data, and
    add them to it: its FIFO arms are their ground truth (a later run: the machine's load differs)."""
    report = load(path)
    budget, train_cfg, cut = report["budget"], report["train"], report["reductions"]
    args = argparse.Namespace(
        seeds=1 + max(r["seed"] for r in report["runs"]), trials=budget["trials"], max_epochs=budget["max_epochs"],
        grace=budget["grace_epochs"], reduction_factor=budget["reduction_factor"],
        concurrent=budget["max_concurrent"], ema_decay=train_cfg["ema_decay"], eps=report["threat_model"]["eps"],
        batch_size=train_cfg["batch_size"], attack_steps=train_cfg["attack_steps"], val_n_ex=train_cfg["val_n_ex"],
        val_pgd_steps=train_cfg["val_pgd_steps"], verbose=False)
    have = {(r["schedule"], r["ema_decay"] > 0) for r in report["runs"] if r["scheduler"] == "asha"}
    arms = [("asha", *OPTIONS[o]) for o in options if OPTIONS[o] not in have]
    torch.set_num_threads(1)
    train = data_lib.load("mnist", "train").subset(cut["train_n"])
    rows = run_arms(args, arms, train, data_lib.load("mnist", "val"))
    load_avg = list(os.getloadavg())
    report["runs"] += [{**r, "added_later": {"load_avg_at_end": load_avg}} for r in rows]
    return analyze(report, path)


def load(path: str) -> dict:
    """A saved report, its curves' epochs back to integers (JSON made them strings)."""
    with open(path) as f:
        report = json.load(f)
    for row in report["runs"]:
        for trial in row["per_trial"].values():
            for weights in ("ema", "raw"):
                if weights in trial:
                    trial[weights]["curve"] = {int(e): v for e, v in trial[weights]["curve"].items()}
    return report


def summarize(rows: list[dict], options: list[str], seeds: int, rung_epochs: list[int]) -> dict:
    """Rank fidelity of every option (from the FIFO arms), and each ASHA arm against its FIFO."""
    def arm(seed, scheduler, schedule, ema=None):
        return next(r for r in rows if r["seed"] == seed and r["scheduler"] == scheduler and r["schedule"] == schedule
                    and (ema is None or (r["ema_decay"] > 0) == ema))

    fidelities = {}
    for option, (schedule, ema) in OPTIONS.items():
        if not any(r["scheduler"] == "fifo" and r["schedule"] == schedule for r in rows):
            continue
        per_seed = [fidelity(arm(seed, "fifo", schedule), weights_of(option), rung_epochs) for seed in range(seeds)]
        fidelities[option] = {"per_seed": per_seed,
                              "mean": {str(e): _mean([f[i]["rho"] for f in per_seed]) for i, e in enumerate(rung_epochs)}}
    per_option = {}
    for option in options:
        schedule, ema = OPTIONS[option]
        weights = weights_of(option)
        per_seed = []
        for seed in range(seeds):
            fifo, asha = arm(seed, "fifo", schedule), arm(seed, "asha", schedule, ema)
            per_seed.append({"seed": seed, "epoch_ratio": fifo["trial_epochs"] / asha["trial_epochs"],
                             "fifo_best": best(fifo, weights), "asha_best": best(asha, weights),
                             "regret_points": 100 * (best(fifo, weights) - best(asha, weights))})
        fifo_epochs_total = sum(arm(s, "fifo", schedule)["trial_epochs"] for s in range(seeds))
        asha_epochs_total = sum(arm(s, "asha", schedule, ema)["trial_epochs"] for s in range(seeds))
        first = fidelities[option]["mean"][str(rung_epochs[0])] if rung_epochs else None
        summary = {"epoch_ratio": fifo_epochs_total / asha_epochs_total,
                   "mean_regret_points": statistics.mean(s["regret_points"] for s in per_seed),
                   "worst_regret_points": max(s["regret_points"] for s in per_seed),
                   "first_rung_fidelity": first}
        summary["targets_met"] = {
            "epoch_ratio": summary["epoch_ratio"] >= TARGET["epoch_ratio"],
            "mean_regret_points": summary["mean_regret_points"] <= TARGET["mean_regret_points"],
            "first_rung_fidelity": first is not None and first >= TARGET["first_rung_fidelity"]}
        summary["all_targets_met"] = all(summary["targets_met"].values())
        per_option[option] = {"schedule": schedule, "ema": ema, "per_seed": per_seed, "summary": summary}
    return {"fidelity": fidelities, "options": per_option}


def show(report: dict) -> None:
    rung_epochs, budget, rows = report["budget"]["rungs"], report["budget"], report["runs"]
    print(f"\n{METHOD} on MNIST ({report['reductions']['train_subset']}, eps {report['threat_model']['eps']:g}): "
          f"{budget['trials']} trials x <= {budget['max_epochs']} epochs, rungs {rung_epochs}; TPE seed = seed")
    print(f"{'seed':>4} {'sched':<5} {'schedule':<12} {'ema':>5} {'trial-ep':>8} {'done':>5} {'wall s':>7}")
    for r in rows:
        print(f"{r['seed']:>4} {r['scheduler']:<5} {r['schedule']:<12} {r['ema_decay']:>5g} {r['trial_epochs']:>8} "
              f"{r['completed']:>5} {r['wall_s']:>7.1f}")
    print("rank fidelity (Spearman rho over the FIFO trials, mean over seeds): "
          + "; ".join(f"{option} " + ", ".join(f"epoch {e} {_fmt(f['mean'][str(e)])}" for e in rung_epochs)
                      for option, f in report["fidelity"].items()))
    print(f"{'ASHA option':<16} {'FIFO/ASHA trial-ep':>18} {'regret (pts)':>12} {'worst':>6} {'rho@first':>9}  targets")
    for option, result in report["options"].items():
        s = result["summary"]
        print(f"{option:<16} {s['epoch_ratio']:>18.2f} {s['mean_regret_points']:>+12.1f} {s['worst_regret_points']:>+6.1f} "
              f"{_fmt(s['first_rung_fidelity']):>9}  {'all met' if s['all_targets_met'] else 'not all met'}")


def analyze(report: dict, path: str) -> int:
    """Recompute the analysis of a report from its runs, show it and save it."""
    options = [o for o, (schedule, ema) in OPTIONS.items()
               if any(r["scheduler"] == "asha" and r["schedule"] == schedule and (r["ema_decay"] > 0) == ema
                      for r in report["runs"])]
    seeds = 1 + max(r["seed"] for r in report["runs"])
    report.update(summarize(report["runs"], options, seeds, report["budget"]["rungs"]))
    show(report)
    save(report, path)
    return 0


# ------------------------------------------------------------------ multi- against single-objective search

HV_METHOD = "trades"
"""TRADES: its beta is the knob that moves a model along the clean-robust trade-off."""
HV_OBJECTIVES = {"multi": ("val/pgd_acc", "val/clean_acc"), "single": ("val/pgd_acc",)}
HV_DEFAULTS = {"dataset": "digits", "seeds": 3, "trials": 10, "max_epochs": 6, "grace": 1, "reduction_factor": 3,
               "eps": 0.2, "batch_size": 64, "attack_steps": 3, "val_n_ex": 144, "val_pgd_steps": 5, "train_n": None,
               "out": os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "search_efficiency-hypervolume-digits.json")}
"""The hypervolume comparison's settings: the whole of digits (1,293 training and 144 validation images), eps 0.2
as the demo, PGD-3 training and PGD-5 validation, 10 trials of up to 6 epochs, rungs at epochs 1 and 3."""
HV_QUICK = {"seeds": 1, "trials": 3, "max_epochs": 2, "reduction_factor": 2, "attack_steps": 1, "val_n_ex": 32,
            "val_pgd_steps": 2, "train_n": 128}


def run_objectives_arm(args, seed: int, arm: str, tmp: str, refs) -> dict:
    """One TRADES search for the objectives of ``arm`` (``multi`` or ``single``): every trial's (clean, PGD) validation
    point at each epoch, in the order the epochs were reported, and each trial's best-epoch point."""
    objectives = HV_OBJECTIVES[arm]
    cfg = build_config(args, seed, "asha", "cosine", args.ema_decay, tmp, method=HV_METHOD, dataset=args.dataset,
                       objectives=objectives)
    tracker, outcome, wall = search_once(args, cfg, HV_METHOD, refs)
    params = tracker.client.get_run(outcome.parent_id).data.params
    trials, reported = {}, []
    for i, result in enumerate(outcome.results):
        frame = result.metrics_dataframe
        epochs = [int(e) for e in frame["training_iteration"]]
        curve = {e: [float(c), float(p)] for e, c, p in zip(epochs, frame["val/clean_acc"], frame["val/pgd_acc"])}
        reported += [(float(t), i, e) for t, e in zip(frame["timestamp"], epochs)]
        metrics = result.metrics or {}
        trials[str(i)] = {"config": {k: result.config[k] for k in cfg.spaces()[HV_METHOD] if k in result.config},
                          "epochs": max(epochs), "curve": curve, "completed": max(epochs) >= args.max_epochs,
                          "best": [metrics["val/best_clean_acc"], metrics["val/best_pgd_acc"]]}
    order = [[str(i), e] for _, i, e in sorted(reported)]
    row = {"seed": seed, "arm": arm, "objectives": list(objectives), "algorithm": params.get("search.algorithm"),
           "scheduler": params.get("search.scheduler"), "trials": len(outcome.results), "trial_epochs": len(order),
           "completed": sum(t["completed"] for t in trials.values()), "wall_s": wall,
           "mlflow_parent_run": outcome.parent_id, "per_trial": trials, "order": order}
    print(f"seed {seed} {arm}-objective ({row['algorithm']}, {row['scheduler']}): {row['trial_epochs']} trial-epochs, "
          f"hypervolume {hypervolume(recorded_points(row)):.4f} (recorded), {wall:.0f}s", flush=True)
    return row


def recorded_points(row: dict) -> list:
    """What a search's Pareto set is taken from: each completed trial's best-epoch (clean, PGD) point."""
    return [t["best"] for t in row["per_trial"].values() if t["completed"]]


def points_within(row: dict, trial_epochs: int) -> list:
    """Every (clean, PGD) point of the first ``trial_epochs`` epochs the search's trials reported."""
    return [row["per_trial"][trial]["curve"][epoch] for trial, epoch in row["order"][:trial_epochs]]


def summarize_hypervolume(rows: list[dict]) -> dict:
    per_seed = []
    for seed in sorted({r["seed"] for r in rows}):
        arms = {r["arm"]: r for r in rows if r["seed"] == seed}
        budget = min(r["trial_epochs"] for r in arms.values())
        entry = {"seed": seed, "equal_trial_epochs": budget}
        for name, row in arms.items():
            points = recorded_points(row)
            entry[name] = {"hv_at_equal_trial_epochs": hypervolume(points_within(row, budget)),
                           "hv_recorded": hypervolume(points), "trial_epochs": row["trial_epochs"],
                           "completed": row["completed"], "pareto_size": len(pareto_front(points))}
        per_seed.append(entry)

    def mean(arm, key):
        return statistics.mean(s[arm][key] for s in per_seed)

    summary = {key: {arm: mean(arm, key) for arm in HV_OBJECTIVES} for key in ("hv_at_equal_trial_epochs", "hv_recorded")}
    for key in summary:
        summary[key]["multi_minus_single"] = summary[key]["multi"] - summary[key]["single"]
        summary[key]["seeds_multi_ahead"] = sum(s["multi"][key] > s["single"][key] for s in per_seed)
    return {"per_seed": per_seed, "summary": summary}


def hypervolume_main(args) -> int:
    torch.set_num_threads(1)
    train = data_lib.load(args.dataset, "train").subset(args.train_n)
    val = data_lib.load(args.dataset, "val")
    rows = run_arms(args, list(HV_OBJECTIVES), train, val,
                    run_one=lambda seed, arm, tmp, refs: run_objectives_arm(args, seed, arm, tmp, refs))
    analysis = summarize_hypervolume(rows)
    report = {"benchmark": "search_efficiency/hypervolume", "method": HV_METHOD, "dataset": args.dataset,
              "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": args.eps},
              "objectives": {arm: list(o) for arm, o in HV_OBJECTIVES.items()}, "reference_point": [0.0, 0.0],
              "plane": ["val/clean_acc", "val/pgd_acc"],
              "budget": {"trials": args.trials, "max_epochs": args.max_epochs, "grace_epochs": args.grace,
                         "reduction_factor": args.reduction_factor, "max_concurrent": args.concurrent},
              "train": {"optimizer": "adam", "batch_size": args.batch_size, "attack_steps": args.attack_steps,
                        "val_n_ex": args.val_n_ex, "val_pgd_steps": args.val_pgd_steps, "ema_decay": args.ema_decay,
                        "train_n": len(train)},
              "searched": sorted(search.spaces.searched(build_config(args, 0, "asha", "cosine", args.ema_decay, "/tmp",
                                                                     method=HV_METHOD, dataset=args.dataset)
                                                        .spaces()[HV_METHOD])),
              "machine": machine(), **analysis, "runs": rows}
    s = analysis["summary"]
    print(f"\nhypervolume of (val clean, val PGD) above (0, 0), mean over {args.seeds} seeds "
          f"({HV_METHOD} on {args.dataset}, {args.trials} trials x <= {args.max_epochs} epochs):")
    for key, label in (("hv_at_equal_trial_epochs", "at equal trial-epochs"), ("hv_recorded", "recorded sets")):
        print(f"  {label:<22} multi {s[key]['multi']:.4f}  single {s[key]['single']:.4f}  "
              f"difference {s[key]['multi_minus_single']:+.4f}  (multi ahead on {s[key]['seeds_multi_ahead']} of "
              f"{args.seeds} seeds)")
    for r in rows:
        assert r["trial_epochs"] >= r["trials"] and r["completed"] >= 1
    if not args.quick:
        save(report, args.out)
    return 0


def _mean(values):
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


if __name__ == "__main__":
    sys.exit(main())
