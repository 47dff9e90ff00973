# SPDX-License-Identifier: Apache-2.0
"""MLflow writes of a search, following docs/mlflow-schema.md.

All writes happen in the driver process through one ``MlflowClient``, so a sqlite store has a
single writer. A trial's run is found by its ``otarena.trial_id`` tag, never by an in-memory map
alone: after ``Tuner.restore`` a resumed trial reopens its run instead of creating a duplicate
(Ray's MLflowLoggerCallback keeps the trial-to-run map in memory and creates a new one).
"""
from __future__ import annotations

import math
import os
import re
import time
import urllib.parse
import urllib.request
from typing import Any, Mapping, Optional

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

from otarena.leaderboard import tags as tag

EPOCH_METRICS = ("train/", "val/", "time/epoch_s")
"""Result keys logged per epoch (step = epoch); Ray's bookkeeping keys are left out."""
SERIES_PREFIX = "epoch/"
"""MLflow name prefix of the per-epoch curves (``epoch/val/pgd_acc``). MLflow's run page groups a run's
charts into sections named by the key up to its last ``/`` and sorts the sections by name: ``epoch/...``
sections come before the one-number ``test/...`` bar charts, so the training curves are seen first."""
SELECTION_METRICS = ("val/best_",)
"""Result keys that keep their own MLflow name: the selection score the leaderboard ranks trials by."""
EXPERIMENT_KIND, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"
"""MLflow 3's experiment kind tag and its value for model training (not GenAI development)."""
ARTIFACTS_FOLDER = "mlartifacts"
"""Beside a sqlite store, the folder that holds its experiments' artifacts."""
MAX_PARAM_LENGTH = 6000
_TRIAL_ONLY_TAGS = {tag.TRIAL_ID, tag.OUTCOME, tag.EVALUATED, tag.FLAGS, tag.FLAG_REASONS,
                    tag.CHECKPOINT, tag.FAILURE}


class TrackingError(RuntimeError):
    """The tracking store cannot be used."""


def check_reachable(tracking_uri: str) -> None:
    """Fail fast, with one line, when the store cannot be opened or reached."""
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        # sqlite:///rel.db is relative to the working directory, sqlite:////abs.db absolute.
        folder = os.path.dirname(os.path.abspath(tracking_uri[len("sqlite:///"):]))
        if not os.path.isdir(folder):
            raise TrackingError(f"tracking URI {tracking_uri!r}: folder {folder!r} does not exist")
        return
    if parsed.scheme in ("http", "https"):
        try:
            urllib.request.urlopen(f"{tracking_uri.rstrip('/')}/health", timeout=10).read()
        except OSError as err:
            raise TrackingError(f"MLflow server {tracking_uri} is unreachable ({err})") from None
        return
    if parsed.scheme in ("", "file"):
        raise TrackingError(f"tracking URI {tracking_uri!r}: MLflow 3 needs a database (sqlite:///mlflow.db) "
                            f"or a server (http://host:port), not a file store")


def series_key(key: str) -> str:
    """The MLflow name of per-epoch result key ``key``: ``train/loss`` is logged as ``epoch/train/loss``."""
    return key if key.startswith(SELECTION_METRICS) else f"{SERIES_PREFIX}{key}"


def _sqlite_path(tracking_uri: str) -> Optional[str]:
    """The database file of a ``sqlite:///`` URI (absolute), or ``None`` for other stores."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = urllib.parse.unquote(tracking_uri[len("sqlite:///"):].split("?")[0])
    return None if path in ("", ":memory:") else os.path.abspath(path)


def artifact_location(tracking_uri: str, experiment: str) -> Optional[str]:
    """Where a new experiment of a sqlite store keeps its artifacts: ``mlartifacts/<name>`` beside the
    database, so a copied store never writes into the original's folder and not into ``./mlruns`` of the
    working directory (MLflow's default). ``None`` for a server, which keeps artifacts itself."""
    database = _sqlite_path(tracking_uri)
    if database is None:
        return None
    folder = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-.") or "experiment"
    return os.path.join(os.path.dirname(database), ARTIFACTS_FOLDER, folder)


def _outside_store(location: str, tracking_uri: str) -> bool:
    """A local artifact location outside the folder of the sqlite store it belongs to (a copied store)."""
    parsed = urllib.parse.urlparse(location)
    if parsed.scheme not in ("", "file"):
        return False
    path = os.path.abspath(urllib.parse.unquote(parsed.path) if parsed.scheme else location)
    store_folder = os.path.dirname(_sqlite_path(tracking_uri))
    return os.path.commonpath([path, store_folder]) != store_folder


def _move_artifact_location(tracking_uri: str, experiment_id: str, location: str) -> None:
    """Point an experiment's new runs at ``location``. MLflow's API cannot change an experiment's
    artifact location, so the one column is updated in the sqlite file; earlier runs keep theirs."""
    import sqlite3
    from contextlib import closing

    with closing(sqlite3.connect(_sqlite_path(tracking_uri), timeout=30)) as db, db:
        db.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                   (location, int(experiment_id)))


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _params(values: Mapping[str, Any]) -> list[Param]:
    return [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in values.items()]


def _tags(values: Mapping[str, Any]) -> list[RunTag]:
    return [RunTag(k, str(v)) for k, v in values.items()]


OUTAGE_TIMEOUT_S = 900.0
"""How long a search waits for a tracking server that went away before it gives up on a write."""


_OUTAGE_STATUS = frozenset({502, 503, 504})
"""HTTP statuses of a server (or the proxy before it) that is down or restarting."""
_NETWORK_MARKERS = ("Connection refused", "ConnectionError", "Failed to establish", "Read timed out",
                    "RemoteDisconnected", "Connection aborted", "Connection reset")
# MLflow words a status as "failed with error code 503 != 200", and urllib3, once MLflow's own
# retries are spent, as "too many 503 error responses". Only these phrasings carry a status: a bare
# number in an error's text may be part of a run id or a path.
_STATUS_IN_TEXT = re.compile(r"(?:failed with error code|too many) (\d{3})\b")


def _http_status(err: BaseException) -> Optional[int]:
    """The HTTP status behind an MLflow or requests error, where it carries one."""
    response = getattr(err, "response", None)
    if isinstance(getattr(response, "status_code", None), int):
        return response.status_code
    found = _STATUS_IN_TEXT.search(str(err))
    if found:
        return int(found.group(1))
    if isinstance(err, MlflowException) and err.error_code != "INTERNAL_ERROR":
        # A JSON error body from the server names its error code; 500 is MLflow's default for errors
        # that came with no status at all, so it is not read as one.
        return err.get_http_status_code()
    return None


def _is_outage(err: BaseException) -> bool:
    """A server that cannot be reached (down, restarting, network), not a request it rejected."""
    if isinstance(err, (ConnectionError, TimeoutError)):
        return True
    status = _http_status(err)
    if status is not None:
        return status in _OUTAGE_STATUS
    text = f"{type(err).__name__}: {err}"
    return "Max retries exceeded" in text or any(marker in text for marker in _NETWORK_MARKERS)


class ResilientClient:
    """An MlflowClient that survives a tracking server going away and coming back.

    Writes (metrics, params, tags, run status, artifacts) made while the server is unreachable
    are kept in order, with artifacts copied aside, and delivered as soon as it answers again;
    calls that need an answer (creating or finding a run) wait for it, up to ``timeout_s``. What
    could not be delivered at the end is written to a JSON file and reported, never dropped silently.
    """

    WRITES = ("log_batch", "set_terminated", "update_run", "log_artifact")

    def __init__(self, tracking_uri: str, timeout_s: float = OUTAGE_TIMEOUT_S, say=None):
        if urllib.parse.urlparse(tracking_uri).scheme in ("http", "https"):
            # Fail fast inside MLflow (its default retries back off for minutes); we retry ourselves.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        self.tracking_uri, self.timeout_s = tracking_uri, timeout_s
        self.say = say or (lambda line: print(f"[otarena {time.strftime('%H:%M:%S')}] {line}", flush=True))
        self.client = MlflowClient(tracking_uri)
        self.pending: list[tuple[str, tuple, dict]] = []
        self.spool: Optional[str] = None
        self.outage_started: Optional[float] = None
        self.outage_s, self.buffered = 0.0, 0

    def __getattr__(self, name: str):
        method = getattr(self.client, name)
        if name in self.WRITES:
            return lambda *args, **kwargs: self._write(name, args, kwargs)
        return lambda *args, **kwargs: self._wait(method, args, kwargs)

    def _write(self, name: str, args: tuple, kwargs: dict) -> None:
        self.pending.append((name, args, kwargs))
        if not self.flush() and name == "log_artifact":
            # Still inside the caller, whose file may live in a temporary folder: keep a copy.
            self.pending[-1] = (name, (args[0], self._keep(args[1]), *args[2:]), kwargs)

    def _keep(self, path: str) -> str:
        """A copy of an artifact that outlives the caller's temporary folder."""
        import shutil
        import tempfile

        self.spool = self.spool or tempfile.mkdtemp(prefix="otarena-mlflow-spool-")
        target = os.path.join(self.spool, f"{len(self.pending)}-{os.path.basename(path)}")
        shutil.copy2(path, target)
        return target

    def flush(self) -> bool:
        """Deliver the buffered writes in order; False while the server is still unreachable."""
        while self.pending:
            name, args, kwargs = self.pending[0]
            try:
                getattr(self.client, name)(*args, **kwargs)
            except Exception as err:  # noqa: BLE001 - only an outage is retried; the rest propagates
                if not _is_outage(err):
                    self.pending.pop(0)
                    raise
                if self.outage_started is None:
                    self.outage_started = time.time()
                    self.say(f"MLflow at {self.tracking_uri} is unreachable; buffering writes until it is back "
                             f"({last_line(str(err), 160)})")
                self.buffered = max(self.buffered, len(self.pending))
                return False
            self.pending.pop(0)
        if self.outage_started is not None:
            self.outage_s += time.time() - self.outage_started
            self.say(f"MLflow is back after {time.time() - self.outage_started:.0f}s; buffered writes delivered")
            self.outage_started = None
        return True

    def _wait(self, method, args: tuple, kwargs: dict):
        deadline = time.time() + self.timeout_s
        while True:
            try:
                if self.flush():
                    return method(*args, **kwargs)
            except Exception as err:  # noqa: BLE001
                if not _is_outage(err) or time.time() > deadline:
                    raise
                if self.outage_started is None:
                    self.outage_started = time.time()
                    self.say(f"MLflow at {self.tracking_uri} is unreachable; waiting for it "
                             f"({last_line(str(err), 160)})")
            if time.time() > deadline:
                raise TrackingError(f"MLflow at {self.tracking_uri} unreachable for {self.timeout_s:.0f}s")
            time.sleep(2)

    def drain(self, timeout_s: Optional[float] = None, report_dir: str = ".") -> Optional[str]:
        """Wait for the buffered writes to go out; if they cannot, save them to a JSON file and return its path."""
        deadline = time.time() + (self.timeout_s if timeout_s is None else timeout_s)
        while not self.flush() and time.time() < deadline:
            time.sleep(2)
        if not self.pending:
            return None
        import json

        path = os.path.abspath(os.path.join(report_dir, f"mlflow-undelivered-{time.strftime('%Y%m%d-%H%M%S')}.json"))
        with open(path, "w") as f:
            json.dump([{"call": name, "args": [_plain(a) for a in args], "kwargs": {k: _plain(v) for k, v in
                                                                                 kwargs.items()}}
                       for name, args, kwargs in self.pending], f, indent=1)
        return path


def _plain(value: Any) -> Any:
    """JSON form of a buffered call's argument (MLflow entities become dicts)."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (Metric, Param, RunTag)):
        return {k.lstrip("_"): v for k, v in vars(value).items()}
    return value


class Tracker:
    """One search campaign's MLflow experiment: its parent runs and trial runs."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.client = ResilientClient(tracking_uri)
        self.tracking_uri = tracking_uri
        found = self.client.get_experiment_by_name(experiment)
        if found is not None and found.lifecycle_stage == "deleted":
            raise TrackingError(f"MLflow experiment {experiment!r} is deleted; restore it or pick another name")
        location = artifact_location(tracking_uri, experiment)
        if found is None:
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=location,
                                                               tags={EXPERIMENT_KIND: TRAINING_KIND})
            return
        self.experiment_id = found.experiment_id
        if EXPERIMENT_KIND not in found.tags:  # an experiment made before otarena set it, or by hand
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND, TRAINING_KIND)
        if location and _outside_store(found.artifact_location, tracking_uri):
            _move_artifact_location(tracking_uri, self.experiment_id, location)
            self.client.say(f"MLflow experiment {experiment!r}: artifacts of new runs go to {location}, "
                            f"not {found.artifact_location} (outside this store's folder)")

    def __getstate__(self):
        # Ray pickles the Tuner's callbacks into its experiment state; a client is reopened, not pickled.
        return {"tracking_uri": self.tracking_uri, "experiment_id": self.experiment_id}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.client = ResilientClient(self.tracking_uri)

    def open_search(self, tags: Mapping[str, str]) -> Optional[Any]:
        """The latest search parent run with these tags that ``--resume`` continues: one still RUNNING
        (its driver died), one a Ctrl-C stopped (``otarena.interrupted``), or one whose search ended
        before its final evaluation was recorded (``otarena.evaluated`` = ``false``)."""
        clauses = [f"tags.`{tag.ROLE}` = 'search'"]
        clauses += [f"tags.`{k}` = '{v}'" for k, v in tags.items() if k in tag.SEARCH_KEYS]
        found = self.client.search_runs([self.experiment_id], " and ".join(clauses), max_results=1000,
                                        order_by=["attributes.start_time DESC"])
        return next((run for run in found if run.info.status == "RUNNING"
                     or run.data.tags.get(tag.INTERRUPTED) == "true"
                     or run.data.tags.get(tag.EVALUATED) == "false"), None)

    def reopen(self, run, status: str) -> None:
        """Set a run that ``--resume`` continues back to ``status`` (its end time kept) and drop
        ``otarena.interrupted``."""
        self.client.update_run(run.info.run_id, status=status)
        if tag.INTERRUPTED in run.data.tags:
            self.client.delete_tag(run.info.run_id, tag.INTERRUPTED)

    def end_search(self, parent_id: str) -> None:
        """A search's parent run ends with its search; its final evaluation is still to come."""
        self.set_tags(parent_id, {tag.EVALUATED: "false"})
        self.finish(parent_id)

    def interrupt_search(self, parent_id: str) -> None:
        """A Ctrl-C stopped the campaign: the parent run and its still running trial runs end KILLED,
        tagged ``otarena.interrupted``. A parent whose search had ended keeps that end time."""
        for run in self.trial_runs(parent_id):
            if run.info.status == "RUNNING":
                self.set_tags(run.info.run_id, {tag.INTERRUPTED: "true"})
                self.finish(run.info.run_id, "KILLED")
        self.set_tags(parent_id, {tag.INTERRUPTED: "true"})
        if self.client.get_run(parent_id).info.status == "RUNNING":
            self.finish(parent_id, "KILLED")
        else:
            self.client.update_run(parent_id, status="KILLED")

    def retire_lost_trials(self, parent_id: str, known: set[str]) -> int:
        """Trial runs of trials that Ray's restored state does not know: a driver killed between a
        trial's start and Ray's next save of the experiment. The trial never ran on after that, and
        the search replaced it, so its run leaves the trials (``otarena.role=lost``) but keeps its data."""
        lost = [r for r in self.trial_runs(parent_id)
                if r.data.tags.get(tag.ROLE) == "trial" and r.data.tags.get(tag.TRIAL_ID) not in known]
        for run in lost:
            self.set_tags(run.info.run_id, {tag.ROLE: "lost", tag.OUTCOME: "failed",
                                            tag.FAILURE: "driver stopped before Ray saved this trial"})
            if run.info.status == "RUNNING":
                self.finish(run.info.run_id, "KILLED")
        return len(lost)

    def close_stale_trials(self, parent_id: str) -> int:
        """Trial runs a crash left RUNNING that no trial continued: KILLED, never RUNNING forever."""
        stale = [r for r in self.trial_runs(parent_id) if r.info.status == "RUNNING"]
        for run in stale:
            self.set_tags(run.info.run_id, {tag.OUTCOME: run.data.tags.get(tag.OUTCOME, "failed"),
                                            tag.FAILURE: run.data.tags.get(tag.FAILURE,
                                                                                 "driver stopped; not resumed")})
            self.finish(run.info.run_id, "KILLED")
        return len(stale)

    def start_search(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={tag.ROLE: "search", **tags})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def trial_run(self, parent_id: str, trial_id: str, *, name: str, tags: Mapping[str, str],
                  params: Mapping[str, Any]) -> str:
        """The one run of a trial: found by its ``otarena.trial_id`` tag, or created."""
        existing = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tag.TRIAL_ID}` = '{trial_id}' and tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'",
            max_results=1)
        if existing:
            self.reopen(existing[0], "RUNNING")
            return existing[0].info.run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, tag.ROLE: "trial", tag.TRIAL_ID: trial_id, **tags})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def seed_run(self, parent_id: str, replicates: str, seed: int, *, name: str, params: Mapping[str, Any]) -> str:
        """A run that retrains trial run ``replicates``' configuration with another seed.

        It is a sibling of the trial (``otarena.role=seed``), so the leaderboard never takes it
        for a trial of the search, and its ``otarena.seed_of`` tag points at the trial.
        """
        source = self.client.get_run(replicates).data.tags
        kept = {k: v for k, v in source.items() if k.startswith(tag.PREFIX) and k not in _TRIAL_ONLY_TAGS}
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            **kept, MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: name, tag.ROLE: "seed",
            tag.SEED_OF: replicates, tag.SEED: str(seed)})
        self.client.log_batch(run.info.run_id, params=_params(params))
        return run.info.run_id

    def evaluation_run(self, name: str, tags: Mapping[str, str]) -> str:
        """A run holding one ``otarena evaluate`` (``otarena.role=evaluation``)."""
        run = self.client.create_run(self.experiment_id, run_name=name,
                                     tags={**tags, MLFLOW_RUN_NAME: name, tag.ROLE: "evaluation"})
        return run.info.run_id

    def last_step(self, run_id: str, key: str) -> int:
        """The last step logged for result key ``key`` (0 for none): what a restored trial has already
        reported. A run logged before the curves moved under ``epoch/`` has them under ``key`` itself."""
        return max((m.step for name in {series_key(key), key} for m in self.client.get_metric_history(run_id, name)),
                   default=0)

    def log_epoch(self, run_id: str, result: Mapping[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        metrics = [Metric(series_key(k), float(v), now, step) for k, v in result.items()
                   if k.startswith(EPOCH_METRICS) and _finite_number(v)]
        self.client.log_batch(run_id, metrics=metrics)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                               if _finite_number(v)])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, tags=_tags(tags))

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        self.client.log_batch(run_id, params=_params(params))

    def log_artifact(self, run_id: str, path: str, artifact_path: Optional[str] = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)

    def trial_runs(self, parent_id: str) -> list:
        return self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}'", max_results=10_000)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def last_line(text: Optional[str], limit: int = 500) -> str:
    """The last line of an error message (a traceback's ``Error: reason``), for a tag."""
    lines = (text or "").strip().splitlines() or [""]
    return lines[-1][:limit]
