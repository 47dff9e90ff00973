# SPDX-License-Identifier: Apache-2.0
"""Time a leaderboard build from a large MLflow sqlite store: MLflow reads vs tabulation vs rendering.

A store of N trial runs (default 10,000) is generated as ``docs/mlflow-schema.md`` says: 5 campaigns
(experiments) x 2 threat models x 5 methods, each search a parent run with ``search/*`` metrics and
its trials as child runs (completed, pruned by ASHA or failed, with per-epoch curves); the top ~5%
of each search by validation PGD accuracy are evaluated (``test/*`` metrics, flags, eps sweep, and
CIs, seed means, flag reasons and the per-point outcomes artifact ``evaluation/per_example.npz`` in the
three newer campaigns). The store is cached under the temp
dir, keyed by N and the MLflow version, so its creation is paid once and reported on its own.

Each round times, side by side, :func:`leaderboard.collect_campaign` (the MLflow reads, with
a bare ``MlflowClient.search_runs`` over the trial runs as the floor it cannot go below),
:func:`leaderboard.tabulate`, each output format alone, and the whole :func:`leaderboard.build`: with an
empty cache of per-point outcomes (``build``: the tied groups download the compared rows' artifacts), then
again with it filled (``build_warm``).
Read the ratios (seconds per 1,000 runs, the share of the build spent reading MLflow), not the
seconds: machines are noisy. A format that still raises ``NotImplementedError`` is skipped with a
note, so new formats are covered as they land.

    python benchmarks/leaderboard_build.py               # 10,000 trial runs, 3 rounds
    python benchmarks/leaderboard_build.py --quick       # CI smoke test: 1,000 runs, one round
    python benchmarks/leaderboard_build.py --trials 50000 --fresh
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._report import save  # noqa: E402

import mlflow  # noqa: E402
import numpy as np  # noqa: E402
import sqlalchemy  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag  # noqa: E402

from otarena import leaderboard  # noqa: E402
from otarena.leaderboard.collect import TRIAL_FILTER  # noqa: E402
from otarena.leaderboard import per_example  # noqa: E402
from otarena.leaderboard import tags as tag  # noqa: E402

GENERATOR_VERSION = 4
"""Bump when the generated store changes, so that cached stores are rebuilt."""

CAMPAIGNS = [  # experiment name, dataset, arch, max epochs, threat models (norm, eps), logs the newer keys
    ("digits-baseline", "digits", "small_cnn", 10, [("Linf", 0.2), ("Linf", 0.3)], False),
    ("mnist-l2", "mnist", "small_cnn", 10, [("L2", 1.5), ("Linf", 0.3)], False),
    ("cifar10-linf", "cifar10", "preact_resnet18", 20, [("Linf", 8 / 255), ("Linf", 4 / 255)], True),
    ("cifar10-l2", "cifar10", "preact_resnet18", 20, [("L2", 0.5), ("L2", 0.25)], True),
    ("svhn-linf", "svhn", "preact_resnet18", 20, [("Linf", 8 / 255), ("Linf", 4 / 255)], True),
]
METHODS = {  # searched hyperparameters: name -> (low, high, log scale or int); base val PGD accuracy
    "pgd_at": ({"lr": (0.005, 0.2, "log"), "weight_decay": (1e-5, 1e-3, "log")}, 0.45),
    "trades": ({"trades_beta": (1.0, 12.0, "log"), "lr": (0.005, 0.2, "log")}, 0.48),
    "mart": ({"mart_beta": (1.0, 10.0, "lin"), "lr": (0.005, 0.2, "log")}, 0.47),
    "langevin": ({"langevin_eta": (0.003, 0.3, "log"), "langevin_sigma": (0.0, 0.3, "lin"),
                  "langevin_k": (1, 4, "int"), "langevin_t": (1, 5, "int")}, 0.44),
    "ot_mdr": ({"ot_mdr_radius": (0.01, 0.3, "log"), "ot_mdr_particles": (1, 4, "int"),
                "lr": (0.005, 0.2, "log")}, 0.49),
}
EPOCH_KEYS = ("train/loss", "train/adv_acc", "val/clean_acc", "val/pgd_acc", "time/epoch_s")
FLAGS = ["", "", "", "small-sample", "single-seed", "masking:aa-gap", "masking:eps-plateau,small-sample"]
REASONS = {"small-sample": "n_ex=500: the 95% CI is wider than 4 points",
           "single-seed": "trained with one seed", "masking:aa-gap": "AutoAttack 12.3 points below PGD-50",
           "masking:eps-plateau": "PGD accuracy flat from eps=16/255 on"}
T0 = 1_735_689_600_000  # 2025-01-01, in ms


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------

def _uuid(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


def _sample(rng: random.Random, low, high, scale) -> str:
    """A hyperparameter value as search/ logs it (``str`` of the Python value)."""
    if scale == "int":
        return str(rng.randint(low, high))
    if scale == "log":
        return repr(math.exp(rng.uniform(math.log(low), math.log(high))))
    return repr(rng.uniform(low, high))


class _Rows:
    """The rows of the five MLflow tables a run lives in, plus the expected read-back for a few runs."""

    def __init__(self):
        self.runs, self.tags, self.params, self.metrics, self.latest = [], [], [], [], []

    def run(self, run_id, exp_id, artifact_root, name, status, start, end, tags, params, history):
        """One run; ``history`` is {key: [(step, timestamp, value), ...]} in step order."""
        self.runs.append({"run_uuid": run_id, "name": name, "source_type": "UNKNOWN", "source_name": "",
                          "entry_point_name": "", "user_id": "bench", "status": status, "start_time": start,
                          "end_time": end, "deleted_time": None, "source_version": "", "lifecycle_stage": "active",
                          "artifact_uri": f"{artifact_root}/{run_id}/artifacts", "experiment_id": int(exp_id)})
        self.tags += [{"key": k, "value": v, "run_uuid": run_id} for k, v in {**tags, "mlflow.runName": name}.items()]
        self.params += [{"key": k, "value": v, "run_uuid": run_id} for k, v in params.items()]
        for key, points in history.items():
            rows = [{"key": key, "value": v, "timestamp": ts, "step": s, "is_nan": False, "run_uuid": run_id}
                    for s, ts, v in points]
            self.metrics += rows
            # MLflow's latest value: the largest step (then timestamp, then value), as log_batch keeps it.
            self.latest.append(max(rows, key=lambda r: (r["step"], r["timestamp"], r["value"])))


def _search(rows: _Rows, rng, exp_id, artifact_root, campaign, threat, method, n_trials, t_start):
    """A search's parent run and its ``n_trials`` trial runs; returns (trial run ids, evaluated run ids)."""
    name, dataset, arch, max_epochs, _, newer = campaign
    norm, eps = threat
    space, base = METHODS[method]
    place = {tag.METHOD: method, tag.DATASET: dataset, tag.ARCH: arch,
             tag.NORM: norm, tag.EPS: repr(eps), tag.PAPER: f"{method} paper",
             tag.PAPER_LINK: f"https://arxiv.org/abs/{rng.randint(1000, 2999)}.{rng.randint(10000, 99999)}"}
    parent_id = _uuid(rng)
    trials, t, total_epochs, device_s = [], t_start, 0, 0.0
    for i in range(n_trials):
        run_id = _uuid(rng)
        outcome = rng.choices(["completed", "pruned", "failed"], [0.35, 0.62, 0.03])[0]
        epochs = max_epochs if outcome == "completed" else (
            rng.choice([1, 3, 9]) if outcome == "pruned" else rng.randint(1, max_epochs))
        skill = base + rng.gauss(0, 0.05)
        epoch_s = rng.uniform(2.0, 4.0) if dataset in ("digits", "mnist") else rng.uniform(30.0, 60.0)
        history = {k: [] for k in EPOCH_KEYS}
        for e in range(epochs):
            ts = t + int((e + 1) * epoch_s * 1000)
            progress = 1 - math.exp(-(e + 1) / 4)
            pgd = max(0.0, min(1.0, skill * progress + rng.gauss(0, 0.01)))
            clean = min(1.0, pgd + 0.3 + rng.gauss(0, 0.01))
            for key, value in zip(EPOCH_KEYS, (2.3 * (1 - progress) + 0.5, pgd + 0.05, clean, pgd,
                                               epoch_s * rng.uniform(0.95, 1.05))):
                history[key].append((e, ts, value))
        best = max(range(epochs), key=lambda e: history["val/pgd_acc"][e][2])
        end = t + int(epochs * epoch_s * 1000) + 500
        for key, value in {"val/best_pgd_acc": history["val/pgd_acc"][best][2],
                           "val/best_clean_acc": history["val/clean_acc"][best][2],
                           "val/best_epoch": float(best), "train/epochs": float(epochs)}.items():
            history[key] = [(0, end, value)]
        tags = {**place, tag.ROLE: "trial", "mlflow.parentRunId": parent_id,
                tag.TRIAL_ID: f"{method}_{i:05d}", tag.OUTCOME: outcome,
                tag.SEARCHED: ",".join(sorted(space))}
        if outcome == "completed":
            tags[tag.CHECKPOINT] = f"/ray/{name}/{method}/trial_{i:05d}/checkpoint_{epochs - 1:06d}"
        if outcome == "failed":
            tags[tag.FAILURE] = "RuntimeError: CUDA out of memory"
        params = {k: _sample(rng, *spec) for k, spec in space.items()}
        params = {**{"epochs": str(max_epochs), "batch_size": "128", "momentum": "0.9", "optimizer": "sgd",
                     "schedule": "cosine", "attack_steps": "10", "step_size": repr(eps / 4), "seed": "0",
                     "lr": "0.05", "weight_decay": "0.0005"}, **params}
        trials.append({"id": run_id, "name": f"{method}-{i:05d}", "status": "FAILED" if outcome == "failed"
                       else "FINISHED", "start": t, "end": end, "tags": tags, "params": params, "history": history,
                       "outcome": outcome})
        total_epochs += epochs
        device_s += (end - t) / 1000
        t += rng.randint(20_000, 120_000)  # trials start staggered (several run at once)
    completed = sorted((r for r in trials if r["outcome"] == "completed"),
                       key=lambda r: r["history"]["val/best_pgd_acc"][0][2], reverse=True)
    evaluated = completed[:max(1, round(0.05 * n_trials))]
    for rank, run in enumerate(evaluated):
        _evaluate(run, rng, eps, newer, seeds=3 if newer and rank == 0 else 1)
    for run in trials:
        rows.run(run["id"], exp_id, artifact_root, run["name"], run["status"], run["start"], run["end"],
                 run["tags"], run["params"], run["history"])
        if "per_example" in run:
            folder = Path(urlparse(artifact_root).path) / run["id"] / "artifacts" / "evaluation"
            folder.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(folder / "per_example.npz", **per_example.pack(run.pop("per_example")))
    parent_tags = {**place, tag.ROLE: "search"}
    parent_params = {"config.name": name, "config.dataset": dataset, "config.arch": arch,
                     "config.threat_model.norm": norm, "config.threat_model.eps": repr(eps),
                     "config.budget.trials": str(n_trials), "config.budget.max_epochs": str(max_epochs),
                     "config.budget.grace_epochs": "1", "config.budget.reduction_factor": "3",
                     "config.resources.gpu": "1", "config.seed": "0", "search.algorithm": "optuna-tpe",
                     "search.scheduler": "asha", "search.metric": "val/pgd_acc",
                     "search.space": json.dumps({k: list(v) for k, v in space.items()})}
    end = max(r["end"] for r in trials) + 1000
    parent_metrics = {"search/n_trials": float(n_trials), "search/trial_epochs": float(total_epochs),
                      "search/device_hours": device_s / 3600, "search/wall_s": (end - t_start) / 1000}
    rows.run(parent_id, exp_id, artifact_root, f"{method}-search-{name}", "FINISHED", t_start, end, parent_tags,
             parent_params, {k: [(0, end, v)] for k, v in parent_metrics.items()})
    return [r["id"] for r in trials], [r["id"] for r in evaluated], parent_id, end


def _evaluate(run, rng, eps, newer, seeds):
    """Add the final evaluation's tags, params and test metrics to a trial (docs/mlflow-schema.md)."""
    best = run["history"]["val/best_pgd_acc"][0][2]
    aa = max(0.0, best - 0.03 + rng.gauss(0, 0.01))
    pgd, clean = aa + 0.02, min(1.0, aa + 0.32)
    n_ex = 1000 if newer else 500
    t = run["end"] + 60_000
    metrics = {"test/clean_acc": clean, "test/pgd_acc": pgd, "test/aa_acc": aa, "test/n_ex": float(n_ex),
               "test/aa/apgd-ce": aa + 0.01, "test/aa/apgd-t": aa + 0.003, "test/aa/fab-t": aa + 0.001,
               "test/aa/square": aa, "test/aa_blackbox_only": 0.0, "test/pgd_check/pgd-10": pgd + 0.01,
               "test/pgd_check/pgd-50": pgd + 0.002, "test/pgd_check/pgd": pgd}
    flags = rng.choice(FLAGS)
    tags = {tag.EVALUATED: "true", tag.FLAGS: flags}
    params = {"eval.n_ex": str(n_ex), "eval.pgd_steps": "50", "eval.pgd_restarts": "1", "eval.autoattack": "True",
              "eval.seed": "0"}
    if newer:
        half = 1.96 * math.sqrt(0.25 / n_ex)
        for m, v in (("clean_acc", clean), ("pgd_acc", pgd), ("aa_acc", aa)):
            metrics |= {f"test/{m}_ci_low": max(0.0, v - half), f"test/{m}_ci_high": min(1.0, v + half)}
        if seeds >= 2:
            metrics["test/n_seeds"] = float(seeds)
            for m, v in (("clean_acc", clean), ("pgd_acc", pgd), ("aa_acc", aa)):
                metrics |= {f"test/{m}_mean": v - 0.004, f"test/{m}_std": 0.006}
        names = [f for f in flags.split(",") if f]
        tags[tag.FLAG_REASONS] = json.dumps({f: REASONS[f] for f in names})
        radii = [eps * k / 4 for k in range(9)]
        sweep_pgd = [round(max(0.0, clean * math.exp(-2.5 * r / eps)), 5) for r in radii]
        tags[tag.EPS_SWEEP] = json.dumps(
            {"eps": [round(r, 5) for r in radii], "pgd_acc": sweep_pgd, "robust_acc": [min(p, 0.9) for p in sweep_pgd],
             "chance_bound": 0.1, "steps": 50, "norm": run["tags"][tag.NORM]}, separators=(",", ":"))
        params |= {"eval.sweep_steps": "50", "eval.seeds": str(seeds), "eval.thresholds.aa_gap": "0.05"}
        run["per_example"] = _per_example(rng, n_ex, clean, pgd, aa)
        tags |= {tag.TEST_POINTS: f"{n_ex}:{run['per_example']['index_hash']}",
                 tag.PER_EXAMPLE_HASH: _hash(run["per_example"])}
    run["tags"] |= tags
    run["params"] |= params
    run["history"] |= {k: [(0, t, v)] for k, v in metrics.items()}


def _per_example(rng, n_ex: int, clean: float, pgd: float, aa: float) -> dict:
    """Per-point outcomes at the run's accuracies, as search/evaluation.py stores them (docs/mlflow-schema.md)."""
    draws = np.random.default_rng(rng.getrandbits(32)).random(n_ex)
    index = np.arange(n_ex)
    return {"index": index.astype(np.int32),
            "index_hash": hashlib.sha256(index.astype("<i8").tobytes()).hexdigest()[:16],
            "clean": draws < clean, "pgd": draws < pgd, "aa": draws < aa,
            "aa_stage": np.where(draws < aa, 5, np.where(draws < clean, 1, 0)).astype(np.int8)}


def _hash(points: dict) -> str:
    """``otarena.per_example_hash``: SHA-256 of the arrays in name order (search/evaluation.py)."""
    digest = hashlib.sha256()
    for name in sorted(points):
        digest.update(name.encode() + np.ascontiguousarray(points[name]).tobytes())
    return digest.hexdigest()[:16]


def generate(uri: str, n_trials: int, artifact_root: str, seed: int = 0) -> dict:
    """Write the campaign into a new sqlite store at ``uri``; returns the counts and a few runs to check.

    MLflow creates the schema and the experiments; the runs are then inserted in bulk into MLflow's
    own tables (``runs``, ``tags``, ``params``, ``metrics``, ``latest_metrics``, through its SQLAlchemy
    models), which is what ``create_run`` + ``log_batch`` write, minus ~10k round trips each.
    """
    rng = random.Random(seed)
    client = MlflowClient(uri)
    searches = [(c, threat, m) for c in CAMPAIGNS for threat in c[4] for m in METHODS]
    exp_ids = {c[0]: client.create_experiment(c[0], artifact_location=f"{artifact_root}/{c[0]}") for c in CAMPAIGNS}
    rows = _Rows()
    trial_ids, evaluated, parents = [], [], []
    t = T0
    for i, (campaign, threat, method) in enumerate(searches):
        n = n_trials // len(searches) + (i < n_trials % len(searches))
        ids, ev, parent, t = _search(rows, rng, exp_ids[campaign[0]], f"{artifact_root}/{campaign[0]}", campaign,
                                     threat, method, n, t)
        trial_ids += ids
        evaluated += ev
        parents.append(parent)
    engine = sqlalchemy.create_engine(uri)
    with engine.begin() as conn:
        conn.exec_driver_sql("PRAGMA synchronous = OFF")  # a throwaway store: no need to survive a power cut
        for model, table_rows in ((SqlRun, rows.runs), (SqlTag, rows.tags), (SqlParam, rows.params),
                                  (SqlMetric, rows.metrics), (SqlLatestMetric, rows.latest)):
            conn.execute(model.__table__.insert(), table_rows)
    engine.dispose()
    expected = {}  # a few runs, as MlflowClient must read them back
    by_id = {r["run_uuid"]: r for r in rows.runs}
    for run_id in [evaluated[0], evaluated[-1], trial_ids[0], trial_ids[-1], parents[0]]:
        expected[run_id] = {
            "run": by_id[run_id],
            "tags": {r["key"]: r["value"] for r in rows.tags if r["run_uuid"] == run_id},
            "params": {r["key"]: r["value"] for r in rows.params if r["run_uuid"] == run_id},
            "metrics": {r["key"]: r["value"] for r in rows.latest if r["run_uuid"] == run_id},
            "history": sum(r["key"] == "val/pgd_acc" for r in rows.metrics if r["run_uuid"] == run_id)}
    return {"n_trials": len(trial_ids), "n_evaluated": len(evaluated), "n_searches": len(searches),
            "n_experiments": len(CAMPAIGNS), "n_runs": len(rows.runs), "n_metric_rows": len(rows.metrics),
            "expected": expected}


def verify(uri: str, expected: dict) -> None:
    """Read the sample runs back through MlflowClient: the bulk-written store must be a valid MLflow store."""
    client = MlflowClient(uri)
    for run_id, want in expected.items():
        run = client.get_run(run_id)
        info = want["run"]
        got = (run.info.run_name, run.info.status, run.info.start_time, run.info.end_time,
               run.info.experiment_id, run.info.lifecycle_stage, run.info.artifact_uri)
        assert got == (info["name"], info["status"], info["start_time"], info["end_time"], str(info["experiment_id"]),
                       "active", info["artifact_uri"]), (run_id, got)
        assert run.data.tags == want["tags"], run_id
        assert run.data.params == want["params"], run_id
        assert run.data.metrics == want["metrics"], run_id
        assert len(client.get_metric_history(run_id, "val/pgd_acc")) == want["history"], run_id


def store(n_trials: int, cache: Path, fresh: bool) -> tuple[str, dict]:
    """The cached store for ``n_trials`` (created when missing or ``fresh``), and its metadata."""
    folder = cache / f"v{GENERATOR_VERSION}-mlflow{mlflow.__version__}-n{n_trials}"
    db, meta_path = folder / "mlflow.db", folder / "meta.json"
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    if db.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        verify(f"sqlite:///{db}", meta["expected"])
        return f"sqlite:///{db}", {**meta, "reused": True}
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f"partial-{os.getpid()}.db"  # renamed when complete: never a half-written cache
    partial.unlink(missing_ok=True)
    start = time.perf_counter()
    meta = generate(f"sqlite:///{partial}", n_trials, (folder / "artifacts").as_uri())
    meta["create_s"] = time.perf_counter() - start
    verify(f"sqlite:///{partial}", meta["expected"])
    os.replace(partial, db)
    meta["size_mb"] = db.stat().st_size / 2**20
    meta_path.write_text(json.dumps(meta))
    return f"sqlite:///{db}", {**meta, "reused": False}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

@contextmanager
def _timer(into: list):
    start = time.perf_counter()
    yield
    into.append(time.perf_counter() - start)


def raw_search(uri: str) -> int:
    """Every trial run through bare ``MlflowClient.search_runs``: the MLflow read floor."""
    client = MlflowClient(uri)
    ids = [e.experiment_id for e in client.search_experiments(max_results=50_000)]
    n, token = 0, None
    while True:
        page = client.search_runs(ids, TRIAL_FILTER, ViewType.ACTIVE_ONLY, 50_000, page_token=token)
        n += len(page)
        token = page.token
        if not token:
            return n


def render_only(out: Path, fmt: str, campaign, tables) -> None:
    """One format's writer from the registry, with the collected campaign and tables handed in."""
    out.mkdir(parents=True, exist_ok=True)
    writer = leaderboard.FORMATS[fmt]
    writer.write(out / writer.file, leaderboard.Output(tables, campaign, "otarena leaderboard", None))


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "mlflow": mlflow.__version__,
            "sqlalchemy": sqlalchemy.__version__,
            # Other work on the machine inflates the seconds (not the side-by-side ratios).
            "loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10_000, help="trial runs in the store")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1,000 trial runs, one round (a smoke test)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "otarena-bench-leaderboard"),
                        help="where generated stores are kept, one per size")
    parser.add_argument("--fresh", action="store_true", help="regenerate the store even when cached")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                      "leaderboard_build.json"))
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.rounds = 1_000, 1
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    uri, meta = store(args.trials, Path(args.cache), args.fresh)
    n_runs = meta["n_runs"]
    print(f"store: {meta['n_trials']:,} trial runs + {meta['n_searches']} search runs in {meta['n_experiments']} "
          f"experiments, {meta['n_evaluated']} evaluated, {meta['n_metric_rows']:,} metric rows, "
          f"{meta['size_mb']:.0f} MB; created in {meta['create_s']:.1f} s"
          f"{' (cached: reused)' if meta['reused'] else ''}")

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        # Warm-up, and which formats exist yet: a stub renderer raises NotImplementedError.
        campaign = leaderboard.collect_campaign(uri)
        assert len(campaign.trials) == meta["n_trials"], (len(campaign.trials), meta["n_trials"])
        assert len(campaign.rows) == meta["n_evaluated"], (len(campaign.rows), meta["n_evaluated"])
        tables = leaderboard.tabulate(list(campaign.rows))
        formats, skipped = [], []
        for fmt in leaderboard.FORMATS:
            try:
                render_only(out / "probe", fmt, campaign, tables)
                formats.append(fmt)
            except NotImplementedError:
                skipped.append(fmt)
                print(f"note: format {fmt!r} is not implemented yet (NotImplementedError): skipped")
        seconds: dict[str, list[float]] = {k: [] for k in ["search_runs", "collect", "tabulate", "tied_groups", "build",
                                                           "build_warm", *[f"render:{f}" for f in formats]]}
        for round_ in range(args.rounds):
            with _timer(seconds["search_runs"]):
                assert raw_search(uri) == meta["n_trials"]
            with _timer(seconds["collect"]):
                campaign = leaderboard.collect_campaign(uri)
            with _timer(seconds["tabulate"]):
                tables = leaderboard.tabulate(list(campaign.rows))
            # The tied groups alone, from an empty cache: what reading the compared rows' outcomes costs.
            os.environ["OTARENA_CACHE"] = str(out / f"cache-tied-{round_}")
            with _timer(seconds["tied_groups"]):
                per_example.with_standings(tables, uri)
            for fmt in formats:
                with _timer(seconds[f"render:{fmt}"]):
                    render_only(out / "render", fmt, campaign, tables)
            # A cold cache of per-point outcomes each round: the tied groups download what they compare.
            os.environ["OTARENA_CACHE"] = str(out / f"cache-{round_}")
            with _timer(seconds["build"]):
                built = leaderboard.build(uri, out / "site", formats=formats)
            with _timer(seconds["build_warm"]):
                leaderboard.build(uri, out / "site", formats=formats)
            assert len(built) == len(tables) > 0

    median = {k: statistics.median(v) for k, v in seconds.items()}
    render_s = sum(v for k, v in median.items() if k.startswith("render:"))
    build_s = median["build"]
    print(f"\n{'phase':<34} {'median s':>9} {'% of build':>10}")
    labels = {"search_runs": "(bare MlflowClient.search_runs)", "collect": "collect_campaign (MLflow reads)",
              "tabulate": "tabulate", "tied_groups": "tied groups (cold cache)", "build": "build (end to end)",
              "build_warm": "build (outcomes cached)"}
    for key in ["collect", "search_runs", "tabulate", "tied_groups", *[k for k in median if k.startswith("render:")],
                "build", "build_warm"]:
        label = labels[key] if key in labels else f"render {key.split(':', 1)[1]}"
        print(f"{label:<34} {median[key]:9.3f} {100 * median[key] / build_s:9.1f}%")
    ratios = {"build_s_per_1k_runs": build_s / n_runs * 1000, "collect_share_of_build": median["collect"] / build_s,
              "collect_over_bare_search_runs": median["collect"] / median["search_runs"],
              "render_share_of_build": render_s / build_s,
              "tied_groups_share_of_build": median["tied_groups"] / build_s}
    print(f"\nbuild: {ratios['build_s_per_1k_runs']:.3f} s per 1,000 runs ({n_runs:,} runs: {build_s:.2f} s); "
          f"MLflow reads {100 * ratios['collect_share_of_build']:.0f}% of it; collect_campaign = "
          f"{ratios['collect_over_bare_search_runs']:.2f} x a bare search_runs over the trials; the tied groups "
          f"{100 * ratios['tied_groups_share_of_build']:.1f}% of it")
    print(f"formats timed: {', '.join(formats)}; skipped (not implemented): {', '.join(skipped) or 'none'}")
    report = {"benchmark": "leaderboard_build", "rounds": args.rounds,
              "store": {k: v for k, v in meta.items() if k != "expected"}, "formats": formats,
              "skipped_formats": skipped, "tables": len(tables), "rows": len(campaign.rows),
              "median_s": median, "ratios": ratios, "machine": machine()}
    if not args.quick:
        save(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
