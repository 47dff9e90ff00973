# SPDX-License-Identifier: Apache-2.0
"""A search: Ray Tune + Optuna (TPE) + ASHA per method, MLflow tracking, and the final evaluation.

For each method of a config: one MLflow parent run, one Tuner with the same trial budget, one
child run per trial (written from the driver by ``MlflowTrials``), then the top-k trials by
*validation* PGD accuracy are evaluated on the test split (search/evaluation.py) in Ray tasks and
the results, flags and checkpoint land in the trial's own run. With ``final_eval.seeds > 1`` the
selected configuration is also retrained with further seeds, each a ``seed`` run beside the
trials, and the trial's run gets the mean and standard deviation over all of them.

A parent run ends with its own search; the final evaluations write into its trials' runs later.
A Ctrl-C stops the whole campaign, saved for ``--resume`` (``CtrlC``).

Every method search of a campaign runs at once, each Tuner in its own Ray task with a fair share of the
trial slots (``_search_at_once``, search/slots.py, docs/cluster.md), unless ``orchestration: sequential``
(``otarena search --sequential``) runs them one after another as before.

Two traps of Ray Tune 2.x are handled here. Its OptunaSearch tells Optuna that an ASHA-stopped trial
is COMPLETE, with a partial-budget score; here it is PRUNED. Its MLflowLoggerCallback keeps the
trial-to-run map in memory and opens a second run after ``Tuner.restore``; here a trial maps to
exactly one MLflow run through the ``otarena.trial_id`` tag.
"""
from __future__ import annotations

import json
import math
import os
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from ray.tune.search.optuna import OptunaSearch

from otarena import methods
from otarena.leaderboard import tags as tag
from otarena.methods.common import data as data_lib
from otarena.methods.common.train import set_threads
from otarena.search import budget, evaluation, fidelity, importance, slots, spaces, studies
from otarena.search.config import SearchConfig
from otarena.search.moasha import MOASHAScheduler
from otarena.search.objectives import DEFAULT_OBJECTIVES, Condition, Selection, best_key, pareto_front
from otarena.search.tracking import Tracker, flatten, last_line
from otarena.search.trainable import TrialSpec, load_state, train_trial

METRIC, MODE = "val/pgd_acc", "max"
"""What ASHA prunes on and TPE optimizes by default (``objectives``): validation PGD accuracy, higher is better."""


RELAY: Optional[Callable[[str], Any]] = None
"""Inside a search task of a concurrent campaign: sends a log line to the driver, which prints it."""


def log(message: str) -> None:
    line = f"[otarena {time.strftime('%H:%M:%S')}] {message}"
    if RELAY is not None:
        RELAY(line)
    else:
        print(line, flush=True)


class Interrupted(Exception):
    """A Ctrl-C stopped the campaign; ``resumable`` when ``--resume`` has something left to do."""

    def __init__(self, resumable: bool = True):
        super().__init__("stopped by Ctrl-C")
        self.resumable = resumable


class CtrlC:
    """Ctrl-C for a whole campaign: the first stops it cleanly, a second one exits at once.

    Ray Tune would take SIGINT over inside ``Tuner.fit`` and stop only the Tuner, after which the
    driver went on to the next method. Here the campaign keeps SIGINT (``TUNE_DISABLE_SIGINT_HANDLER``)
    and, while a Tuner runs, hands the first Ctrl-C to Tune's own stop handler, the one Tune also
    installs for SIGUSR1: Tune starts no new trial, saves the experiment with the running trials
    unfinished, so that ``Tuner.restore`` resumes them, and ``fit()`` returns. Outside a Tuner the
    campaign stops at its next step (``check``), and waits for the final evaluations in short slices.
    """

    def __init__(self):
        self.requested = False
        self.tune_stop = None
        self.previous = None

    def install(self) -> None:
        self.requested, self.tune_stop = False, None
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
            self.previous = signal.signal(signal.SIGINT, self.on_signal)

    def uninstall(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def on_signal(self, signum, frame) -> None:
        if self.requested:
            log("second Ctrl-C: exiting now; what the last save missed is trained again on --resume")
            # The local Ray cluster goes too: its agents would outlive the driver by minutes.
            for pid in _descendants(os.getpid()):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            os._exit(INTERRUPT_EXIT)
        self.requested = True
        log("Ctrl-C: stopping the campaign: no new trial, the running ones saved for --resume "
            "(Ctrl-C again to exit at once)")
        self.stop_tune()

    def tune_started(self) -> None:
        """Called as a Tuner sets up, once Tune has installed its stop handler."""
        handler = signal.getsignal(signal.SIGUSR1)
        self.tune_stop = handler if callable(handler) else None
        self.stop_tune()  # a Ctrl-C that came while the Tuner was being built

    def stop_tune(self) -> None:
        if self.requested and self.tune_stop is not None:
            handler, self.tune_stop = self.tune_stop, None
            handler(signal.SIGUSR1, None)

    def check(self) -> None:
        if self.requested:
            raise Interrupted()

    def wait(self, refs: list) -> None:
        """Wait for Ray tasks, in slices short enough for a Ctrl-C to stop the wait."""
        pending = list(refs)
        while pending:
            self.check()
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
        self.check()


def _descendants(pid: int) -> list[int]:
    """The processes started under ``pid``, children first (from /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc") if os.path.isdir("/proc") else ():
        if entry.name.isdigit():
            try:
                with open(os.path.join(entry.path, "stat")) as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])  # "pid (name) state ppid ..."
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(0), []):
            found.append(child)
            todo.append(child)
    return found


INTERRUPT_EXIT = 130
"""The exit code of a command stopped by SIGINT (128 + 2), as shells report it."""
CTRL_C = CtrlC()


class StopOnCtrlC(tune.Callback):
    """Tells ``CTRL_C`` that a Tuner runs (it holds no state, so Ray can pickle it into the experiment)."""

    def setup(self, **info):
        CTRL_C.tune_started()

    def on_experiment_end(self, trials, **info):
        CTRL_C.tune_stop = None


class PrunedAwareOptunaSearch(OptunaSearch):
    """OptunaSearch that tells Optuna an ASHA-stopped trial is PRUNED.

    Ray's OptunaSearch reports any trial that ended without error as COMPLETE with its last,
    partial-budget value, so TPE would treat a 2-epoch score as a final result. A trial that
    stopped before ``max_epochs`` is pruned: Optuna keeps its intermediate values and ranks it
    below completed trials, so TPE learns from final results. A multi-objective study gets PRUNED the same
    way (it has no intermediate values, and Optuna keeps a pruned trial out of its Pareto front).

    ``constraints``: the config's (``objectives.Condition``), set on the Optuna trial before it is told from
    the trial's last result, like the objectives' values (``Trial.set_constraint``: TPE and NSGA-II prefer
    the trials that meet them).
    """

    def __init__(self, *args, max_epochs: int, constraints: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.max_epochs = max_epochs
        self.constraints = tuple(constraints)

    def on_trial_complete(self, trial_id: str, result: Optional[dict] = None, error: bool = False):
        if result and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            for condition in self.constraints:
                self._ot_trials[trial_id].set_constraint(str(condition), condition.excess(result.get(condition.metric)))
        stopped_early = bool(result) and not error and result.get("training_iteration", 0) < self.max_epochs
        if stopped_early and trial_id in self._ot_trials and trial_id not in self._completed_trials:
            self._ot_study.tell(self._ot_trials[trial_id], state=optuna.trial.TrialState.PRUNED)
            self._completed_trials.add(trial_id)
            return
        super().on_trial_complete(trial_id, result=result, error=error)

    def restore(self, checkpoint_path: str):
        """``Tuner.restore``: continue the stored study itself, read again from its database (search/studies.py)."""
        super().restore(checkpoint_path)
        if self._storage is None:   # a search started before studies were stored keeps its in-memory copy
            return
        self._ot_study, self._ot_trials, finished, orphans = studies.reconnect(
            self._ot_study, self._ot_trials, self._ot_study.sampler)
        self._completed_trials |= finished
        log(f"Optuna study {self._ot_study.study_name} continued from its storage"
            + (f"; {orphans} trials the stopped driver had started after Ray's last save marked FAIL" if orphans
               else ""))


@dataclass
class MlflowTrials(tune.Callback):
    """Writes each trial into its one MLflow child run, from the driver, and prints progress."""

    tracker: Tracker
    parent_id: str
    spec: TrialSpec
    tags: dict
    searched: list
    max_epochs: int
    run_ids: dict = field(default_factory=dict)
    nodes: dict = field(default_factory=dict)
    logged: dict = field(default_factory=dict)
    """Per trial: the last epoch already in MLflow when this driver first saw it."""
    devices: float = 1.0
    """Devices each trial holds (``devices_per_trial``): its seconds times these are its device-seconds."""

    def run_id(self, trial) -> str:
        if trial.trial_id not in self.run_ids:
            params = {**self.spec.fixed, **trial.config, "method": self.spec.method, "dataset": self.spec.dataset,
                      "arch": self.spec.arch, "norm": self.spec.norm, "eps": self.spec.eps}
            run_id = self.tracker.trial_run(
                self.parent_id, trial.trial_id, name=f"{self.spec.method}-{trial.trial_id}",
                tags={**self.tags, tag.SEARCHED: ",".join(self.searched)}, params=params)
            self.run_ids[trial.trial_id] = run_id
            # After a restore, a trial goes on from the checkpoint Ray saved, which may be older than
            # the last epoch MLflow got: those epochs are trained again (same seed, same numbers).
            self.logged[trial.trial_id] = self.tracker.last_step(run_id, METRIC)
        return self.run_ids[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_id(trial)
        shown = ", ".join(f"{k}={_short(trial.config.get(k))}" for k in self.searched)
        log(f"{self.spec.method}: trial {trial.trial_id} started ({shown})")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        epoch = int(result.get("epoch", result.get("training_iteration", 0)))
        run_id = self.run_id(trial)
        if epoch <= self.logged.get(trial.trial_id, 0):
            log(f"{self.spec.method}: trial {trial.trial_id} epoch {epoch} trained again after a restore "
                f"(already logged)")
            return
        self.tracker.log_epoch(run_id, result, step=epoch)
        if "node_id" in result and trial.trial_id not in self.nodes:
            # Which Ray node trained it: on a cluster, the trials of one search spread over nodes.
            self.nodes[trial.trial_id] = result["node_id"]
            self.tracker.set_tags(self.run_id(trial), {tag.NODE_ID: result["node_id"]})
        log(f"{self.spec.method}: trial {trial.trial_id} epoch {epoch}/{self.max_epochs} "
            f"val clean {result['val/clean_acc']:.1%} pgd {result['val/pgd_acc']:.1%} "
            f"({result['time/epoch_s']:.1f}s)")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        epochs = int(result.get("training_iteration", 0))
        outcome = "completed" if epochs >= self.max_epochs else "pruned"
        run_id = self.run_id(trial)
        # val/best_* came with every epoch's result, logged at that epoch: logged again here they
        # would land at step 0 and start every best-so-far chart with the final value.
        self.tracker.log_metrics(run_id, {"train/epochs": epochs} | trial_cost(result, self.devices))
        # Where its validation curve ended: robust overfitting's numbers, one per trial.
        self.tracker.log_metrics(run_id, evaluation.curve_end(result))
        checkpoint = getattr(trial, "checkpoint", None)
        # Where its weights live, so that `otarena evaluate RUN_ID` works on any finished trial.
        where = {tag.CHECKPOINT: checkpoint.path} if checkpoint else {}
        self.tracker.set_tags(run_id, {tag.OUTCOME: outcome} | where)
        self.tracker.finish(run_id)
        log(f"{self.spec.method}: trial {trial.trial_id} {outcome} after {epochs} epochs "
            f"(best val pgd {result.get('val/best_pgd_acc', float('nan')):.1%})")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_id(trial)
        reason = last_line(getattr(trial, "error_msg", None) or _error_text(trial))
        self.tracker.set_tags(run_id, {tag.OUTCOME: "failed", tag.FAILURE: reason or "unknown error"})
        self.tracker.log_metrics(run_id, {"train/epochs": (trial.last_result or {}).get("training_iteration", 0)})
        self.tracker.finish(run_id, "FAILED")
        log(f"{self.spec.method}: trial {trial.trial_id} FAILED: {reason}")


def devices_per_trial(cfg: SearchConfig) -> float:
    """What one trial holds, counted as devices: its GPUs, else its CPUs."""
    return cfg.resources.gpu or cfg.resources.cpu


def trial_cost(result: dict, devices: float) -> dict[str, float]:
    """A finished trial's training cost (docs/mlflow-schema.md): device-seconds per epoch, total training
    device-hours and measured images per second, from the training loop's clock (``search.trainable.training_cost``)."""
    epochs, seconds = int(result.get("training_iteration", 0)), result.get("cost/training_s")
    if not epochs or not seconds:
        return {}
    return {"cost/epoch_device_s": seconds * devices / epochs, "cost/train_device_hours": seconds * devices / 3600,
            "cost/images_per_s": result["cost/images_per_s"]}


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None)
    try:
        with open(path) as f:
            return f.read()
    except (OSError, TypeError):
        return ""


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


@dataclass
class MethodSearch:
    """The outcome of one method's search."""

    method: str
    spec: TrialSpec
    parent_id: str
    results: list
    run_ids: dict
    tracking_outage_s: float = 0.0
    """Seconds MLflow was unreachable for the search's own tracker (a search task's, in a concurrent campaign)."""


def init_ray(address: Optional[str] = None) -> None:
    if ray.is_initialized():
        return
    # The legacy progress engine with verbose=0 prints nothing: our callback prints one line per event.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # "local" starts a fresh in-process cluster even if a stale one left its address behind.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=True)


def _max_concurrent(cfg: SearchConfig) -> int:
    if cfg.budget.max_concurrent:
        return cfg.budget.max_concurrent
    # The whole cluster, not what is free now: final evaluations may hold a slot for a while.
    total = ray.cluster_resources()
    slots = total.get("CPU", 1) // cfg.resources.cpu
    if cfg.resources.gpu > 0:
        slots = min(slots, total.get("GPU", 0) // cfg.resources.gpu)
    if slots < 1:
        # An autoscaling cluster that has scaled to zero: queue the whole budget, and the autoscaler
        # adds the nodes the pending trials ask for.
        return cfg.budget.trials
    return int(slots)


def search_tags(cfg: SearchConfig, method: str) -> dict[str, str]:
    """The tags of a method's search parent run, which its trials carry too (docs/mlflow-schema.md): what
    places it on the leaderboard, the method's paper (RobustBench's name, authors, venue and link) and,
    for a certified method whose config asks for it, ranking by certified accuracy."""
    cls = methods.get(method)
    tags = {tag.METHOD: method, tag.DATASET: cfg.dataset, tag.ARCH: cfg.arch,
            tag.NORM: cfg.threat_model.norm, tag.EPS: repr(cfg.threat_model.eps),
            tag.PAPER: cls.paper.citation, tag.PAPER_LINK: cls.paper.link, tag.PAPER_TITLE: cls.paper.title,
            tag.PAPER_AUTHORS: cls.paper.authors, tag.PAPER_VENUE: cls.paper.venue}
    if cfg.final_eval.rank_certified and cls.certified:
        tags[tag.RANK_BY] = "certified_acc"
    if list(cfg.objectives) != list(DEFAULT_OBJECTIVES):
        tags[tag.OBJECTIVES] = ",".join(cfg.objectives)
    return tags


def search_method(cfg: SearchConfig, method: str, tracker: Tracker, train_ref, val_ref,
                  resume: bool = False, budget_params: Optional[dict] = None,
                  trial_fn: Optional[Callable] = None) -> MethodSearch:
    """One method's search (``trial_fn``: what each trial runs, ``train_trial`` unless a benchmark swaps it)."""
    space = cfg.spaces()[method]
    searched = sorted(spaces.searched(space))
    spec = TrialSpec(method, cfg.dataset, cfg.arch, cfg.threat_model.norm, cfg.threat_model.eps,
                     fixed=spaces.fixed(space), cpus=cfg.resources.cpu)
    tags = search_tags(cfg, method)
    trainable = tune.with_resources(
        tune.with_parameters(trial_fn or train_trial, spec=spec, train_data=train_ref, val_data=val_ref),
        {"cpu": cfg.resources.cpu, "gpu": cfg.resources.gpu})
    # Tune registers a trainable by name in a registry shared by the whole Ray job: two searches running at
    # once under one name would start each other's trials. The name stays the same on --resume.
    trainable.__name__ = trainable_name(cfg, method)
    previous = tracker.open_search(tags) if resume else None
    path = previous.data.tags.get(tag.RAY_PATH) if previous else None
    if path and tune.Tuner.can_restore(path) and previous.data.tags.get(tag.EVALUATED) == "false":
        parent_id = previous.info.run_id
        log(f"{method}: the search of MLflow parent run {parent_id} had ended; its final evaluation is left")
        tracker.reopen(previous, "FINISHED")
        results = list(tune.Tuner.restore(path, trainable).get_results())
        return MethodSearch(method, spec, parent_id, results, _run_ids(tracker, parent_id))
    if path and tune.Tuner.can_restore(path):
        parent_id = previous.info.run_id
        log(f"{method}: resuming the search of MLflow parent run {parent_id} from {path}")
        tracker.reopen(previous, "RUNNING")
        # The searcher (Optuna's history), the trials and their checkpoints come back. Tune restores the scheduler as
        # the Tuner built it: Ray's ASHA starts its rungs afresh, MO-ASHA reads its records back (search/moasha.py).
        tuner = tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=False)
    else:
        if resume:
            log(f"{method}: nothing to resume; starting its search")
        parent_id, tuner = _new_search(cfg, method, tracker, tags, space, searched, spec, trainable,
                                       budget_params or {})

    start = time.time()
    grid = tuner.fit()
    wall = time.time() - start
    if CTRL_C.requested:
        # Tune saved the experiment with the running trials unfinished; nothing of it is evaluated.
        tracker.interrupt_search(parent_id)
        log(f"{method}: search stopped after {wall:.0f}s; MLflow parent run {parent_id} KILLED "
            f"({tag.INTERRUPTED}=true)")
        raise Interrupted()
    results = [r for r in grid]
    lost = tracker.retire_lost_trials(parent_id, _trial_ids(results))
    stale = tracker.close_stale_trials(parent_id)
    if lost or stale:
        log(f"{method}: of the runs an earlier driver left, {lost} belonged to trials Ray had not saved "
            f"(now otarena.role=lost) and {stale} were still RUNNING (now KILLED)")
    trial_epochs = sum(int((r.metrics or {}).get("training_iteration", 0)) for r in results)
    devices = devices_per_trial(cfg)
    trial_seconds = sum(float((r.metrics or {}).get("time_total_s", 0.0)) for r in results)
    fidelities = rung_fidelity(cfg, results)
    tracker.log_metrics(parent_id, {"search/n_trials": len(results), "search/trial_epochs": trial_epochs,
                                    "search/device_hours": trial_seconds * devices / 3600, "search/wall_s": wall}
                        | {f.metric: f.rho for f in fidelities if f.rho is not None})
    tracker.set_tags(parent_id, {f"{tag.FIDELITY_REASON}{f.epoch}": f.reason for f in fidelities if f.rho is None})
    # Which knobs matter for the selection metric, from every completed trial (a resumed search's too).
    knobs = importance.of_search(results, space, max_epochs=cfg.budget.max_epochs, objective=cfg.objectives[0])
    knobs.record(tracker, parent_id)
    run_ids = _run_ids(tracker, parent_id)
    record_selection(cfg, method, tracker, parent_id, results, run_ids)
    # The parent run lasts as long as its search; the final evaluation writes into its trials' runs later.
    tracker.end_search(parent_id)
    log(f"{method}: search done in {wall:.0f}s: {len(results)} trials, {trial_epochs} trial-epochs")
    for f in fidelities:
        log(f"{method}: {f.line()}")
    log(f"{method}: {knobs.line()}")
    return MethodSearch(method, spec, parent_id, results, run_ids)


def record_selection(cfg: SearchConfig, method: str, tracker: Tracker, parent_id: str, results: list,
                     run_ids: dict) -> None:
    """What the search found, on validation (docs/mlflow-schema.md): with several objectives (or ``top_k:
    pareto``), the Pareto set of its completed trials (``otarena.pareto`` on their runs, ``search/pareto.json``
    and ``search/pareto_size`` on the parent); for every search, the rule choosing the evaluated trials
    (``otarena.selection_rule`` on the parent and on them)."""
    if len(cfg.objectives) > 1 or cfg.final_eval.top_k == "pareto":
        front = pareto_set(cfg, results)
        points = [{"trial_id": r.metrics["trial_id"], "run_id": run_ids.get(r.metrics["trial_id"]),
                   **{o: r.metrics.get(best_key(o)) for o in cfg.objectives}} for r in front]
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "pareto.json")
            with open(path, "w") as f:
                json.dump(points, f, indent=1)
            tracker.log_artifact(parent_id, path, "search")
        tracker.log_metrics(parent_id, {"search/pareto_size": len(points)})
        for point in points:
            if point["run_id"]:
                tracker.set_tags(point["run_id"], {tag.PARETO: "true"})
        values = [", ".join(f"{o.removeprefix('val/')} {math.nan if p[o] is None else p[o]:.1%}"
                            for o in cfg.objectives) for p in points]
        shown = "; ".join(f"{p['trial_id']} ({v})" for p, v in zip(points, values))
        log(f"{method}: Pareto set of {len(points)} completed trials on {', '.join(cfg.objectives)}: "
            f"{shown or 'empty (no trial completed)'}")
    chosen, rule = choose(results, cfg)
    if rule.endswith("the closest to it"):
        log(f"{method}: no trial met the selection rule ({cfg.selection().describe()}): evaluating the closest")
    tracker.set_tags(parent_id, {tag.SELECTION_RULE: rule})
    for rank, r in enumerate(chosen, 1):
        if run_ids.get(r.metrics["trial_id"]):
            tracker.set_tags(run_ids[r.metrics["trial_id"]], {tag.SELECTION_RULE: rule, tag.SELECTION_RANK: str(rank)})


def trainable_name(cfg: SearchConfig, method: str) -> str:
    """The name Tune registers a search's trainable under: one per config and method, and no ``_`` (Ray names a
    trial's folder ``<trainable>_<trial_id>_...``, which ``_trial_ids`` splits)."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in f"train-{cfg.name}-{method}")


def trial_budgets(cfg: SearchConfig, train_ref) -> dict[str, dict]:
    """Per method of ``cfg``: the params that state its trial budget on its parent run, empty when every method
    gets ``budget.trials``; with ``budget.compare: equal_device_hours``, the trials of search/budget.py's rule,
    from each method's cost per epoch, timed one method after another (not side by side: they would share cores)
    in a Ray task with a trial's resources."""
    if cfg.budget.compare != "equal_device_hours":
        return {method: {} for method in cfg.methods}
    devices, costs = devices_per_trial(cfg), {}
    task = ray.remote(budget.epoch_seconds).options(num_cpus=cfg.resources.cpu, num_gpus=cfg.resources.gpu)
    for method in cfg.methods:
        CTRL_C.check()
        space = cfg.spaces()[method]
        costs[method] = devices * ray.get(task.remote(
            method, spaces.fixed(space) | spaces.defaults(space), dataset=cfg.dataset, arch=cfg.arch,
            threat=methods.ThreatModel(cfg.threat_model.norm, cfg.threat_model.eps), train_data=train_ref,
            cpus=cfg.resources.cpu))
    trials = budget.equal_device_hours(costs, cfg.budget.trials)
    cheapest = min(costs, key=costs.get)
    for method in cfg.methods:
        log(f"{cfg.name}: {method}: {costs[method]:.3g} device-s per epoch at its defaults: {trials[method]} trials "
            f"(equal device-hours: {cfg.budget.trials} trials of {cheapest})"
            + ("; one trial costs more than its share" if trials[method] * costs[method] >
               1.5 * cfg.budget.trials * costs[cheapest] else ""))
    return {method: {"budget.compare": "equal_device_hours", "budget.rule": budget.RULE,
                     "budget.trials_asked": cfg.budget.trials, "budget.trials": trials[method],
                     "budget.epoch_device_s": costs[method], "budget.reference_method": cheapest,
                     "budget.reference_epoch_device_s": costs[cheapest]} for method in cfg.methods}


def with_trials(cfg: SearchConfig, budget_params: dict) -> SearchConfig:
    """``cfg`` with the trial budget ``budget_params`` gives a method (:func:`trial_budgets`), else as it is."""
    if "budget.trials" not in budget_params:
        return cfg
    return cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"trials": budget_params["budget.trials"]})})


def rung_fidelity(cfg: SearchConfig, results: list) -> list[fidelity.RungFidelity]:
    """Rank fidelity at each ASHA rung (search/fidelity.py; FIFO: the rungs ASHA would have had).

    Each trial's per-epoch validation PGD accuracy comes from its metrics dataframe in Ray's results,
    which Ray reads back from the trial's folder, so a resumed search has every epoch, those of the
    earlier driver included. An epoch trained again after a restore appears twice, with the same value.
    """
    curves, finals = {}, {}
    for r in results:
        frame = r.metrics_dataframe
        if r.error is not None or frame is None or METRIC not in frame or not r.metrics:
            continue
        trial = r.metrics.get("trial_id", r.path)
        # ASHA's rungs count training_iteration (one per epoch, continued across a restore).
        curves[trial] = dict(zip(frame["training_iteration"].astype(int), frame[METRIC].astype(float)))
        if int(r.metrics.get("training_iteration", 0)) >= cfg.budget.max_epochs:
            finals[trial] = float(r.metrics["val/best_pgd_acc"])
    return fidelity.rank_fidelity(curves, finals, fidelity.rungs(
        cfg.budget.grace_epochs, cfg.budget.reduction_factor, cfg.budget.max_epochs))


def _run_ids(tracker: Tracker, parent_id: str) -> dict:
    """Trial id to MLflow run id, by the otarena.trial_id tag, not the callback's memory: after a
    restore the callback is a copy."""
    return {r.data.tags[tag.TRIAL_ID]: r.info.run_id for r in tracker.trial_runs(parent_id)
            if tag.TRIAL_ID in r.data.tags}


def _new_search(cfg: SearchConfig, method: str, tracker: Tracker, tags: dict, space: dict, searched: list,
                spec: TrialSpec, trainable, budget_params: dict) -> tuple[str, tune.Tuner]:
    """A fresh search: its MLflow parent run and its Tuner (TPE + ASHA, or FIFO when budget.scheduler says so)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{cfg.name}-{method}-{stamp}"
    storage = _storage(cfg.storage_path)
    # The method's Optuna study: one per search, named like its Ray experiment, in a storage it outlives.
    optuna_storage = studies.for_config(cfg)
    parent_id = tracker.start_search(f"{method}-search-{stamp}", tags | {
        tag.RAY_PATH: _join(storage, name), tag.OPTUNA_STUDY: name, tag.OPTUNA_STORAGE: optuna_storage.public}, {
        **{f"config.{k}": v for k, v in flatten(cfg.model_dump(exclude={"methods", "space"})).items()},
        **search_algorithm(cfg),
        "search.space": {k: space[k].describe() for k in searched}} | budget_params)
    log(f"{method}: searching {cfg.budget.trials} trials x up to {cfg.budget.max_epochs} epochs over "
        f"{', '.join(searched) or 'nothing (fixed config)'}; MLflow parent run {parent_id}")
    log(f"{method}: Optuna study {name} in {optuna_storage.public} ({optuna_storage.why})"
        + ("; set optuna_storage to keep it in a shared database (docs/cluster.md)" if optuna_storage.fallback else ""))
    several = len(cfg.objectives) > 1
    sampler = spaces.sampler(space, seed=cfg.seed, method=method, trials=cfg.budget.trials, kind=cfg.budget.sampler)
    # Ray's OptunaSearch makes a multi-objective study from a list of metrics and modes.
    searcher = PrunedAwareOptunaSearch(space=spaces.DefineByRun(space), metric=list(cfg.objectives) if several
                                       else cfg.objectives[0], mode=[MODE] * len(cfg.objectives) if several else MODE,
                                       sampler=sampler, constraints=[Condition.parse(c) for c in cfg.constraints],
                                       points_to_evaluate=[spaces.defaults(space)] if searched else None,
                                       max_epochs=cfg.budget.max_epochs,
                                       storage=studies.open_storage(optuna_storage.url), study_name=name)
    studies.describe(searcher._ot_study, parent_id, cfg.name, cfg.tracking_uri, searcher.metric)
    if cfg.budget.scheduler == "fifo":
        scheduler = FIFOScheduler()
    elif several:   # Ray's ASHA ranks by one metric: MO-ASHA ranks by Pareto fronts (search/moasha.py)
        scheduler = MOASHAScheduler(metrics=cfg.objectives, max_t=cfg.budget.max_epochs,
                                    grace_period=cfg.budget.grace_epochs, reduction_factor=cfg.budget.reduction_factor)
    else:
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=cfg.objectives[0], mode=MODE,
                                  max_t=cfg.budget.max_epochs, grace_period=cfg.budget.grace_epochs,
                                  reduction_factor=cfg.budget.reduction_factor)
    callback = MlflowTrials(tracker, parent_id, spec, tags, searched, cfg.budget.max_epochs,
                            devices=devices_per_trial(cfg))
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=slots.limiter(searcher, _max_concurrent(cfg), cfg.budget.trials),
                                    scheduler=scheduler, num_samples=cfg.budget.trials,
                                    # One actor per slot for the whole search: no process start per trial.
                                    reuse_actors=True),
        run_config=tune.RunConfig(
            name=name, storage_path=storage, verbose=0,
            callbacks=[callback, StopOnCtrlC()], checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            failure_config=tune.FailureConfig(max_failures=cfg.budget.max_failures)))
    return parent_id, tuner


def _trial_ids(results: list) -> set[str]:
    """Ray's trial ids of a search's results; a trial that failed before reporting has them only in its folder name."""
    ids = {str(r.metrics["trial_id"]) for r in results if (r.metrics or {}).get("trial_id")}
    folders = [os.path.basename(str(r.path)) for r in results if not (r.metrics or {}).get("trial_id") and r.path]
    # Ray names a trial's folder <trainable>_<trial_id>_<index>_<params>.
    return ids | {part for folder in folders for part in folder.split("_") if len(part) >= 8}


def _join(storage: str, name: str) -> str:
    return f"{storage.rstrip('/')}/{name}" if "://" in storage else os.path.join(storage, name)


def _storage(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def search_algorithm(cfg: SearchConfig) -> dict[str, str]:
    """The parent run's params naming how it searched: sampler, scheduler, objectives."""
    several = len(cfg.objectives) > 1
    algorithm = "optuna-nsga2" if cfg.budget.sampler == "nsga2" else "optuna-tpe-mo" if several else "optuna-tpe"
    scheduler = "mo-asha" if several and cfg.budget.scheduler == "asha" else cfg.budget.scheduler
    return {"search.algorithm": algorithm, "search.scheduler": scheduler, "search.metric": cfg.objectives[0],
            "search.objectives": ",".join(cfg.objectives)}


def _scored(results: list) -> list:
    """The trials that can be evaluated: no error, a checkpoint and metrics."""
    return [r for r in results if r.error is None and r.checkpoint is not None and r.metrics]


def pareto_set(cfg: SearchConfig, results: list) -> list:
    """The completed (not pruned) trials no other completed trial dominates on the objectives' best-epoch validation
    values; with ``constraints``, among the trials that meet them when any does."""
    done = [r for r in _scored(results) if int(r.metrics.get("training_iteration", 0)) >= cfg.budget.max_epochs]
    constrained = Selection.parse(None, cfg.objectives, cfg.constraints)
    pool = [r for r in done if constrained.missed_by(r.metrics) == 0] or done
    front = pareto_front([[r.metrics.get(best_key(o), math.nan) for o in cfg.objectives] for r in pool])
    return [pool[i] for i in front]


def choose(results: list, cfg: Optional[SearchConfig] = None, k=None) -> tuple[list, str]:
    """The trials to evaluate on the test split, best first by the config's rule (``final_eval.select``; default:
    the first objective, ties by the others), and the rule in words: ``k`` of them (``final_eval.top_k``), or the
    whole Pareto set. A rule no trial meets picks the trials closest to meeting it, and says so."""
    rule = cfg.selection() if cfg is not None else Selection.parse(None, DEFAULT_OBJECTIVES)
    k = cfg.final_eval.top_k if k is None and cfg is not None else (k or 1)
    pool = pareto_set(cfg, results) if k == "pareto" else _scored(results)
    order, met = rule.order([r.metrics for r in pool])
    chosen = [pool[i] for i in order] if k == "pareto" else [pool[i] for i in order[:k]]
    text = rule.describe(met or not pool)
    if k == "pareto":
        text = f"the Pareto set of {', '.join(cfg.objectives)}; first: {text}"
    return chosen, text


def top_k(results: list, k, cfg: Optional[SearchConfig] = None) -> list:
    """The k best trials on *validation* by the config's rule (without a config: validation PGD accuracy, ties by
    validation clean accuracy), or the Pareto set for ``k = "pareto"``."""
    return choose(results, cfg, k)[0]


def _aa_state_path(cfg: SearchConfig, name: str) -> Optional[str]:
    """Where a final evaluation checkpoints AutoAttack per batch (local storage only)."""
    if "://" in cfg.storage_path:
        return None
    return os.path.join(_storage(cfg.storage_path), cfg.name, "evaluation", f"{name}-autoattack.pt")


def _best_weights(checkpoint) -> Optional[dict]:
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        return load_state(folder)["best_model"]


def evaluate_checkpoint(checkpoint, spec: TrialSpec, test_data, eval_cfg: dict, seed: int,
                        state_path: Optional[str] = None, surrogate=None, *shards: dict) -> tuple[dict, dict]:
    """Score a trial's best-epoch weights on the test split (runs as a Ray task); ``surrogate``: the
    checkpoint of the campaign's ERM trial, the transfer check's surrogate; ``shards``: the results of
    :func:`evaluate_checkpoint_shard` for every shard, merged here (the stages that need the whole set run here)."""
    set_threads(spec.cpus)
    weights = _best_weights(checkpoint)
    result = evaluation.evaluate_weights(weights, method=spec.method, arch=spec.arch, norm=spec.norm, eps=spec.eps,
                                         test_data=test_data, eval_cfg=eval_cfg, seed=seed, state_path=state_path,
                                         surrogate_weights=_best_weights(surrogate), shards=shards)
    return result, weights


def evaluate_checkpoint_shard(checkpoint, spec: TrialSpec, test_data, eval_cfg: dict, seed: int, shard: int,
                              state_path: Optional[str] = None) -> dict:
    """One shard (from 0) of :func:`evaluate_checkpoint`'s evaluation, of ``final_eval.shards`` (a Ray task):
    the per-point attacks on its slice of the test points, with its own AutoAttack state file."""
    set_threads(spec.cpus)
    return evaluation.evaluate_weights(_best_weights(checkpoint), method=spec.method, arch=spec.arch, norm=spec.norm,
                                       eps=spec.eps, test_data=test_data, eval_cfg=eval_cfg, seed=seed,
                                       state_path=state_path, shard=shard)


def _evaluation_options(cfg: SearchConfig) -> dict:
    """The resources of one evaluation task: the trial's CPUs, and a whole GPU where there are GPUs."""
    return {"num_cpus": cfg.resources.cpu, "num_gpus": 1 if cfg.resources.gpu > 0 else 0}


def _evaluation_task(cfg: SearchConfig, checkpoint, spec: TrialSpec, test_ref, name: str, surrogate=None):
    """Start one trial's test-split evaluation: one Ray task, or with ``final_eval.shards`` > 1 one task per
    shard and the merging task, which Ray starts once every shard is done (each with the resources of one
    evaluation: a GPU each where there are GPUs). Returns the ref of ``(result, weights)`` and the shards' refs."""
    options = _evaluation_options(cfg)
    eval_cfg, state_path = cfg.final_eval.model_dump(), _aa_state_path(cfg, name)
    shard_task = ray.remote(evaluate_checkpoint_shard).options(**options)
    shards = [shard_task.remote(checkpoint, spec, test_ref, eval_cfg, cfg.seed, shard, state_path)
              for shard in range(cfg.final_eval.shards)] if cfg.final_eval.shards > 1 else []
    return ray.remote(evaluate_checkpoint).options(**options).remote(
        checkpoint, spec, test_ref, eval_cfg, cfg.seed, state_path, surrogate, *shards), shards


def retrain_and_evaluate(spec: TrialSpec, hparams: dict, seed: int, train_data, val_data, test_data,
                         eval_cfg: dict, state_path: Optional[str] = None, surrogate=None) -> tuple[dict, dict, dict]:
    """Multi-seed confirmation: train the selected configuration again with another seed (a Ray task).

    The best epoch is chosen on validation, as in the search; only then is the test split read.
    """
    set_threads(spec.cpus)
    run = methods.build_run(spec.method, {**hparams, "seed": seed}, dataset=spec.dataset, arch=spec.arch,
                            threat=methods.ThreatModel(spec.norm, spec.eps), train=train_data, val=val_data)
    last = {}   # the last epoch's metrics: where its validation curve ended
    methods.fit(run, lambda metrics, run: last.update(metrics))
    result = evaluation.evaluate_weights(run.best_model, method=spec.method, arch=spec.arch, norm=spec.norm,
                                         eps=spec.eps, test_data=test_data, eval_cfg=eval_cfg, seed=seed,
                                         state_path=state_path, surrogate_weights=_best_weights(surrogate))
    return result, run.best_model, {"val/best_pgd_acc": run.best["val/pgd_acc"],
                                    "val/best_clean_acc": run.best["val/clean_acc"],
                                    "val/best_epoch": run.best["epoch"], "train/epochs": run.cfg.epochs,
                                    **evaluation.curve_end(last)}


@dataclass
class PendingEvaluation:
    """The Ray tasks evaluating one method's selected trials, and its extra seeds."""

    chosen: list
    evaluations: list
    seeds: list = field(default_factory=list)
    """(seed, ref) pairs retraining the first chosen trial's configuration."""
    default: Optional[tuple] = None
    """(result, ref): the paper-default trial and its evaluation's task; no task when it is among ``chosen``."""
    shards: list = field(default_factory=list)
    """The shard tasks of sharded evaluations (``final_eval.shards``), which the evaluations' tasks merge."""

    def tasks(self) -> list:
        """Every Ray task it holds: the seed replicas, the evaluations, the paper default's evaluation, the shards
        (so that a Ctrl-C cancels them too)."""
        default = [self.default[1]] if self.default and self.default[1] is not None else []
        return [ref for _, ref in self.seeds] + self.evaluations + default + self.shards


def submit_final_evaluation(cfg: SearchConfig, outcome: MethodSearch, data_refs: tuple,
                            surrogate=None) -> PendingEvaluation:
    """Start the test-split evaluation of the top-k trials (and their seed replicas) as Ray tasks.

    They run while other methods are searched, filling the cores that ASHA's tail leaves idle.
    ``surrogate``: the checkpoint of the campaign's best ERM trial, when ERM's search ended before this
    method's: the transfer check crafts its examples on it (else on a quick ERM model of its own). With
    ``final_eval.shards`` each trial's evaluation is split over that many tasks (:func:`_evaluation_task`); a
    seed replica trains and evaluates in one task, unsharded.
    """
    train_ref, val_ref, test_ref = data_refs
    spec, eval_cfg = outcome.spec, cfg.final_eval.model_dump()
    options = _evaluation_options(cfg)
    chosen = top_k(outcome.results, cfg.final_eval.top_k, cfg)
    attacks = f"PGD-{cfg.final_eval.pgd_steps}" + (f", AutoAttack {cfg.final_eval.autoattack}"
                                                   if cfg.final_eval.autoattack else "") + \
        (f", in {cfg.final_eval.shards} shards" if cfg.final_eval.shards > 1 else "")
    pending = PendingEvaluation(chosen, [])
    for r in chosen:
        trial_id = r.metrics["trial_id"]
        log(f"{outcome.method}: evaluating trial {trial_id} on the test split ({attacks})")
        task, shards = _evaluation_task(cfg, r.checkpoint, spec, test_ref, f"{outcome.method}-{trial_id}", surrogate)
        pending.evaluations.append(task)
        pending.shards += shards
    default = default_trial(cfg, outcome)
    if default is not None:
        trial_id = default.metrics["trial_id"]
        evaluated = trial_id in {r.metrics["trial_id"] for r in chosen}
        if not evaluated:
            log(f"{outcome.method}: evaluating trial {trial_id}, the paper defaults, on the test split too ({attacks})")
        task, shards = (None, []) if evaluated else _evaluation_task(
            cfg, default.checkpoint, spec, test_ref, f"{outcome.method}-{trial_id}", surrogate)
        pending.default, pending.shards = (default, task), pending.shards + shards
    if chosen and cfg.final_eval.seeds > 1:
        hparams = {**spec.fixed, **chosen[0].config}
        extra = [cfg.seed + i for i in range(1, cfg.final_eval.seeds)]
        log(f"{outcome.method}: retraining trial {chosen[0].metrics['trial_id']}'s configuration with seeds "
            f"{', '.join(map(str, extra))}")
        task = ray.remote(retrain_and_evaluate).options(**options)
        pending.seeds = [(seed, task.remote(spec, hparams, seed, train_ref, val_ref, test_ref, eval_cfg,
                                            _aa_state_path(cfg, f"{outcome.method}-{chosen[0].metrics['trial_id']}"
                                                                f"-seed{seed}"), surrogate))
                         for seed in extra]
    return pending


def record_final_evaluation(cfg: SearchConfig, outcome: MethodSearch, pending: PendingEvaluation,
                            tracker: Tracker) -> list[dict]:
    """Wait for the evaluations and write them into each trial's own MLflow run.

    The wait comes first and stops on Ctrl-C; the writes follow without a wait in between, so a
    method's final evaluation is recorded whole or not at all (``--resume`` then runs it).
    """
    CTRL_C.wait(pending.tasks())
    params = {f"eval.{k}": v for k, v in flatten(cfg.final_eval.model_dump()).items()} | {"eval.seed": cfg.seed}
    seed_results = []
    for seed, ref in pending.seeds:
        result, weights, val_metrics = ray.get(ref)
        trial_id = pending.chosen[0].metrics["trial_id"]
        run_id = tracker.seed_run(outcome.parent_id, outcome.run_ids[trial_id], seed,
                                  name=f"{outcome.method}-{trial_id}-seed{seed}",
                                  params={**outcome.spec.fixed, **pending.chosen[0].config, "seed": seed})
        tracker.log_metrics(run_id, val_metrics)
        evaluation.log_evaluation(tracker, run_id, result, params=params | {"eval.seed": seed}, weights=weights,
                                  context=_context(outcome, trial_id, seed))
        tracker.finish(run_id)
        _show(outcome.method, f"trial {trial_id} seed {seed}", result)
        seed_results.append(result)
    summaries = []
    for i, (r, ref) in enumerate(zip(pending.chosen, pending.evaluations)):
        trial_id = r.metrics["trial_id"]
        result, weights = ray.get(ref)
        run_id = outcome.run_ids[trial_id]
        replicas = [result] + (seed_results if i == 0 else [])
        extra_flags = evaluation.single_seed_reason(len(replicas)) | evaluation.overfitting_reasons(
            evaluation.curve_end(r.metrics), cfg.final_eval.thresholds)
        evaluation.log_evaluation(tracker, run_id, result, params=params, weights=weights,
                                  context=_context(outcome, trial_id, cfg.seed), extra_flags=extra_flags)
        summary = evaluation.seed_summary(replicas)
        tracker.log_metrics(run_id, summary)
        _show(outcome.method, f"trial {trial_id}", result, summary, extra_flags)
        summaries.append({"method": outcome.method, "trial_id": trial_id, "run_id": run_id, **result, **summary,
                          "flags": result["flags"] + list(extra_flags)})
    record_default(cfg, outcome, pending, tracker, params, summaries)
    tracker.set_tags(outcome.parent_id, {tag.EVALUATED: "true"})
    return summaries


def default_trial(cfg: SearchConfig, outcome: MethodSearch):
    """The search's trial of the method's paper defaults (its first, ``points_to_evaluate``), when it left a
    checkpoint; ``None`` when nothing is searched (every trial is then the default configuration)."""
    space = cfg.spaces()[outcome.method]
    defaults = spaces.defaults(space)
    if not defaults:
        return None

    def same(value, default) -> bool:
        if isinstance(default, float) and isinstance(value, (int, float)):
            return math.isclose(value, default, rel_tol=1e-9)
        return value == default

    for r in outcome.results:
        if r.error is None and r.checkpoint is not None and r.metrics and r.config and \
                all(same(r.config.get(k), v) for k, v in defaults.items()):
            return r
    return None


def record_default(cfg: SearchConfig, outcome: MethodSearch, pending: PendingEvaluation, tracker: Tracker,
                   params: dict, summaries: list[dict]) -> None:
    """What tuning bought: the paper-default trial's test evaluation, by the same protocol as the selected
    trials'. Unless it is one of them, it lands in an ``evaluation`` run under the default trial's run (never a
    leaderboard candidate: the default competes on validation like every trial). Every selected trial's run
    carries its numbers as ``default/*`` and points at that run (``otarena.default_run``), so the leaderboard
    reads the pair from one run (docs/mlflow-schema.md)."""
    if pending.default is None:
        return
    trial, ref = pending.default
    trial_id = trial.metrics["trial_id"]
    default_run = outcome.run_ids[trial_id]
    if ref is None:
        result, holder = next(s for s in summaries if s["trial_id"] == trial_id), default_run
    else:
        result, weights = ray.get(ref)
        holder = tracker.evaluation_run(f"{outcome.method}-{trial_id}-default", {
            **search_tags(cfg, outcome.method), "mlflow.parentRunId": default_run, tag.EVALUATES: default_run})
        evaluation.log_evaluation(tracker, holder, result, params=params, weights=weights,
                                  context=_context(outcome, trial_id, cfg.seed))
        tracker.finish(holder)
        _show(outcome.method, f"trial {trial_id} (paper defaults)", result)
    tracker.set_tags(default_run, {tag.DEFAULT: "true"})
    numbers = {f"default/{k}": result[k] for k in (*evaluation.ACCURACIES, "n_ex") if result.get(k) is not None}
    numbers["default/epochs"] = trial.metrics.get("training_iteration", 0)
    for summary in summaries:
        p_value = evaluation.tuning_p_value(result, summary)
        tracker.log_metrics(summary["run_id"], numbers | ({} if p_value is None else {"default/mcnemar_p": p_value}))
        tracker.set_tags(summary["run_id"], {tag.DEFAULT_RUN: holder})


def _context(outcome: MethodSearch, trial_id: str, seed: int) -> dict:
    spec = outcome.spec
    return {"title": f"{spec.method} ({spec.arch}) on {spec.dataset}, {spec.norm} eps={spec.eps:g}",
            "method": spec.method, "dataset": spec.dataset, "arch": spec.arch, "trial_id": trial_id, "seed": seed,
            "split": "test"}


def _show(method: str, what: str, result: dict, summary: Optional[dict] = None, extra: Optional[dict] = None) -> None:
    shown = "  ".join(f"{k.removesuffix('_acc')} {result[k]:.1%}" for k in evaluation.ACCURACIES if k in result)
    if summary and summary.get("test/n_seeds", 1) > 1:
        shown += f"  (AA over {summary['test/n_seeds']:.0f} seeds: {summary.get('test/aa_acc_mean', float('nan')):.1%}"\
                 f" +- {summary.get('test/aa_acc_std', float('nan')):.1%})"
    flags = result["flags"] + list(extra or {})
    log(f"{method}: {what} test {shown} on {result['n_ex']} images" + (f" [{', '.join(flags)}]" if flags else ""))


def _report_tracking(tracker: Tracker) -> None:
    """Say what a tracking outage cost: nothing, or exactly which writes are saved where."""
    undelivered = tracker.client.drain()
    if tracker.client.outage_s:
        log(f"MLflow was unreachable for {tracker.client.outage_s:.0f}s in all; up to {tracker.client.buffered} "
            f"writes were buffered and delivered when it came back")
    if undelivered:
        log(f"ERROR: {len(tracker.client.pending)} MLflow writes could not be delivered to "
            f"{tracker.tracking_uri}; they are saved in {undelivered}")


def run_search(configs: SearchConfig | list[SearchConfig], *, address: Optional[str] = None,
               out_dir: Optional[str] = "site", resume: bool = False, sequential: Optional[bool] = None,
               trial_fn: Optional[Callable] = None) -> list[dict]:
    """Search every method of each config, evaluate the best trials, and build the leaderboard.

    Several configs share one Ray session. Every method search of the campaign runs at once, each with a fair
    share of the trial slots (search/slots.py), unless ``sequential`` (default: the first config's
    ``orchestration``) asks for one after another; either way every final evaluation runs while the searches
    still going on, so that a campaign keeps all its cores busy. ``trial_fn``: what each trial runs
    (``search.trainable.train_trial`` unless a benchmark swaps in another).
    """
    from otarena import leaderboard

    configs = configs if isinstance(configs, list) else [configs]
    start = time.time()
    evaluations = []
    CTRL_C.install()
    try:
        if sequential is None:
            sequential = configs[0].orchestration == "sequential"
        summaries = _search_and_evaluate(configs, evaluations, address, resume, sequential, trial_fn)
        for tracker in dict.fromkeys(t for _, t, _, _ in evaluations):
            _report_tracking(tracker)
        names = list(dict.fromkeys(cfg.name for cfg in configs))
        log(f"all searches done in {time.time() - start:.0f}s; MLflow experiments {', '.join(names)}")
        if CTRL_C.requested:
            # Every search and evaluation is recorded: nothing to resume, and no site either.
            raise Interrupted(resumable=False)
        if out_dir:
            for uri in dict.fromkeys(cfg.tracking_uri for cfg in configs):
                tables = leaderboard.build(uri, out_dir, experiments=[c.name for c in configs
                                                                      if c.tracking_uri == uri])
                print(leaderboard.format_text(tables), flush=True)
            log(f"leaderboard written to {out_dir}/ ({', '.join(f.file for f in leaderboard.FORMATS.values())})")
    finally:
        if not CTRL_C.requested:
            CTRL_C.uninstall()
        # After a Ctrl-C the handler stays for the rest of the process: a second one while Ray shuts
        # down still exits at once, without a traceback.
    return summaries


def _search_and_evaluate(configs: list[SearchConfig], evaluations: list, address: Optional[str],
                         resume: bool, sequential: bool = False, trial_fn: Optional[Callable] = None) -> list[dict]:
    """Every search of the campaign, then the recording of their final evaluations.

    On Ctrl-C: no further search starts, evaluations not yet recorded are cancelled, and every
    parent run without its final evaluation ends KILLED (``Tracker.interrupt_search``).
    """
    try:
        if sequential:
            _search_one_after_another(configs, evaluations, address, resume, trial_fn)
        else:
            _search_at_once(configs, evaluations, address, resume, trial_fn)
        log("waiting for the final evaluations")
        summaries = []
        for done, (cfg, tracker, outcome, pending) in enumerate(evaluations):
            summaries += record_final_evaluation(cfg, outcome, pending, tracker)
            outage_s = tracker.client.outage_s + outcome.tracking_outage_s
            if outage_s:
                tracker.set_tags(outcome.parent_id, {tag.TRACKING_OUTAGE_S: f"{outage_s:.0f}"})
            evaluations[done] = (cfg, tracker, outcome, None)
        return summaries
    except Interrupted:
        for _, tracker, outcome, pending in evaluations:
            if pending is not None:
                for ref in pending.tasks():
                    ray.cancel(ref, force=True)
                tracker.interrupt_search(outcome.parent_id)
        raise


def _load(cfg: SearchConfig, address: Optional[str]) -> tuple[Tracker, tuple]:
    """A config's tracker and its train, validation and test splits in Ray's object store."""
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    log(f"{cfg.name}: loading {cfg.dataset}")
    train = data_lib.load(cfg.dataset, "train", data_dir=cfg.data_dir, download=cfg.download)
    val = data_lib.load(cfg.dataset, "val", data_dir=cfg.data_dir, download=cfg.download)
    test = data_lib.load(cfg.dataset, "test", data_dir=cfg.data_dir, download=cfg.download)
    log(f"{cfg.dataset}: {len(train)} train / {len(val)} validation / {len(test)} test images")
    init_ray(address)
    return tracker, (ray.put(train), ray.put(val), ray.put(test))


def _search_one_after_another(configs: list[SearchConfig], evaluations: list, address: Optional[str], resume: bool,
                              trial_fn: Optional[Callable]) -> None:
    """``orchestration: sequential``: method k+1's search starts when method k's Tuner returns."""
    for cfg in configs:
        CTRL_C.check()
        tracker, data_refs = _load(cfg, address)
        surrogate = None   # the campaign's own ERM model, once ERM has been searched
        budgets = trial_budgets(cfg, data_refs[0])
        for i, method in enumerate(cfg.methods, 1):
            CTRL_C.check()
            log(f"{cfg.name}: method {i}/{len(cfg.methods)}: {method}")
            outcome = search_method(with_trials(cfg, budgets[method]), method, tracker, *data_refs[:2],
                                    resume=resume, budget_params=budgets[method], trial_fn=trial_fn)
            evaluations.append((cfg, tracker, outcome, submit_final_evaluation(cfg, outcome, data_refs, surrogate)))
            if method == "erm" and top_k(outcome.results, 1):
                surrogate = top_k(outcome.results, 1)[0].checkpoint


def _search_at_once(configs: list[SearchConfig], evaluations: list, address: Optional[str], resume: bool,
                    trial_fn: Optional[Callable]) -> None:
    """``orchestration: concurrent``: every method search of the campaign at once, each a Tuner in its own Ray task.

    The tasks hold no resources of their own (``num_cpus=0``), run on the driver's node as the Tuners did,
    and share the trial slots through a :class:`search.slots.Campaign` actor, which also relays their log
    lines here and carries a Ctrl-C to each of them. A search's final evaluation is submitted as soon as
    its task returns. ERM's best trial is the transfer check's surrogate for the evaluations submitted
    after ERM's search is done, and only those (docs/cluster.md).
    """
    prepared = []
    for cfg in configs:
        CTRL_C.check()
        tracker, data_refs = _load(cfg, address)
        prepared.append((cfg, tracker, data_refs, trial_budgets(cfg, data_refs[0])))
    for url in dict.fromkeys(studies.for_config(cfg).url for cfg in configs):
        # Optuna creates a new study database's tables on first use: here, once, not in several searches at once.
        studies.open_storage(url).engine.dispose()
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    campaign = slots.Campaign.options(scheduling_strategy=here).remote()
    task = ray.remote(search_task).options(num_cpus=0, max_retries=0, scheduling_strategy=here)
    searches, launches = {}, []
    for n, (cfg, tracker, data_refs, budgets) in enumerate(prepared):
        pool = f"cpu={cfg.resources.cpu},gpu={cfg.resources.gpu}"
        for method in cfg.methods:
            one, name = with_trials(cfg, budgets[method]), f"{n}:{method}"
            # Every search registered before any starts: the first Tuner up must not take every slot.
            ray.get(campaign.register.remote(pool, _max_concurrent(one), name, one.budget.trials))
            launches.append((n, one, method, pool, name))
    for n, one, method, pool, name in launches:
        cfg, tracker, data_refs, budgets = prepared[n]
        log(f"{cfg.name}: method {cfg.methods.index(method) + 1}/{len(cfg.methods)}: {method} "
            f"(searched alongside the others)")
        ref = task.remote(one, method, list(data_refs[:2]), resume, budgets[method], campaign, pool, name, trial_fn)
        searches[ref] = (n, cfg, tracker, data_refs)
    surrogates = {}   # per config: its ERM model, once ERM's search is done
    pending, stopping = list(searches), False
    try:
        while pending:
            _print_relayed(campaign)
            if CTRL_C.requested and not stopping:
                stopping = True
                campaign.stop.remote()
            done, pending = ray.wait(pending, num_returns=1, timeout=0)
            if not done:
                # Waiting in Python, not inside Ray's wait, where a signal is handled only as the call returns: two
                # quick Ctrl-Cs would be one, and the second must exit at once.
                time.sleep(0.1)
                continue
            _print_relayed(campaign)   # a search's last lines come before what the driver does with its outcome
            for ref in done:
                n, cfg, tracker, data_refs = searches[ref]
                try:
                    outcome = ray.get(ref)
                except ray.exceptions.RayTaskError as error:
                    if isinstance(error.cause, Interrupted):   # it saved its search and marked its runs
                        continue
                    raise
                if stopping:   # its search ended as the Ctrl-C came: its evaluation is for --resume
                    evaluations.append((cfg, tracker, outcome, PendingEvaluation([], [])))
                    continue
                evaluations.append((cfg, tracker, outcome,
                                    submit_final_evaluation(cfg, outcome, data_refs, surrogates.get(n))))
                if outcome.method == "erm" and top_k(outcome.results, 1):
                    surrogates[n] = top_k(outcome.results, 1)[0].checkpoint
    finally:
        _print_relayed(campaign)
    # Recorded in the campaign's order, whichever search ended first.
    evaluations.sort(key=lambda e: (configs.index(e[0]), e[0].methods.index(e[2].method)))
    CTRL_C.check()


def _print_relayed(campaign) -> None:
    for line in ray.get(campaign.lines.remote()):
        print(line, flush=True)


def search_task(cfg: SearchConfig, method: str, data: list, resume: bool, budget_params: dict, campaign,
                pool: str, name: str, trial_fn: Optional[Callable] = None) -> MethodSearch:
    """One method's search in a concurrent campaign, as a Ray task: ``search_method`` with its trial slots
    shared through ``campaign``, its log lines relayed to the driver, and the driver's Ctrl-C carried in.

    ``data``: the train and validation refs in a list, which Ray passes as they are (a ref given as an
    argument of its own would arrive as the data).
    """
    global RELAY
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"   # a Ctrl-C reaches this search through the campaign
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    previous_sigint = signal.signal(signal.SIGINT, signal.SIG_IGN)
    RELAY = campaign.say.remote
    connection = slots.connect(campaign, pool, name)
    CTRL_C.requested, CTRL_C.tune_stop = False, None
    finished = threading.Event()
    threading.Thread(target=_stop_on_request, args=(campaign, finished), daemon=True).start()
    tracker = Tracker(cfg.tracking_uri, cfg.name)
    tracker.client.say = log   # what it says of an MLflow outage reaches the driver's terminal too
    try:
        outcome = search_method(cfg, method, tracker, *data, resume=resume, budget_params=budget_params,
                                trial_fn=trial_fn)
        outcome.tracking_outage_s = tracker.client.outage_s
        return outcome
    finally:
        finished.set()
        _report_tracking(tracker)
        # Its slots go to the others; a call that returns after every line this task relayed is printed.
        connection.finished()
        slots.disconnect()
        RELAY = None
        signal.signal(signal.SIGINT, previous_sigint)


def _stop_on_request(campaign, finished: threading.Event) -> None:
    """In a search task: when the driver got a Ctrl-C, stop this task's Tuner as a Ctrl-C would (``CtrlC``).

    Tune's stop handler runs in the main thread, so it is reached by a SIGUSR1 to this process, and only once
    Tune has installed it (``CtrlC.tune_started`` stops a Tuner still being built)."""
    while not finished.wait(0.25):
        if ray.get(campaign.stopping.remote()):
            if slots.CONNECTION is not None:
                slots.CONNECTION.stopped = True
            CTRL_C.requested = True
            if CTRL_C.tune_stop is not None:
                os.kill(os.getpid(), signal.SIGUSR1)
            return
