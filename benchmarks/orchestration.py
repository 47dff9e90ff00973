# SPDX-License-Identifier: Apache-2.0
"""Orchestration overhead of a search: the share of slot time not spent training, and trial start latency.

For one search of N trials on this machine, with S concurrent slots (``search.run._max_concurrent``):

    overhead = 1 - sum(trial compute) / (wall * S)

Trial compute is what the trainable itself measures, the ``time/epoch_s`` it reports (training
plus validation of each epoch); wall is the whole ``search.run.search_method`` call, MLflow
included. The rest of the slot time is split by the driver-side timestamps of each trial:

- ``startup``: from the searcher's suggestion (the trial's submission) to its first result, less
  the first epoch's compute: actor start or reset, ``with_parameters`` data, model build;
- ``report``: between consecutive results of a trial, less the epoch's compute: checkpoint,
  ``tune.report``, the driver's callbacks (MLflow writes) and scheduling;
- ``teardown``: from a trial's last result to Ray's ``on_trial_complete``;
- ``idle``: slot time with no trial in it (Tuner setup, a slot waiting for the next suggestion,
  the search's tail when fewer trials than slots remain, MLflow bookkeeping after ``fit``).

Two trainables run through otarena's real search path (PrunedAwareOptunaSearch, ConcurrencyLimiter,
ASHA, per-epoch checkpoints, ``MlflowTrials`` into a temporary sqlite store):

- ``real``: ``search.trainable.train_trial``, pgd_at on digits (epochs of ~1 s, ASHA pruning);
- ``sleep``: ``train_trial`` with each epoch's training and validation replaced by a sleep of a
  fixed length (the same run build, the same checkpoint and report), to emulate trials of about
  one minute (12 epochs x 5 s); ``grace_epochs = max_epochs``, so no trial is pruned.

Each runs with ``reuse_actors=True`` (what otarena uses) and ``False``, back to back in one process,
the order alternating between rounds. Instrumentation only observes: ``search.run``'s searcher and
callback classes are replaced by subclasses that record a timestamp and then call the original,
``TuneConfig`` is built with the arm's ``reuse_actors``, and the sleep arm swaps the trainable.

    python benchmarks/orchestration.py            # real: 8 trials x <= 3 epochs; sleep: 6 trials x 12 x 5 s
    python benchmarks/orchestration.py --quick    # CI smoke test: one search of 3 tiny sleeping trials
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import zlib
from unittest import mock

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._report import save  # noqa: E402

import optuna  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402

from otarena import methods  # noqa: E402
import otarena.search.run  # noqa: E402
from otarena import search  # noqa: E402
from otarena.methods.common import data as data_lib  # noqa: E402
from otarena.search import config as config_lib  # noqa: E402
from otarena.search.tracking import Tracker  # noqa: E402
from otarena.search.trainable import STATE_FILE, load_state  # noqa: E402

METHOD = "pgd_at"
EVENTS: dict = collections.defaultdict(lambda: {"results": []})
"""Driver-side timestamps per trial id, written by the instrumented searcher and callback."""


# Instrumentation ---------------------------------------------------------------------------------

class TimedSearch(search.run.PrunedAwareOptunaSearch):
    """Records when a trial is submitted: the searcher's suggestion (TPE's own time included)."""

    def suggest(self, trial_id):
        now = time.time()
        config = super().suggest(trial_id)
        if config is not None:
            EVENTS[trial_id].setdefault("suggest", now)
        return config


class TimedTrials(search.run.MlflowTrials):
    """otarena's MLflow callback, with the arrival time of each event taken before its work."""

    def on_trial_start(self, iteration, trials, trial, **info):
        EVENTS[trial.trial_id].setdefault("start", time.time())
        super().on_trial_start(iteration, trials, trial, **info)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        EVENTS[trial.trial_id]["results"].append((time.time(), result["time/epoch_s"], result.get("pid")))
        if "bench/enter_ts" in result:
            EVENTS[trial.trial_id]["enter"] = (result["bench/enter_ts"], result["bench/setup_s"])
        super().on_trial_result(iteration, trials, trial, result, **info)

    def on_trial_complete(self, iteration, trials, trial, **info):
        EVENTS[trial.trial_id]["complete"] = time.time()
        super().on_trial_complete(iteration, trials, trial, **info)


class TuneWith:
    """``ray.tune`` as ``search.run`` sees it, with ``TuneConfig``'s ``reuse_actors`` set by the arm."""

    def __init__(self, reuse_actors: bool):
        self.reuse_actors = reuse_actors

    def __getattr__(self, name):
        return getattr(tune, name)

    def TuneConfig(self, **kwargs):  # noqa: N802 (mirrors the attribute it stands in for)
        return tune.TuneConfig(**{**kwargs, "reuse_actors": self.reuse_actors})


def sleeping_trainable(epoch_s: float | dict, on_epoch=None):
    """``train_trial`` with each epoch's training and validation replaced by ``epoch_s`` of sleep.

    Everything else is as in ``search.trainable.train_trial``: the run is built (model, optimizer,
    method), restored from a checkpoint if any, and every epoch reports the same keys with a
    checkpoint of ``run.state_dict()``. The score depends on ``lr`` only, so TPE has a signal (on a
    space that does not search ``lr``, on a hash of the configuration).
    ``epoch_s`` may map each method to its own epoch length (benchmarks/campaign.py's campaign);
    ``on_epoch(method, trial_id, start, end)``, if given, is told each epoch's sleep, in wall-clock time.
    """
    def sleeping_trial(config, *, spec, train_data, val_data):
        sleep_s = epoch_s[spec.method] if isinstance(epoch_s, dict) else epoch_s
        if "lr" in config:
            quality = max(0.0, 0.6 - 0.1 * abs(math.log10(config["lr"] / 2e-3)))
        else:
            # A space without lr (another method's own knobs): a fixed quality per configuration, drawn
            # from its hash, so that ASHA still ranks the trials and promotes some (identical ones tie).
            quality = 0.6 * (zlib.crc32(repr(sorted(config.items())).encode()) % 1000) / 999
        entered, entered_perf = time.time(), time.perf_counter()
        torch.set_num_threads(max(1, int(spec.cpus)))
        hparams = {**spec.fixed, **config}
        run = methods.build_run(spec.method, hparams, dataset=spec.dataset, arch=spec.arch,
                                threat=methods.ThreatModel(spec.norm, spec.eps), train=train_data, val=val_data)
        checkpoint = tune.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as folder:
                run.load_state_dict(load_state(folder))
        node_id = ray.get_runtime_context().get_node_id()
        # When this trial's function began and how long its run build took: benchmark-only keys,
        # which MlflowTrials does not log (it logs train/, val/ and time/epoch_s).
        timing = {"bench/enter_ts": entered, "bench/setup_s": time.perf_counter() - entered_perf}
        while run.epoch < run.cfg.epochs:
            start, slept_from = time.perf_counter(), time.time()
            time.sleep(sleep_s)
            if on_epoch is not None:
                on_epoch(spec.method, tune.get_context().get_trial_id(), slept_from, time.time())
            run.epoch += 1
            score = quality * run.epoch / run.cfg.epochs
            metrics = {"train/loss": 1.0 - score, "val/clean_acc": min(1.0, score + 0.3), "val/pgd_acc": score,
                       "time/epoch_s": time.perf_counter() - start, "epoch": run.epoch}
            if run.best is None or score > run.best["val/pgd_acc"]:
                run.best = {"val/pgd_acc": score, "val/clean_acc": metrics["val/clean_acc"], "epoch": run.epoch}
                run.best_model = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
            metrics |= {"val/best_pgd_acc": run.best["val/pgd_acc"], "val/best_clean_acc": run.best["val/clean_acc"],
                        "val/best_epoch": run.best["epoch"], "node_id": node_id} | timing
            timing = {}
            with tempfile.TemporaryDirectory() as folder:
                torch.save(run.state_dict(), os.path.join(folder, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    return sleeping_trial


# One search --------------------------------------------------------------------------------------

def build_config(scenario: dict, name: str, tmp: str) -> config_lib.SearchConfig:
    return config_lib.parse({
        "name": name, "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
        "methods": [METHOD],
        "train": {"optimizer": "adam", "batch_size": 32, "attack_steps": scenario["attack_steps"],
                  "val_n_ex": scenario["val_n_ex"]},
        "space": {METHOD: {"lr": {"low": 3.0e-4, "high": 1.0e-2, "default": 2.0e-3, "log": True}}},
        "budget": {"trials": scenario["trials"], "max_epochs": scenario["epochs"], "grace_epochs": scenario["grace"],
                   "reduction_factor": 3},
        "resources": {"cpu": 1, "gpu": 0},
        "tracking_uri": f"sqlite:///{tmp}/mlflow.db", "storage_path": os.path.join(tmp, "ray"),
    })


def run_arm(scenario: dict, reuse: bool, round_: int, tmp: str, refs, verbose: bool) -> dict:
    name = f"orchestration-{scenario['name']}-reuse{int(reuse)}-r{round_}"
    cfg = build_config(scenario, name, tmp)
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    slots = search.run._max_concurrent(cfg)
    EVENTS.clear()
    patches = [mock.patch.object(search.run, "PrunedAwareOptunaSearch", TimedSearch),
               mock.patch.object(search.run, "MlflowTrials", TimedTrials),
               mock.patch.object(search.run, "tune", TuneWith(reuse))]
    if scenario["epoch_s"] is not None:
        patches.append(mock.patch.object(search.run, "train_trial", sleeping_trainable(scenario["epoch_s"])))
    if not verbose:
        patches.append(mock.patch.object(search.run, "log", lambda message: None))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        start = time.time()
        outcome = search.run.search_method(cfg, METHOD, tracker, *refs)
        wall = time.time() - start
    tracker.finish(outcome.parent_id)
    assert all(r.error is None for r in outcome.results), [str(r.error) for r in outcome.results if r.error]
    assert len(EVENTS) == len(outcome.results) == scenario["trials"], (len(EVENTS), len(outcome.results))
    trials, seen_pids = [], set()
    for trial_id, ev in sorted(EVENTS.items(), key=lambda item: item[1]["suggest"]):
        assert {"suggest", "start", "complete"} <= ev.keys() and ev["results"], (trial_id, ev.keys())
        times, computes, pids = zip(*ev["results"])
        trials.append({
            "trial_id": trial_id, "epochs": len(times), "compute_s": sum(computes), "first_epoch_s": computes[0],
            # A trial whose actor process served an earlier trial of this search got a reused actor.
            "fresh_actor": not (set(pids) & seen_pids), "pids": sorted(set(pids)),
            "actor_wait_s": ev["start"] - ev["suggest"], "latency_s": times[0] - ev["suggest"] - computes[0],
            "report_s": sum(t1 - t0 - c for t0, t1, c in zip(times, times[1:], computes[1:])),
            "teardown_s": ev["complete"] - times[-1], "occupied_s": ev["complete"] - ev["suggest"]})
        seen_pids |= set(pids)
        if "enter" in ev:
            # The sleeping trainable says when its function began: the startup latency split further.
            enter, setup = ev["enter"]
            trials[-1] |= {"enter_wait_s": enter - ev["start"], "setup_s": setup,
                           "first_report_s": times[0] - enter - setup - computes[0]}
    slot_s = wall * slots
    parts = {"compute": sum(t["compute_s"] for t in trials), "startup": sum(t["latency_s"] for t in trials),
             "report": sum(t["report_s"] for t in trials), "teardown": sum(t["teardown_s"] for t in trials)}
    parts["idle"] = slot_s - sum(t["occupied_s"] for t in trials)
    fit_wall = tracker.client.get_run(outcome.parent_id).data.metrics["search/wall_s"]
    row = {"scenario": scenario["name"], "reuse_actors": reuse, "round": round_, "trials": len(trials),
           "trial_epochs": sum(t["epochs"] for t in trials), "slots": slots, "wall_s": wall, "fit_wall_s": fit_wall,
           "overhead": 1 - parts["compute"] / slot_s, "overhead_fit": 1 - parts["compute"] / (fit_wall * slots),
           "share": {k: v / slot_s for k, v in parts.items()}, "seconds": parts,
           "mean_trial_compute_s": parts["compute"] / len(trials),
           "report_per_epoch_s": parts["report"] / max(1, sum(t["epochs"] - 1 for t in trials)),
           "actors": len(seen_pids), "fresh_trials": sum(t["fresh_actor"] for t in trials)}
    for kind, fresh in (("fresh", True), ("reused", False)):
        group = [t for t in trials if t["fresh_actor"] == fresh]
        keys = ("latency_s", "actor_wait_s", "enter_wait_s", "setup_s", "first_report_s")
        row[f"{kind}_actor_median_s"] = {k: statistics.median(t[k] for t in group)
                                         for k in keys if group and all(k in t for t in group)}
    row["latency_median_s"] = statistics.median(t["latency_s"] for t in trials)
    row["per_trial"] = trials
    return row


def trials_per_slot_for(target: float, rows: list) -> float:
    """Trials per slot at which a search's overhead falls to ``target``, from the measured costs.

    With actor reuse, a slot pays a new actor's startup ``F`` once per search, then per trial the
    reused-actor latency, reporting and teardown ``p`` around its compute ``c``:
    ``overhead(k) = (F + k p) / (F + k (c + p))``, which is ``target`` at the returned ``k``.
    """
    trials = [t for r in rows for t in r["per_trial"]]
    fresh = [t["latency_s"] for t in trials if t["fresh_actor"]]
    reused = [t["latency_s"] + t["report_s"] + t["teardown_s"] for t in trials if not t["fresh_actor"]]
    if not (fresh and reused):
        return math.nan
    f, p = statistics.median(fresh), statistics.mean(reused)
    c = statistics.mean(t["compute_s"] for t in trials)
    margin = target * c - (1 - target) * p
    return (1 - target) * f / margin if margin > 0 else math.inf


# Main --------------------------------------------------------------------------------------------

def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "load_avg_at_start": list(os.getloadavg())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="repeats of each (scenario, reuse) arm")
    parser.add_argument("--real-trials", type=int, default=8)
    parser.add_argument("--real-epochs", type=int, default=3)
    parser.add_argument("--sleep-trials", type=int, default=6)
    parser.add_argument("--sleep-epochs", type=int, default=12)
    parser.add_argument("--epoch-s", type=float, default=5.0, help="seconds of one sleeping epoch")
    parser.add_argument("--scenarios", default="real,sleep")
    parser.add_argument("--verbose", action="store_true", help="show otarena's per-trial log lines")
    parser.add_argument("--quick", action="store_true", help="one tiny search of the sleeping trainable (a smoke test)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "orchestration.json"))
    args = parser.parse_args(argv)
    scenarios = {
        "real": {"name": "real", "trials": args.real_trials, "epochs": args.real_epochs, "grace": 1,
                 "attack_steps": 2, "val_n_ex": 144, "epoch_s": None, "train_n": None},
        "sleep": {"name": "sleep", "trials": args.sleep_trials, "epochs": args.sleep_epochs,
                  "grace": args.sleep_epochs, "attack_steps": 2, "val_n_ex": 144, "epoch_s": args.epoch_s,
                  "train_n": None},
    }
    if args.quick:
        scenarios["sleep"] |= {"trials": 3, "epochs": 2, "grace": 2, "epoch_s": 0.2, "train_n": 128}
        args.scenarios = "sleep"
    chosen = [scenarios[s] for s in args.scenarios.split(",")]
    # Each arm is one search, and a fresh Tuner starts its actors (seconds each): --quick runs one,
    # the sleeping trainable with actor reuse, 3 trials on 2 slots (so a new and a reused actor),
    # and compares nothing. The real trainable's search path runs in search_efficiency.py --quick.
    arms = [(scenarios["sleep"], True)] if args.quick else \
        [(scenario, reuse, round_) for scenario in chosen for round_ in range(args.rounds)
         for reuse in ((True, False) if round_ % 2 == 0 else (False, True))]
    torch.set_num_threads(1)
    host = machine()
    val = data_lib.load("digits", "val")
    rows, refs = [], {}
    with tempfile.TemporaryDirectory(prefix="otarena-orchestration-") as tmp:
        search.run.init_ray()
        try:
            for scenario, reuse, *round_ in arms:
                if scenario["name"] not in refs:
                    train = data_lib.load("digits", "train").subset(scenario["train_n"])
                    refs[scenario["name"]] = (ray.put(train), ray.put(val))
                rows.append(run_arm(scenario, reuse, round_[0] if round_ else 0, tmp, refs[scenario["name"]],
                                    args.verbose))
                r = rows[-1]
                print(f"{r['scenario']} reuse_actors={reuse}: overhead {r['overhead']:.1%}, wall {r['wall_s']:.0f}s",
                      flush=True)
        finally:
            ray.shutdown()

    print(f"\n{'scenario':<8} {'reuse':<5} {'trials':>6} {'ep':>4} {'slots':>5} {'trial s':>7} {'wall s':>7} "
          f"{'overhead':>8} {'startup':>7} {'report':>6} {'tear':>5} {'idle':>5} {'actors':>6} {'lat new':>7} "
          f"{'lat reused':>10}")
    for r in rows:
        s = r["share"]
        fresh, reused = r["fresh_actor_median_s"], r["reused_actor_median_s"]
        print(f"{r['scenario']:<8} {str(r['reuse_actors']):<5} {r['trials']:>6} {r['trial_epochs']:>4} "
              f"{r['slots']:>5} {r['mean_trial_compute_s']:>7.1f} {r['wall_s']:>7.1f} {r['overhead']:>8.1%} "
              f"{s['startup']:>7.1%} {s['report']:>6.1%} {s['teardown']:>5.1%} {s['idle']:>5.1%} {r['actors']:>6} "
              f"{fresh.get('latency_s', math.nan):>7.2f} {reused.get('latency_s', math.nan):>10.2f}")
    print("shares of wall x slots; trial s: mean compute per trial; lat: median s from submission to first result,\n"
          "less the first epoch's compute, of trials on a new actor process and on one reused from an earlier trial")
    for r in rows:
        split = r["fresh_actor_median_s"]
        if "setup_s" in split:
            print(f"{r['scenario']} reuse_actors={r['reuse_actors']}: a new actor's startup (median): "
                  f"{split['actor_wait_s']:.2f}s until Ray starts the trial, {split['enter_wait_s']:.2f}s until "
                  f"the function runs, {split['setup_s']:.2f}s building the run, {split['first_report_s']:.2f}s "
                  f"until the driver has the first result")
    summary = {}
    for scenario in chosen:
        arm = {reuse: [r for r in rows if r["scenario"] == scenario["name"] and r["reuse_actors"] == reuse]
               for reuse in (True, False)}
        if not (arm[True] and arm[False]):
            continue
        med = {reuse: {key: statistics.median(r[key] for r in arm[reuse])
                       for key in ("overhead", "latency_median_s", "wall_s", "mean_trial_compute_s")}
               for reuse in (True, False)}
        summary[scenario["name"]] = {
            "overhead_reuse": med[True]["overhead"], "overhead_no_reuse": med[False]["overhead"],
            "latency_median_reuse_s": med[True]["latency_median_s"],
            "latency_median_no_reuse_s": med[False]["latency_median_s"],
            "wall_ratio_no_reuse_to_reuse": med[False]["wall_s"] / med[True]["wall_s"],
            "mean_trial_compute_s": med[True]["mean_trial_compute_s"]}
        v = summary[scenario["name"]]
        v["trials_per_slot_for_10pct"] = trials_per_slot_for(0.10, arm[True])
        print(f"{scenario['name']}: overhead {v['overhead_reuse']:.1%} with actor reuse, "
              f"{v['overhead_no_reuse']:.1%} without; median start latency {v['latency_median_reuse_s']:.2f}s vs "
              f"{v['latency_median_no_reuse_s']:.2f}s; wall without/with reuse "
              f"x{v['wall_ratio_no_reuse_to_reuse']:.2f}")
    if "sleep" in summary:
        v = summary["sleep"]
        v["target_met"] = v["overhead_reuse"] <= 0.10
        print(f"target (<= 10% overhead for trials of {v['mean_trial_compute_s']:.0f}s, reuse_actors=True): "
              f"{'met' if v['target_met'] else 'NOT met'} ({v['overhead_reuse']:.1%}); by the measured costs, "
              f"10% needs >= {v['trials_per_slot_for_10pct']:.1f} such trials per slot in one search")

    for r in rows:
        assert 0 < r["seconds"]["compute"] <= r["wall_s"] * r["slots"] and r["latency_median_s"] > -0.5
        assert abs(sum(r["share"].values()) - 1) < 1e-9
    report = {"benchmark": "orchestration", "method": METHOD, "dataset": "digits", "rounds": args.rounds,
              "scenarios": chosen, "machine": host, "runs": rows, "summary": summary}
    if not args.quick:
        save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
