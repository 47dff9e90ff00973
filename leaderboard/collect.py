# SPDX-License-Identifier: Apache-2.0
"""Read evaluated trial runs from an MLflow tracking store into typed :class:`~leaderboard.schema.Row`.

The key names follow ``docs/mlflow-schema.md``, the whole contract with ``search/``. Runs are
read with a few paginated ``MlflowClient.search_runs`` calls over all the selected experiments at
once (trial runs, search parent runs, and the user's filter if any), never one call per run.
The cyclic garbage collector is paused while they are read (see :func:`_gc_paused`).
"""

from __future__ import annotations

import gc
import json
import logging
import math
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Run, ViewType
from mlflow.exceptions import MlflowException

from otarena.leaderboard import reproductions
from otarena.leaderboard import tags as tag
from otarena.leaderboard.schema import (ACCURACIES, NO_AUTOATTACK, Campaign, EpsSweep, Fidelity, Importance, Row,
                                        TrialPoint)

TRIAL_FILTER = f"tags.`{tag.ROLE}` = 'trial'"
SEARCH_FILTER = f"tags.`{tag.ROLE}` = 'search'"
_log = logging.getLogger(__name__)
_PAGE = 50_000  # MLflow's largest page size: one round trip for any realistic campaign
NO_AUTOATTACK_REASON = ("AutoAttack was not run (final_eval.autoattack: null); ranked by PGD accuracy in a table "
                        "of its own: an upper bound on robust accuracy, which AutoAttack usually lowers")


def redact(uri: str) -> str:
    """Hide the credentials an ``http(s)://user:pass@host`` or database URI may carry."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def open_client(tracking_uri: str) -> MlflowClient:
    """Open an existing tracking store, read-only in intent.

    MLflow silently creates a new, empty store for a local path that does not exist, which would
    turn a typo into an empty leaderboard; so local stores must already exist.

    Raises:
        ValueError: The URI is empty or names a local store that does not exist.
        RuntimeError: The store exists but cannot be read.
    """
    if not tracking_uri:
        raise ValueError("no MLflow tracking URI given")
    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite":
        path = tracking_uri[len("sqlite:///"):].split("?")[0]
        if path not in ("", ":memory:") and not Path(path).is_file():
            raise ValueError(f"no MLflow store at {tracking_uri}: {path} does not exist")
    elif parsed.scheme in ("", "file"):
        path = parsed.path if parsed.scheme else tracking_uri
        if not Path(path).is_dir():
            raise ValueError(f"no MLflow store at {tracking_uri}: directory {path} does not exist")
    try:
        client = MlflowClient(tracking_uri)
        client.search_experiments(max_results=1)
    except Exception as e:  # any backend error: report it in one line
        raise RuntimeError(f"cannot read MLflow store {redact(tracking_uri)}: {_first_line(e)}") from e
    return client


def experiment_ids(client: MlflowClient, experiments: Iterable[str] | None = None) -> list[str]:
    """Resolve experiment names (or ids) to ids; ``None`` means every active experiment.

    Raises:
        ValueError: A named experiment does not exist.
    """
    if experiments is None:
        ids, token = [], None
        while True:
            page = client.search_experiments(max_results=_PAGE, page_token=token)
            ids += [e.experiment_id for e in page]
            token = page.token
            if not token:
                return ids
    if isinstance(experiments, str):  # a bare name would otherwise be split into characters
        experiments = [experiments]
    ids = []
    for name in experiments:
        exp = client.get_experiment_by_name(name)
        if exp is None and name.isdigit():
            try:
                exp = client.get_experiment(name)
            except Exception:
                exp = None
        if exp is None:
            raise ValueError(f"no MLflow experiment named {name!r}")
        ids.append(exp.experiment_id)
    return ids


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector, then restore it as it was.

    ``search_runs`` on a SQL store builds a few dozen SQLAlchemy objects per run (its tags, params
    and metrics). Each batch of new objects triggers a collection that walks every object still
    alive, so reading 10,000 runs spent ~3/4 of its time in the collector (15 s instead of 4 s,
    ``benchmarks/leaderboard_build.py``). The reads create next to no garbage cycles to miss.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def search(client: MlflowClient, exp_ids: Sequence[str], filter_string: str = "") -> list[Run]:
    """All active runs of the experiments that match ``filter_string``, following pagination."""
    runs, token = [], None
    with _gc_paused():
        while True:
            page = client.search_runs(list(exp_ids), filter_string, ViewType.ACTIVE_ONLY, _PAGE, page_token=token)
            runs += page
            token = page.token
            if not token:
                return runs


def is_candidate(run: Run) -> bool:
    """The leaderboard's entry rule: a finished, evaluated, not failed trial with a test robust accuracy.

    AutoAttack's, else PGD's: a search run with ``final_eval.autoattack: null`` is ranked by PGD in
    tables of its own (:attr:`leaderboard.schema.Row.ranking`), never dropped.
    """
    tags = run.data.tags
    return (
        tags.get(tag.ROLE) == "trial"
        and tags.get(tag.EVALUATED, "").lower() == "true"
        and tags.get(tag.OUTCOME) != "failed"
        and run.info.status == "FINISHED"
        and (_metric(run, "test/aa_acc") is not None or _metric(run, "test/pgd_acc") is not None)
    )


def collect(tracking_uri: str, experiments: Iterable[str] | None = None, filter_string: str = "") -> list[Row]:
    """Read every leaderboard candidate from a tracking store.

    Args:
        tracking_uri: The MLflow store, e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``.
        experiments: Experiment names (or ids) to read; ``None`` reads all of them.
        filter_string: An optional MLflow search filter, ANDed with the trial-role filter,
            e.g. ``"tags.`otarena.method` = 'trades'"``.

    Returns:
        One :class:`Row` per candidate trial, with its search cost filled in; selection and
        ranking are :func:`leaderboard.schema.tabulate`'s job.

    Raises:
        ValueError: Bad URI, unknown experiment or invalid filter string.
        RuntimeError: The store cannot be read.
    """
    return list(collect_campaign(tracking_uri, experiments, filter_string).rows)


def collect_campaign(tracking_uri: str, experiments: Iterable[str] | None = None,
                     filter_string: str = "") -> Campaign:
    """Like :func:`collect`, plus every trial the filter keeps (evaluated or not) for the plots."""
    client = open_client(tracking_uri)
    ids = experiment_ids(client, experiments)
    if not ids:
        return Campaign((), ())
    names = {i: client.get_experiment(i).name for i in ids}
    # All trials, unfiltered: the search-cost fallback counts a candidate's siblings, whatever
    # the user's filter keeps.
    trials = search(client, ids, TRIAL_FILTER)
    parents = {r.info.run_id: r for r in search(client, ids, SEARCH_FILTER)}
    if filter_string.strip():
        try:
            kept = {r.info.run_id for r in search(client, ids, f"{TRIAL_FILTER} and {filter_string}")}
        except MlflowException as e:  # MLflow rejects a malformed filter this way
            raise ValueError(f"invalid filter_string {filter_string!r}: {_first_line(e)}") from e
    else:
        kept = None
    siblings: dict[str, list[Run]] = defaultdict(list)
    for run in trials:
        siblings[run.data.tags.get("mlflow.parentRunId", "")].append(run)
    chosen = [r for r in trials if kept is None or r.info.run_id in kept]
    candidates = [r for r in chosen if is_candidate(r)]
    rows = [row for row in (_to_row(r, parents, siblings, names) for r in candidates) if row is not None]
    if len(rows) < len(candidates):
        _log.warning("skipped %d evaluated trial runs without otarena.dataset/.norm/.eps/.method tags",
                     len(candidates) - len(rows))
    points = tuple(p for p in (_to_point(r) for r in chosen) if p is not None)
    return Campaign(tuple(rows), points, reproductions.collect(client, search(client, ids, reproductions.FILTER)),
                    fidelity=_fidelity(parents.values()), importance=_importance(parents.values()))


def _place(tags: dict) -> tuple[str, str, float, str] | None:
    """(dataset, norm, eps, method) of a trial run; ``None`` without the tags that place it in a table."""
    try:
        return tags[tag.DATASET], tags[tag.NORM], float(tags[tag.EPS]), tags[tag.METHOD]
    except (KeyError, ValueError):
        return None


def _searched(run: Run) -> tuple[tuple[str, str], ...]:
    names = [n.strip() for n in run.data.tags.get(tag.SEARCHED, "").split(",") if n.strip()]
    return tuple((n, run.data.params[n]) for n in names if n in run.data.params)


def _to_point(run: Run) -> TrialPoint | None:
    tags = run.data.tags
    place = _place(tags)
    if place is None:
        return None
    dataset, norm, eps, method = place
    evaluated = tags.get(tag.EVALUATED, "").lower() == "true"
    return TrialPoint(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id, parent_id=tags.get("mlflow.parentRunId", ""),
        dataset=dataset, norm=norm, eps=eps, method=method, arch=tags.get(tag.ARCH, ""),
        outcome=tags.get(tag.OUTCOME, ""), val_pgd_acc=_metric(run, "val/best_pgd_acc"),
        epochs=_metric(run, "train/epochs"), end_time=run.info.end_time, hparams=_searched(run),
        clean_acc=_metric(run, "test/clean_acc") if evaluated else None,
        aa_acc=_metric(run, "test/aa_acc") if evaluated else None,
        val_clean_acc=_metric(run, "val/best_clean_acc"), pareto=tags.get(tag.PARETO, "").lower() == "true")


FIDELITY_METRIC = "fidelity/rung_"
"""A search parent's ``fidelity/rung_<epoch>`` metric; ``otarena.fidelity.rung_<epoch>`` says why one is missing."""


def _fidelity(parents: Iterable[Run]) -> tuple[Fidelity, ...]:
    """Each search's rank fidelity per rung: its numbers, and the reasons tagged where a rung has none."""
    found = []
    for run in parents:
        for prefix, values in ((FIDELITY_METRIC, run.data.metrics), (tag.FIDELITY_REASON, run.data.tags)):
            for key, value in values.items():
                epoch = key.removeprefix(prefix)
                if key.startswith(prefix) and epoch.isdigit():
                    rho = value if prefix == FIDELITY_METRIC else None
                    found.append(Fidelity(run.info.run_id, int(epoch), rho, "" if rho is not None else str(value)))
    return tuple(sorted(found, key=lambda f: (f.parent_id, f.epoch)))


IMPORTANCE_METRIC = "importance/"
"""A search parent's ``importance/<param>`` metrics; ``otarena.importance_reason`` says why there are none."""
IMPORTANCE_EVALUATOR = "search.importance_evaluator"


def _importance(parents: Iterable[Run]) -> tuple[Importance, ...]:
    """Each search's hyperparameter importances, largest first, or the reason it has none; nothing for a search
    logged before importances were."""
    found = []
    for run in parents:
        values = sorted(((k.removeprefix(IMPORTANCE_METRIC), v) for k, v in run.data.metrics.items()
                         if k.startswith(IMPORTANCE_METRIC) and math.isfinite(v)), key=lambda kv: (-kv[1], kv[0]))
        reason = run.data.tags.get(tag.IMPORTANCE_REASON, "")
        if values or reason:
            found.append(Importance(run.info.run_id, run.data.tags.get(tag.METHOD, ""), run.data.tags.get(tag.ARCH, ""),
                                    tuple(values), "" if values else reason,
                                    run.data.params.get(IMPORTANCE_EVALUATOR, "")))
    return tuple(sorted(found, key=lambda i: i.parent_id))


def _eps_sweep(run: Run) -> EpsSweep | None:
    """The ``otarena.eps_sweep`` tag; ``None`` when absent or not a well-formed curve."""
    text = run.data.tags.get(tag.EPS_SWEEP, "")
    try:
        raw = json.loads(text) if text else None
        sweep = EpsSweep(tuple(map(float, raw["eps"])), tuple(map(float, raw["pgd_acc"])),
                         tuple(map(float, raw["robust_acc"])), float(raw["chance_bound"]), int(raw.get("steps", 0)))
    except (ValueError, TypeError, KeyError, RecursionError):
        return None
    return sweep if len(sweep.eps) == len(sweep.pgd_acc) == len(sweep.robust_acc) else None


def _to_row(run: Run, parents: dict[str, Run], siblings: dict[str, list[Run]],
            names: dict[str, str] | None = None) -> Row | None:
    """Build a Row; ``None`` when the run lacks the tags that place it in a table."""
    tags = run.data.tags
    place = _place(tags)
    if place is None:
        return None
    dataset, norm, eps, method = place
    reasons = _flag_reasons(run)
    if _metric(run, "test/aa_acc") is None:  # derived here, so that stores written before the flag get it too
        reasons.setdefault(NO_AUTOATTACK, NO_AUTOATTACK_REASON)
    flags = [f.strip() for f in tags.get(tag.FLAGS, "").split(",") if f.strip()]
    flags += [f for f in reasons if f not in flags]  # a flag given a reason was raised, listed or not
    n_seeds = _metric(run, "test/n_seeds")
    n_seeds = max(1, round(n_seeds)) if n_seeds is not None and math.isfinite(n_seeds) else 1
    spread = {}
    if n_seeds >= 2:  # a mean over one seed would only repeat the trial's own number
        spread = {f"{m}_{s}": _metric(run, f"test/{m}_{s}") for m in ACCURACIES for s in ("mean", "std")}
    parent_id = tags.get("mlflow.parentRunId", "")
    # A run without a parent is its own whole search.
    family = siblings.get(parent_id, []) if parent_id else [run]
    trials, trial_epochs = _search_cost(parents.get(parent_id), family)
    return Row(
        run_id=run.info.run_id,
        experiment_id=run.info.experiment_id,
        dataset=dataset,
        norm=norm,
        eps=eps,
        method=method,
        arch=tags.get(tag.ARCH, ""),
        aa_acc=_metric(run, "test/aa_acc"),
        aa_acc_deterministic=_metric(run, "test/aa_acc_deterministic"),
        clean_acc=_metric(run, "test/clean_acc"),
        pgd_acc=_metric(run, "test/pgd_acc"),
        certified_acc=_metric(run, "test/certified_acc"),
        val_pgd_acc=_metric(run, "val/best_pgd_acc"),
        val_clean_acc=_metric(run, "val/best_clean_acc"),
        epochs=_metric(run, "train/epochs"),
        n_ex=_metric(run, "test/n_ex"),
        hparams=_searched(run),
        flags=tuple(flags),
        trials=trials,
        trial_epochs=trial_epochs,
        clean_ci=_ci(run, "clean_acc"),
        pgd_ci=_ci(run, "pgd_acc"),
        aa_ci=_ci(run, "aa_acc"),
        certified_ci=_ci(run, "certified_acc"),
        n_seeds=n_seeds,
        test_points=tags.get(tag.TEST_POINTS, ""),
        per_example_hash=tags.get(tag.PER_EXAMPLE_HASH, ""),
        flag_reasons=tuple((f, reasons[f]) for f in flags if f in reasons),
        device_hours=_metric(parents[parent_id], "search/device_hours") if parent_id in parents else None,
        epoch_device_s=_metric(run, "cost/epoch_device_s"),
        train_device_hours=_metric(run, "cost/train_device_hours"),
        images_per_s=_metric(run, "cost/images_per_s"),
        paper=tags.get(tag.PAPER) or None,
        paper_link=tags.get(tag.PAPER_LINK) or None,
        paper_title=tags.get(tag.PAPER_TITLE) or None,
        paper_authors=tags.get(tag.PAPER_AUTHORS) or None,
        paper_venue=tags.get(tag.PAPER_VENUE) or None,
        rank_by=tags.get(tag.RANK_BY, ""),
        eps_sweep=_eps_sweep(run),
        overfit_gap=_metric(run, "val/overfit_gap"),
        default_clean_acc=_metric(run, "default/clean_acc"),
        default_pgd_acc=_metric(run, "default/pgd_acc"),
        default_aa_acc=_metric(run, "default/aa_acc"),
        default_epochs=_metric(run, "default/epochs"),
        default_run_id=tags.get(tag.DEFAULT_RUN, ""),
        default_p=_metric(run, "default/mcnemar_p"),
        run_name=run.info.run_name or "",
        experiment_name=(names or {}).get(run.info.experiment_id, ""),
        selection_rule=tags.get(tag.SELECTION_RULE) or (parents[parent_id].data.tags.get(tag.SELECTION_RULE, "")
                                                        if parent_id in parents else ""),
        selection_rank=int(tags.get(tag.SELECTION_RANK, "1")),
        **spread,
    )


def _search_cost(parent: Run | None, siblings: list[Run]) -> tuple[float | None, float | None]:
    """(trials, trial-epochs) from the parent's search metrics, else counted over the siblings."""
    trials = _metric(parent, "search/n_trials") if parent else None
    trial_epochs = _metric(parent, "search/trial_epochs") if parent else None
    if trials is None and siblings:
        trials = float(len(siblings))
    if trial_epochs is None:
        epochs = [e for e in (_metric(r, "train/epochs") for r in siblings) if e is not None]
        trial_epochs = float(sum(epochs)) if epochs else None
    return trials, trial_epochs


def _ci(run: Run, metric: str) -> tuple[float, float] | None:
    """``(test/<metric>_ci_low, test/<metric>_ci_high)``; ``None`` unless both were logged."""
    low, high = _metric(run, f"test/{metric}_ci_low"), _metric(run, f"test/{metric}_ci_high")
    return None if low is None or high is None else (low, high)


def _flag_reasons(run: Run) -> dict[str, str]:
    """The ``otarena.flag_reasons`` tag as {flag: reason}; empty when absent or malformed.

    The reasons only explain flags, so a tag that is not a JSON object of names costs the row its
    reasons, never its place on the leaderboard (and never the whole build).
    """
    text = run.data.tags.get(tag.FLAG_REASONS, "").strip()
    if not text:
        return {}
    try:
        reasons = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        reasons = None
    if not isinstance(reasons, dict):
        _log.warning("run %s: otarena.flag_reasons is not a JSON object; showing its flags without reasons",
                     run.info.run_id)
        return {}
    return {k.strip(): v if isinstance(v, str) else json.dumps(v)
            for k, v in reasons.items() if k.strip() and v is not None}


def _metric(run: Run, key: str) -> float | None:
    """A run's latest value for ``key``; NaN counts as missing."""
    value = run.data.metrics.get(key)
    return None if value is None or math.isnan(value) else float(value)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
