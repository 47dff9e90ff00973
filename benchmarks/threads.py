# SPDX-License-Identifier: Apache-2.0
"""Torch's CPU threads for ``otarena evaluate`` and ``otarena train`` (issue #14, item 3).

The same two workloads run with one thread and with torch's default, side by side, interleaved
round by round with the order rotated, on the machine as it is ("as is": on a shared machine, with
the other jobs it runs), and with ``--busy N`` also with N extra CPU-bound processes ("busy": a
shared machine made on purpose; off by default, since it slows down whoever shares the machine):

    evaluate  clean accuracy and the AutoAttack cascade (standard) on the first ``--n-ex`` digits
              test images of a SmallCNN briefly trained with PGD-AT at eps 0.2 (as ``otarena evaluate``)
    train     one epoch of TRADES on digits with ``otarena train``'s digits defaults

Torch's default is one thread per core it sees; ``--threads``' default in both commands is the
cores this process may use (CPU affinity, cgroup quota: ``methods.common.train.usable_cpus``), at
most torch's default. When the two differ (a container granted fewer cores than the host has),
that setting gets a row too.
The ratios of medians are what to read: the seconds of the default over those of one thread. On a
CPU the script also reports process CPU time: the threads of a multi-threaded op spin while they
wait for descheduled siblings, which costs CPU time that does no work.

    python benchmarks/threads.py             # writes results/threads.json
    python benchmarks/threads.py --quick     # CI smoke test: a tiny workload, one round
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._report import RESULTS, save  # noqa: E402
from benchmarks.attack_speed import digits_model, machine  # noqa: E402

from otarena import methods  # noqa: E402
from otarena.methods.common.train import usable_cpus  # noqa: E402
from otarena.search.cli import DATASET_TRAIN  # noqa: E402

THREAT = methods.ThreatModel("Linf", 0.2)


@contextlib.contextmanager
def busy(processes: int):
    """``processes`` pure-Python busy loops for the duration: other jobs on a shared machine. Each
    stops when this script does, however it ends (its parent changes)."""
    spin = f"import os\nwhile os.getppid() == {os.getpid()}: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(processes)]
    try:
        time.sleep(0.5 if processes else 0)  # let them start spinning
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def evaluate_workload(model, x, y, quick: bool):
    attacks = ("clean", "pgd") if quick else ("clean", "autoattack")
    return lambda: methods.evaluate(model, (x, y), THREAT, attacks, batch_size=len(y), pgd_steps=2)


def train_workload(quick: bool):
    train = methods.data.load("digits", "train")
    if quick:
        train = train.subset(64)
    hparams = {**DATASET_TRAIN["digits"], "epochs": 1, "val_n_ex": 16, "val_pgd_steps": 1}

    def one_epoch():
        run = methods.build_run("trades", hparams, dataset="digits", arch="small_cnn", threat=THREAT, device="cpu",
                                train=train, val=train.subset(16))
        methods.fit(run)
    return one_epoch


def timed(work, threads: int) -> dict:
    torch.set_num_threads(threads)
    wall, cpu = time.perf_counter(), time.process_time()
    work()
    return {"seconds": time.perf_counter() - wall, "cpu_seconds": time.process_time() - cpu,
            "load": os.getloadavg()[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny workload and one round (a smoke test)")
    parser.add_argument("--n-ex", type=int, default=8, help="test images AutoAttack attacks")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--busy", type=int, default=0, metavar="N",
                        help="also measure with N busy-loop processes beside (e.g. the usable cores)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "threads.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.n_ex, args.rounds = 4, 1
    torch_default, cores, load = torch.get_num_threads(), usable_cpus(), os.getloadavg()[0]
    settings = {"1 thread": 1, "torch default": torch_default}
    if min(cores, torch_default) != torch_default:  # set_threads' default
        settings["--threads default"] = min(cores, torch_default)
    print(f"torch default {torch_default} threads, usable cores {cores}, os.cpu_count() {os.cpu_count()}, "
          f"load average {load:.1f}")
    torch.set_num_threads(1)
    model, x, y, _ = digits_model(torch.device("cpu"), args.quick)
    workloads = {"evaluate": evaluate_workload(model, x[:args.n_ex], y[:args.n_ex], args.quick),
                 "train": train_workload(args.quick)}
    conditions = {"as is": 0, **({"busy": args.busy} if args.busy or args.quick else {})}
    if args.quick:
        conditions["busy"] = 1
    times: dict = {(c, w, s): [] for c in conditions for w in workloads for s in settings}
    for r in range(args.rounds):
        for condition, spinners in conditions.items():
            with busy(spinners):
                for workload, work in workloads.items():
                    order = list(settings)[r % len(settings):] + list(settings)[:r % len(settings)]
                    for setting in order:
                        times[condition, workload, setting].append(timed(work, settings[setting]))
                        print(f"round {r + 1} {condition:<5} {workload:<8} {setting:<17} "
                              f"{times[condition, workload, setting][-1]['seconds']:7.1f}s", flush=True)
    rows = [{"condition": c, "workload": w, "setting": s, "threads": settings[s],
             "seconds": statistics.median(t["seconds"] for t in runs),
             "cpu_seconds": statistics.median(t["cpu_seconds"] for t in runs), "rounds": len(runs),
             "seconds_per_round": [t["seconds"] for t in runs], "load_average_per_round": [t["load"] for t in runs]}
            for (c, w, s), runs in times.items()]
    by = {(row["condition"], row["workload"], row["setting"]): row for row in rows}
    ratios = {f"{c}/{w}/{s} over 1 thread": {key: by[c, w, s][key] / by[c, w, "1 thread"][key]
                                              for key in ("seconds", "cpu_seconds")}
              for c in conditions for w in workloads for s in settings if s != "1 thread"}
    print(f"\n{'condition':<9} {'workload':<8} {'setting':<17} {'threads':>7} {'wall s':>8} {'cpu s':>8}")
    for row in rows:
        print(f"{row['condition']:<9} {row['workload']:<8} {row['setting']:<17} {row['threads']:>7} "
              f"{row['seconds']:8.2f} {row['cpu_seconds']:8.2f}")
    print("\ntime of the setting over one thread's (ratio of medians; > 1: one thread is faster)")
    for pair, value in ratios.items():
        print(f"  {pair:<45} wall {value['seconds']:.2f}x   cpu {value['cpu_seconds']:.2f}x")
    if args.quick:
        print("(--quick: one round of a tiny workload, a smoke test; these figures measure nothing)")
        return 0
    save({"benchmark": "threads", "n_ex": args.n_ex, "rounds": args.rounds, "usable_cores": cores,
          "torch_default_threads": torch_default, "busy_processes": args.busy,
          "machine": machine(torch.device("cpu")) | {"torch_threads": torch_default, "load_average_at_start": load,
                                                       "load_average_at_end": os.getloadavg()[0]},
          "rows": rows, "ratios": ratios}, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
