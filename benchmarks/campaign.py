# SPDX-License-Identifier: Apache-2.0
"""A campaign's method searches one after another against all at once, on a simulated cluster.

The campaign: 8 methods x 16 trials, each search otarena's own (``search.run.run_search``: TPE through
``PrunedAwareOptunaSearch``, ASHA, per-epoch checkpoints, one MLflow parent run per method and one
child per trial, the final evaluation of each method's best trial and paper-default trial, kept small:
20 test points, PGD-2, no AutoAttack). Only the trainable differs: ``benchmarks/orchestration.py``'s sleeping trainable, which builds the method's run
and checkpoints and reports every epoch as ``train_trial`` does, but sleeps instead of training. Each
method sleeps its own epoch length, in the ratio of its training step to ERM's that
``benchmarks/method_cost.py`` measured (``results/method_cost.json``, small_cnn): ERM 1x, PGD-AT 9.5x,
OT-MDR+TRADES 13x, ...

The cluster: a real two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head and
a worker node, each its own raylet and object store, one GCS; the same processes ``ray start`` would
start), with 8 logical "GPU"s and 8 CPUs per node. Each trial asks for 1 GPU and 1 CPU, so the
campaign has 16 trial slots. Nothing uses a GPU: the sleeping trainable never touches one.

Both arms run in one invocation, one after the other (``--arms`` sets the order), each on a fresh
cluster with a fresh MLflow store (sqlite, as a local search keeps it):
``sequential`` (``orchestration: sequential``: one method's search after another, as before
issue 20) and ``concurrent`` (every search at once, the slots shared fairly: search/slots.py).
Measured from records that the trainable and the processes driving the searches write (``instrument``):

- wall: the whole ``run_search`` call (searches and final evaluations);
- slot utilization = busy slot-seconds / (16 slots x wall), busy = the trials' epochs (the sleeps)
  plus the final evaluations' own time;
- driver load: the CPU seconds of the processes that drive the searches (the script's process and,
  concurrent, the Ray tasks that hold each method's Tuner and MLflow callback, and the fair-share
  actor), read from /proc every second, per trial result (one result per epoch); every MLflow call
  the Tracker's client makes, counted and timed, and the writes per second the store held while
  every search was logging at once.

    python benchmarks/campaign.py            # 8 methods x 16 trials, ASHA 9 epochs / rungs 1, 3; ERM epoch 1 s
    python benchmarks/campaign.py --quick    # CI smoke test: 2 methods x 2 trials x 2 epochs on 4 slots
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import glob
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
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from benchmarks._report import RESULTS, save  # noqa: E402

RECORDS = "OTARENA_CAMPAIGN_RECORDS"
"""Environment variable: the folder where instrumented processes write their records (unset: no instrumentation)."""
METHODS = ("erm", "langevin", "ot_mdr", "pgd_at", "mart", "trades", "armor_trades", "ot_mdr_trades")


# Instrumentation, run in the script's process and in every Ray worker -----------------------------

def _record(kind: str, **fields) -> None:
    """One JSON line in this process's own file of ``kind`` records: no two processes share a file."""
    with open(os.path.join(os.environ[RECORDS], f"{kind}-{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps(fields) + "\n")


def _record_epoch(method: str, trial_id: str, start: float, end: float) -> None:
    _record("epoch", method=method, trial=trial_id, start=start, end=end)


def instrument() -> None:
    """Count and time every MLflow call made in this process.

    Run in the script's process and, through ``search_task``, in each Ray task that drives a search in
    concurrent mode. Everything is observed around otarena's own functions, which still do all the work.
    """
    import functools

    from otarena.search import run, tracking

    if getattr(run, "_campaign_instrumented", False):
        return
    run._campaign_instrumented = True

    def counted(call):
        @functools.wraps(call)
        def counting(self, name_or_method, *args, **kwargs):
            name = name_or_method if isinstance(name_or_method, str) else name_or_method.__name__
            start = time.time()
            try:
                return call(self, name_or_method, *args, **kwargs)
            finally:
                _record("mlflow", call=name, start=start, end=time.time())
        return counting

    # Every call of the Tracker's client goes through one of these two: _write (metrics, params, tags,
    # status, artifacts: buffered through an outage) and _wait (calls that need an answer).
    tracking.ResilientClient._write = counted(tracking.ResilientClient._write)
    tracking.ResilientClient._wait = counted(tracking.ResilientClient._wait)


def evaluate_checkpoint(*args, **kwargs):
    """``search.run.evaluate_checkpoint`` (a final evaluation, a Ray task), timed into the records.

    The driver submits this in its place (``simulated_cluster``): Ray pickles it by this module's name,
    so in the worker it calls the original, and the Ray process title stays ``ray::evaluate_checkpoint``.
    """
    from otarena.search import run

    # Only the script's process has this function in search.run's place, and it never evaluates itself.
    assert run.evaluate_checkpoint is not evaluate_checkpoint, "called where search.run is patched"
    start = time.time()
    try:
        return run.evaluate_checkpoint(*args, **kwargs)
    finally:
        _record("evaluation", start=start, end=time.time())


def search_task(*args, **kwargs):
    """``search.run.search_task`` (one method's search in a concurrent campaign) with ``instrument`` first.

    The driver submits this in its place: Ray pickles it by this module's name, so in the worker it
    calls the original, and the Ray process title stays ``ray::search_task``.
    """
    from otarena.search import run

    instrument()
    return run.search_task(*args, **kwargs)


def read_records(folder: str, kind: str) -> list[dict]:
    return [json.loads(line) for path in sorted(glob.glob(os.path.join(folder, f"{kind}-*.jsonl")))
            for line in open(path)]


# The campaign ------------------------------------------------------------------------------------

def epoch_seconds(methods: list[str], erm_epoch_s: float) -> dict[str, float]:
    """Each method's sleeping epoch: ``erm_epoch_s`` times its step's cost ratio to ERM's (method_cost.json)."""
    with open(os.path.join(RESULTS, "method_cost.json")) as f:
        rows = json.load(f)["rows"]
    ratio = {r["method"]: r["ratio_to_erm"] for r in rows if r["arch"] == "small_cnn"}
    return {m: round(erm_epoch_s * ratio[m], 3) for m in methods}


def campaign_config(arm: str, methods: list[str], trials: int, epochs: int, grace: int, folder: str, tracking_uri: str):
    """One config with every method: otarena's defaults for each method's search space, a cheap final evaluation."""
    from otarena.search import config as config_lib

    raw = {
        "name": f"campaign-{arm}", "dataset": "digits", "arch": "small_cnn",
        "threat_model": {"norm": "Linf", "eps": 0.2}, "methods": list(methods),
        "train": {"attack_steps": 2, "val_n_ex": 144},
        "budget": {"trials": trials, "max_epochs": epochs, "grace_epochs": grace, "reduction_factor": 3},
        # One logical GPU per trial: the slots are the cluster's GPUs (search.run._max_concurrent).
        "resources": {"cpu": 1, "gpu": 1},
        "final_eval": {"n_ex": 20, "pgd_steps": 2, "pgd_targets": 0, "autoattack": None, "eps_sweep": False,
                       "checks": []},
        "tracking_uri": tracking_uri, "storage_path": os.path.join(folder, "ray"),
    }
    if "orchestration" in config_lib.SearchConfig.model_fields:
        raw["orchestration"] = arm
    # local=False: the config names GPUs that only the simulated cluster has.
    return config_lib.parse(raw, local=False)


@contextlib.contextmanager
def simulated_cluster(nodes: int, slots_per_node: int, records: str):
    """A real multi-node Ray cluster on this machine, connected to, with ``instrument`` run in this process."""
    import ray
    from ray.cluster_utils import Cluster

    # The nodes' processes, hence every worker, inherit these: where to write records, and the import path
    # of ``benchmarks`` (where the trainable's epoch recorder and the instrumented search task live).
    os.environ[RECORDS] = records
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(ROOT), os.environ.get("PYTHONPATH")) if p)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": slots_per_node, "num_gpus": slots_per_node})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=slots_per_node, num_gpus=slots_per_node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        try:
            from otarena.search import run

            instrument()  # the script's own process: it drives the searches of the sequential arm
            # The concurrent arm's search tasks are instrumented too, and every final evaluation timed
            # (search.run looks both up by name when it submits them).
            with mock.patch.object(run, "search_task", search_task), \
                    mock.patch.object(run, "evaluate_checkpoint", evaluate_checkpoint):
                yield cluster.address
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()


class CpuSampler:
    """CPU seconds of this process and every process it started (the cluster's), by what each was doing.

    Every ``period_s`` it reads /proc: each descendant's user+system time and its title (Ray names a
    worker by what it runs: ``ray::search_task``, ``ray::Campaign``, ``ray::IDLE``, ...). The CPU a
    process spent between two reads is put down to the title it had at the second. This process and
    its threads are ``driver``; the cluster's own daemons (raylet, GCS, ...) go by their program name.
    """

    def __init__(self, period_s: float = 1.0):
        import threading

        self.period_s, self.last, self.by_title = period_s, {}, collections.Counter()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    @staticmethod
    def processes() -> dict[int, tuple[int, float, str]]:
        """Every process: its parent, CPU seconds, title."""
        found, tick = {}, os.sysconf("SC_CLK_TCK")
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().split(b"\0")
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()
            first = cmdline[0].decode(errors="replace")
            title = first.split()[0] if first.startswith("ray::") else \
                os.path.basename((cmdline[1] if len(cmdline) > 1 and "python" in first else cmdline[0])
                                 .decode(errors="replace"))
            found[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, title)
        return found

    def sample(self) -> None:
        table, me = self.processes(), os.getpid()
        ours, frontier = {me}, [me]
        children = collections.defaultdict(list)
        for pid, (parent, _, _) in table.items():
            children[parent].append(pid)
        while frontier:
            for child in children[frontier.pop()]:
                ours.add(child)
                frontier.append(child)
        for pid in ours:
            _, cpu, title = table[pid]
            self.by_title["driver" if pid == me else title] += cpu - self.last.get(pid, 0.0 if pid != me else cpu)
            self.last[pid] = cpu

    def run(self) -> None:
        while not self.stop_event.wait(self.period_s):
            self.sample()

    def __enter__(self):
        self.sample()
        self.by_title.clear()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.thread.join()
        self.sample()


def sleeping_trial_fn(epochs: dict):
    """``train_trial`` sleeping each method's epoch, telling the records when it slept (orchestration.py)."""
    from benchmarks.orchestration import sleeping_trainable

    return sleeping_trainable(epochs, on_epoch=_record_epoch)


def machine_cpu_s() -> float:
    """CPU seconds this machine has spent busy (every process, ours or not), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_arm(arm: str, args, epochs: dict, folder: str, address: str, records: str) -> dict:
    """One campaign on the running cluster, in its own MLflow store; its records are those written meanwhile."""
    from otarena.search import run as search_run

    tracking_uri = f"sqlite:///{folder}/mlflow.db"
    cfg = campaign_config(arm, list(epochs), args.trials, args.epochs, args.grace, folder, tracking_uri)
    with contextlib.redirect_stdout(sys.stdout if args.verbose else open(os.devnull, "w")):
        machine, start = machine_cpu_s(), time.time()
        with CpuSampler() as cpu:
            search_run.run_search([cfg], address=address, out_dir=None, sequential=arm == "sequential",
                                  trial_fn=sleeping_trial_fn(epochs))
        end, machine = time.time(), machine_cpu_s() - machine
    return summarize(arm, records, args.nodes * args.slots_per_node, start, end, cpu.by_title, machine,
                     tracking_uri, cfg.name)


DRIVER = ("ray::search_task", "ray::Campaign")
"""Besides the script's process (``driver``: every Tuner, sequential), the processes that drive the searches,
by their titles' start: concurrent, each method's search task (its Tuner, its MLflow writes) and the
campaign's fair-share actor (``ray::Campaign``, ``ray::Campaign.<method>`` while it runs one)."""


def summarize(arm: str, records: str, slots: int, start: float, end: float, cpu: dict, machine_cpu: float,
              tracking_uri: str, experiment: str) -> dict:
    from mlflow import MlflowClient

    from otarena.leaderboard import tags as tag

    wall = end - start
    epochs, evaluations, calls = ([r for r in read_records(records, kind) if start <= r["start"] <= end]
                                  for kind in ("epoch", "evaluation", "mlflow"))
    busy = sum(e["end"] - e["start"] for e in epochs)
    evaluating = sum(e["end"] - e["start"] for e in evaluations)
    last_epoch = max(e["end"] for e in epochs)
    # The most epochs in flight at once: never more than the slots, or the slots are not what the trials hold.
    events = sorted([(e["start"], 1) for e in epochs] + [(e["end"], -1) for e in epochs])
    in_flight = peak = 0
    crowded = start  # the last time at least 3/4 of the slots were in an epoch: the campaign's tail begins
    for when, step in events:
        in_flight += step
        peak = max(peak, in_flight)
        if in_flight >= 0.75 * slots:
            crowded = when
    trials = collections.defaultdict(float)
    for e in epochs:
        trials[e["method"], e["trial"]] += e["end"] - e["start"]
    # No schedule on these slots ends sooner than the busy slot-seconds spread over every slot, nor than
    # the longest trial run alone: the best utilization this campaign allows, before any overhead.
    bound = max(busy / slots, max(trials.values()))
    per_method = {}
    for method in dict.fromkeys(e["method"] for e in epochs):
        mine = [e for e in epochs if e["method"] == method]
        per_method[method] = {"trials": len({e["trial"] for e in mine}), "trial_epochs": len(mine),
                              "busy_slot_s": sum(e["end"] - e["start"] for e in mine),
                              "first_epoch_at_s": min(e["start"] for e in mine) - start,
                              "last_epoch_end_at_s": max(e["end"] for e in mine) - start}
    # Every search logging at once: from the last search's first epoch to the first search's last epoch.
    together = (max(m["first_epoch_at_s"] for m in per_method.values()),
                min(m["last_epoch_end_at_s"] for m in per_method.values()))
    writes = [c for c in calls if c["call"] in ("log_batch", "set_terminated", "update_run", "log_artifact")
              or c["call"].startswith(("create_", "set_", "log_", "delete_"))]
    durations = sorted(c["end"] - c["start"] for c in calls)
    driver_cpu = sum(seconds for title, seconds in cpu.items() if title == "driver" or title.startswith(DRIVER))
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=5000)
    row = {
        "arm": arm, "slots": slots, "wall_s": wall, "search_wall_s": last_epoch - start,
        "busy_slot_s": busy, "evaluation_slot_s": evaluating,
        "utilization": (busy + evaluating) / (slots * wall),
        "utilization_searches": busy / (slots * (last_epoch - start)),
        "utilization_bound": busy / (slots * bound), "wall_bound_s": bound,
        "longest_trial_s": max(trials.values()),
        "tail_s": last_epoch - crowded,
        "tail_busy_slot_s": sum(max(0.0, e["end"] - max(e["start"], crowded)) for e in epochs),
        "trials": len(trials), "trial_results": len(epochs),
        "evaluations": len(evaluations), "peak_epochs_in_flight": peak,
        "mlflow_runs": dict(collections.Counter(r.data.tags.get(tag.ROLE) for r in runs)),
        "driver": {"cpu_s": driver_cpu, "cpu_s_per_trial_result": driver_cpu / len(epochs),
                   "cpu_s_by_process": {k: round(v, 2) for k, v in cpu.most_common() if v >= 0.01},
                   "cluster_cpu_s": sum(cpu.values()), "machine_cpu_s": machine_cpu,
                   "machine_cpu_share": machine_cpu / (wall * (os.cpu_count() or 1))},
        "mlflow": {
            "calls": len(calls), "writes": len(writes), "writes_per_s": len(writes) / wall,
            "call_s_mean": statistics.fmean(durations) if durations else 0.0,
            "call_s_p95": durations[int(0.95 * (len(durations) - 1))] if durations else 0.0,
            "call_s_max": durations[-1] if durations else 0.0,
            "by_call": dict(collections.Counter(c["call"] for c in calls).most_common()),
        },
        "all_searches_logging_s": max(0.0, together[1] - together[0]),
        "per_method": per_method,
    }
    if together[1] > together[0]:
        lo, hi = start + together[0], start + together[1]
        row["mlflow"]["writes_per_s_all_searches_logging"] = sum(lo <= c["start"] < hi for c in writes) / (hi - lo)
        row["mlflow"]["trial_results_per_s_all_searches_logging"] = sum(lo <= e["end"] < hi for e in epochs) / (hi - lo)
    return row

# Main --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=9, help="budget.max_epochs (ASHA's max_t)")
    parser.add_argument("--grace", type=int, default=1, help="budget.grace_epochs (ASHA's first rung)")
    parser.add_argument("--erm-epoch-s", type=float, default=1.0,
                        help="seconds of ERM's sleeping epoch; the others' in method_cost.json's ratios")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--slots-per-node", type=int, default=8)
    parser.add_argument("--arms", default="sequential,concurrent", help="in this order")
    parser.add_argument("--verbose", action="store_true", help="show otarena's progress lines")
    parser.add_argument("--quick", action="store_true", help="2 methods x 2 trials x 2 epochs on 4 slots (smoke test)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "campaign.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.methods, args.trials, args.epochs, args.grace, args.erm_epoch_s = "erm,pgd_at", 2, 2, 1, 0.05
        args.slots_per_node = 2

    import optuna
    import ray
    import torch

    torch.set_num_threads(1)
    epochs = epoch_seconds(args.methods.split(","), args.erm_epoch_s)
    host = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "load_avg_at_start": list(os.getloadavg()), "cluster": "ray.cluster_utils.Cluster (a raylet per node)"}
    print(f"epoch seconds: {epochs}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="otarena-campaign-") as tmp:
        arms = args.arms.split(",")
        # A fresh cluster for each arm, so that neither inherits the other's idle worker processes;
        # --quick runs both on one (a cluster's start and stop take seconds).
        for group in [arms] if args.quick else [[arm] for arm in arms]:
            records = os.path.join(tmp, "records-" + "-".join(group))
            os.makedirs(records)
            with simulated_cluster(args.nodes, args.slots_per_node, records) as address:
                for arm in group:
                    folder = os.path.join(tmp, arm)
                    os.makedirs(folder)
                    rows.append(run_arm(arm, args, epochs, folder, address, records))
                    r = rows[-1]
                    if not args.quick:  # an arm takes minutes: what is measured is kept as it comes
                        save({"benchmark": "campaign", "partial": True, "methods": epochs, "runs": rows}, args.out)
                    print(f"{arm}: wall {r['wall_s']:.0f}s, utilization {r['utilization']:.1%}, {r['trials']} trials, "
                          f"{r['trial_results']} trial results; CPU s by process: {r['driver']['cpu_s_by_process']}",
                          flush=True)

    print(f"\n{'arm':<11} {'slots':>5} {'trials':>6} {'results':>7} {'wall s':>7} {'util':>6} {'util srch':>9} "
          f"{'bound':>6} {'tail s':>6} {'drv cpu/res':>11} {'mlflow w/s':>10} {'w/s all':>8} {'call p95':>8}")
    for r in rows:
        m = r["mlflow"]
        print(f"{r['arm']:<11} {r['slots']:>5} {r['trials']:>6} {r['trial_results']:>7} {r['wall_s']:>7.1f} "
              f"{r['utilization']:>6.1%} {r['utilization_searches']:>9.1%} {r['utilization_bound']:>6.1%} "
              f"{r['tail_s']:>6.0f} "
              f"{r['driver']['cpu_s_per_trial_result']:>11.3f} {m['writes_per_s']:>10.1f} "
              f"{m.get('writes_per_s_all_searches_logging', float('nan')):>8.1f} {m['call_s_p95']:>8.3f}")
    print("util: (trial epochs + final evaluations) / (slots x wall); util srch: trial epochs / (slots x time to the\n"
          "last epoch); bound: the best utilization these epochs allow (their slot-seconds spread over every slot, or\n"
          "the longest trial alone); tail s: from the last time 3/4 of the slots were busy to the last epoch's end;\n"
          "drv cpu/res: CPU s of the processes driving the searches per trial result; w/s all: MLflow writes per\n"
          "second while every search was logging")
    summary = {}
    arms = {r["arm"]: r for r in rows}
    if {"sequential", "concurrent"} <= arms.keys():
        seq, conc = arms["sequential"], arms["concurrent"]
        summary = {"wall_ratio_sequential_to_concurrent": seq["wall_s"] / conc["wall_s"],
                   "utilization_sequential": seq["utilization"], "utilization_concurrent": conc["utilization"]}
        summary["targets_met"] = {"utilization >= 90%": conc["utilization"] >= 0.9,
                                  "wall >= 1.5x shorter": summary["wall_ratio_sequential_to_concurrent"] >= 1.5}
        print(f"concurrent: {summary['wall_ratio_sequential_to_concurrent']:.2f}x shorter wall than sequential; "
              f"utilization {conc['utilization']:.1%} against {seq['utilization']:.1%}; targets: "
              + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in summary["targets_met"].items()))
    for r in rows:
        assert r["peak_epochs_in_flight"] <= r["slots"], r
        # The MLflow layout of either arm: one parent run per method, one run per trial.
        assert r["mlflow_runs"]["search"] == len(epochs) and r["mlflow_runs"]["trial"] == r["trials"], r
    host["load_avg_at_end"] = list(os.getloadavg())
    report = {"benchmark": "campaign", "methods": epochs, "trials": args.trials, "max_epochs": args.epochs,
              "grace_epochs": args.grace, "reduction_factor": 3, "nodes": args.nodes,
              "slots_per_node": args.slots_per_node, "machine": host, "runs": rows, "summary": summary}
    if not args.quick:
        save(report, args.out)
    return 0


if __name__ == "__main__":
    # Run as benchmarks.campaign, not __main__: Ray pickles the search task and the trainable's epoch
    # recorder by that name, and its workers import them from there.
    from benchmarks import campaign

    sys.exit(campaign.main())
