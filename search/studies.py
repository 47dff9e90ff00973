# SPDX-License-Identifier: Apache-2.0
"""Persistent Optuna studies: where a search's studies live, how a resumed search finds its own, and
what ``otarena studies`` lists.

Each method's search keeps its Optuna study in an RDB storage rather than in the driver's memory, so
that the study outlives the search: ``optuna-dashboard <storage>`` opens it as it is, ``otarena studies``
lists it, and ``--resume`` continues the same study (docs/mlflow-schema.md: ``otarena.optuna_study`` and
``otarena.optuna_storage`` on the parent run name it).

Where (``storage_url``):

* ``optuna_storage`` in the config, a database URL, wins;
* else a sqlite MLflow store ``sqlite:///dir/mlflow.db`` gets ``sqlite:///dir/optuna.db`` beside it
  (two files: MLflow and Optuna each keep an ``alembic_version`` table, so they cannot share one database);
* a file store ``./mlruns`` gets ``./optuna.db`` beside its folder;
* a server (``http(s)://``) or any other store gets a sqlite file in the Ray storage folder (``~/.otarena``
  when that is remote, ``s3://``), said in the search's log: on a cluster, point ``optuna_storage`` at a
  file on the head's disk or at a database server (docs/cluster.md).

Paths are made absolute, so that a resumed search, or ``optuna-dashboard`` run from another folder,
opens the same file. The searcher writes to the study from the driver only, so one sqlite file per
campaign is safe; concurrent searches of one campaign share it through sqlite's lock (``ENGINE_KWARGS``).
"""
from __future__ import annotations

import os
import sqlite3
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Optional

FILE_NAME = "optuna.db"
"""The file name of a default storage, beside the MLflow store."""

PARENT_RUN = "mlflow_parent_run_id"
"""A study's user attribute: the MLflow parent run of the search that owns it (optuna-dashboard shows it too)."""
EXPERIMENT = "mlflow_experiment"
"""A study's user attribute: that run's MLflow experiment."""
TRACKING_URI = "mlflow_tracking_uri"
"""A study's user attribute: that run's MLflow store (with any password hidden)."""

SQLITE_TIMEOUT_S = 60
ENGINE_KWARGS = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
"""sqlite waits this long for a lock held by another search's driver instead of failing at once."""


class StudiesError(ValueError):
    """A storage that cannot be used: one line for the user (exit 2)."""


# ---------------------------------------------------------------------------------------------- where
def _sqlite_file(url: str) -> Optional[str]:
    """The absolute path of a sqlite URL's file (``sqlite:///rel.db`` is relative to the working folder);
    ``None`` for another database, an in-memory one, or text that is no database URL."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return None
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return os.path.abspath(parsed.database)


def absolute_sqlite(url: str) -> str:
    """``sqlite:///rel.db`` as ``sqlite:////abs/rel.db``, so that every process opens the same file; other URLs
    unchanged."""
    from sqlalchemy.engine import make_url

    path = _sqlite_file(url)
    return url if path is None else make_url(url).set(database=path).render_as_string(hide_password=False)


def _beside(path: str) -> str:
    return "sqlite:///" + os.path.join(os.path.dirname(os.path.abspath(path)), FILE_NAME)


@dataclass(frozen=True)
class Storage:
    """Where a config's studies live: ``url`` for Optuna, and ``why`` in words for the search's log."""

    url: str
    why: str
    fallback: bool = False
    """The store gave no place of its own (a server): a local file was chosen, which the log says loudly."""

    @property
    def public(self) -> str:
        """``url`` with any password hidden: what tags, logs and listings show."""
        return public(self.url)


def storage_url(tracking_uri: str, optuna_storage: Optional[str] = None,
                storage_path: str = "ray_results") -> Storage:
    """Where the Optuna studies of a search logged to ``tracking_uri`` live (module docstring)."""
    if optuna_storage:
        return Storage(absolute_sqlite(optuna_storage), "optuna_storage in the config")
    database = _sqlite_file(tracking_uri)
    if database is not None:
        return Storage(_beside(database), "beside the MLflow store")
    parsed = urllib.parse.urlparse(tracking_uri)
    if parsed.scheme in ("", "file"):
        folder = urllib.parse.unquote(parsed.path) if parsed.scheme == "file" else tracking_uri
        return Storage(_beside(folder.rstrip("/") or "/"), "beside the MLflow file store")
    # A remote Ray storage (s3://) has no local folder, and a Ray job's working folder is deleted with the job.
    local = storage_path if "://" not in storage_path else os.path.join(os.path.expanduser("~"), ".otarena")
    return Storage("sqlite:///" + os.path.join(os.path.abspath(local), FILE_NAME),
                   f"MLflow store {public(tracking_uri)} keeps no Optuna studies and the config sets no "
                   f"optuna_storage: a sqlite file on this machine", fallback=True)


def for_config(cfg) -> Storage:
    """The storage of a ``SearchConfig`` (search/config.py)."""
    return storage_url(cfg.tracking_uri, getattr(cfg, "optuna_storage", None), cfg.storage_path)


def public(url: str) -> str:
    """A database URL with its password hidden (``postgresql://user:***@host/db``)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def check_url(url: str, *, local: bool = True) -> Optional[str]:
    """Why ``url`` cannot hold Optuna studies (one line), or ``None``: a database URL of a known database and,
    when the search runs on this machine (``local``), with its driver installed and, for sqlite, an existing
    folder. Nothing is opened or created: the config is checked before any work."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = public(url)
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return (f"optuna_storage {url!r} is not a database URL (e.g. sqlite:///optuna.db or "
                f"postgresql://user@host/optuna)")
    try:
        dialect = parsed.get_dialect()
        if local:
            dialect.import_dbapi()
    except NoSuchModuleError:
        return f"optuna_storage {shown!r}: unknown database {parsed.drivername!r} (sqlite, postgresql, mysql, ...)"
    except ImportError as err:
        return f"optuna_storage {shown!r}: the driver for {parsed.drivername} is not installed ({err})"
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            return f"optuna_storage {shown!r}: an in-memory database would lose the studies; give a file"
        folder = os.path.dirname(os.path.abspath(parsed.database))
        if local and not os.path.isdir(folder):
            return f"optuna_storage {shown!r}: folder {folder!r} does not exist"
    return None


def open_storage(url: str):
    """The ``RDBStorage`` a search writes its study to (created on first use)."""
    import optuna

    path = _sqlite_file(url)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)   # the Ray storage folder of a fallback, before its first run
    return optuna.storages.RDBStorage(url, engine_kwargs=ENGINE_KWARGS if path is not None else None)


# ---------------------------------------------------------------------------------------------- a search's study
def describe(study, parent_id: str, experiment: str, tracking_uri: str, metric: str | list[str]) -> None:
    """Write what optuna-dashboard and ``otarena studies`` show of a new study: its objectives by name (the
    searcher's ``metric``, one or a list) and the MLflow parent run that owns it."""
    import warnings

    import optuna

    with warnings.catch_warnings():   # metric names are "experimental" since Optuna 3.2, and the dashboard reads them
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([metric] if isinstance(metric, str) else list(metric))
    study.set_user_attr(PARENT_RUN, parent_id)
    study.set_user_attr(EXPERIMENT, experiment)
    study.set_user_attr(TRACKING_URI, public(tracking_uri))


def reconnect(study, trials: dict, sampler) -> tuple[Any, dict, set, int]:
    """A restored searcher's study, read again from its storage.

    ``Tuner.restore`` unpickles the searcher as Ray saved it, study and storage cache included: the study
    reconnects to the same database (its URL is in the pickle), but its cache is as old as the save. Here the
    study is loaded afresh by name, and each Ray trial gets the Optuna trial of the same number in it, so that
    the states told after the restore land in the stored study, never in a copy and never in a second study.

    Returns the study, Ray's trial id to Optuna trial, the Ray trials already finished in the database (told
    between Ray's last save and the crash: not told again), and how many trials the database still had RUNNING
    that no saved Ray trial owns: the killed driver started them after Ray's last save, and Ray starts others in
    their place, so they are marked FAIL (their MLflow runs become ``otarena.role=lost``).
    """
    import optuna

    backend = getattr(study._storage, "_backend", study._storage)   # past Optuna's cache, to the RDB storage
    fresh = optuna.load_study(study_name=study.study_name, storage=backend, sampler=sampler)
    stored = {t.number: t for t in fresh.get_trials(deepcopy=False)}
    owned = {ray_id: t.number for ray_id, t in trials.items()}
    again, finished = {}, set()
    for ray_id, number in owned.items():
        frozen = stored.get(number)
        if frozen is None:
            continue
        again[ray_id] = optuna.trial.Trial(fresh, frozen._trial_id)
        if frozen.state.is_finished():
            finished.add(ray_id)
    orphans = [t for t in stored.values()
               if t.state == optuna.trial.TrialState.RUNNING and t.number not in owned.values()]
    for t in orphans:
        fresh.tell(t.number, state=optuna.trial.TrialState.FAIL)
    return fresh, again, finished, len(orphans)


# ---------------------------------------------------------------------------------------------- otarena studies
STATES = ("complete", "pruned", "fail", "running", "waiting")


@dataclass
class StudyRow:
    """One study as ``otarena studies`` lists it."""

    name: str
    objectives: list[str]
    directions: list[str]
    counts: dict[str, int] = field(default_factory=dict)
    best: list[Optional[float]] = field(default_factory=list)
    """Per objective, the best value over completed trials (``None`` without any)."""
    pareto_size: Optional[int] = None
    """Multi-objective studies: how many completed trials are on the Pareto front."""
    parent_run: Optional[str] = None
    experiment: Optional[str] = None

    def as_dict(self) -> dict:
        return {"study": self.name, "objectives": self.objectives, "directions": self.directions,
                "trials": self.counts, "best": self.best, "pareto_size": self.pareto_size,
                "parent_run": self.parent_run, "experiment": self.experiment}


def connect_existing(url: str):
    """Open a storage that already holds Optuna's tables, creating nothing: a missing sqlite file, or a
    database without Optuna's tables (an MLflow store given by mistake), is a ``StudiesError``."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    problem = check_url(url)
    if problem:
        raise StudiesError(problem.replace("optuna_storage", "storage", 1))
    shown = public(url)
    path = _sqlite_file(url)
    if path is not None:
        if not os.path.isfile(path):
            raise StudiesError(f"storage {shown}: no such file {path!r} (no search has stored a study there yet)")
        try:  # read-only: sqlite must not turn a stray file into a database
            with sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro", uri=True) as db:
                tables = {name for (name,) in db.execute("select name from sqlite_master where type = 'table'")}
        except sqlite3.DatabaseError as err:
            raise StudiesError(f"storage {shown}: not a sqlite database ({err})") from None
        if not {"studies", "trials"} <= tables:
            raise StudiesError(f"storage {shown}: holds no Optuna studies (no 'studies' table"
                               + ("; it is an MLflow store" if "experiments" in tables else "") + ")")
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=True,
                                          engine_kwargs=ENGINE_KWARGS if path is not None else None)
    except (SQLAlchemyError, ImportError, RuntimeError, ValueError) as err:
        raise StudiesError(f"storage {shown}: cannot be opened ({str(err).splitlines()[0]})") from None


def list_studies(url: str) -> list[StudyRow]:
    """Every study of the storage at ``url``, oldest first (``connect_existing`` for the errors)."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    storage = connect_existing(url)
    S = optuna.trial.TrialState
    rows = []
    try:
        for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
            study = optuna.load_study(study_name=summary.study_name, storage=storage)
            trials = study.get_trials(deepcopy=False)
            directions = [d.name.lower() for d in study.directions]
            names = study.metric_names or [f"objective {i}" for i in range(len(directions))]
            counts = {state: sum(1 for t in trials if t.state == getattr(S, state.upper())) for state in STATES}
            complete = [t for t in trials if t.state == S.COMPLETE and t.values]
            best = []
            for i, direction in enumerate(directions):
                values = [t.values[i] for t in complete]
                best.append((max if direction == "maximize" else min)(values) if values else None)
            pareto = len(study.best_trials) if len(directions) > 1 and complete else None
            rows.append(StudyRow(summary.study_name, list(names), directions, counts, best, pareto,
                                 study.user_attrs.get(PARENT_RUN), study.user_attrs.get(EXPERIMENT)))
    except SQLAlchemyError as err:
        raise StudiesError(f"storage {public(url)}: cannot be read ({str(err).splitlines()[0]})") from None
    return rows


def format_rows(rows: list[StudyRow]) -> list[str]:
    """The listing as aligned text lines (header first)."""
    table = [("study", "objectives", "complete", "pruned", "fail", "running", "best", "MLflow parent run")]
    for r in rows:
        objectives = ", ".join(f"{d[:3]} {n}" for n, d in zip(r.objectives, r.directions))
        best = ", ".join("-" if b is None else f"{b:.4g}" for b in r.best)
        if r.pareto_size is not None:
            best += f" (Pareto set: {r.pareto_size})"
        table.append((r.name, objectives, *(str(r.counts.get(s, 0)) for s in STATES[:4]), best,
                      r.parent_run or "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in table]
