# SPDX-License-Identifier: Apache-2.0
"""Each table's tied groups, from the per-point outcomes its rows' evaluations stored.

An evaluation stores its per-point outcomes as the run artifact ``evaluation/per_example.npz`` and tags the
run with the points they are on (``otarena.test_points``) and their hash (``otarena.per_example_hash``;
docs/mlflow-schema.md). The tags come with the runs the build reads anyway; the artifacts are downloaded
only for the rows a table compares (two or more rows on the same points) and kept in a cache keyed by run
id and hash, so a rebuild downloads nothing new and a store of thousands of runs costs one small file per
compared row. The statistics are :mod:`leaderboard.stats`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlflow import MlflowClient

from otarena.leaderboard import reproductions, stats
from otarena.leaderboard.schema import Row, Table

ARTIFACT = "evaluation/per_example.npz"
"""Where an evaluation's per-point outcomes are (``search/evaluation.py`` writes it)."""
OUTCOME = {"aa_acc": "aa", "pgd_acc": "pgd", "certified_acc": "certified"}
"""The per-point array of each ranking metric: a table's rows are compared on what ranks them."""
RANDOMIZED = ("a randomized model, ranked by its expected AutoAttack accuracy over draws, has no per-point "
              "outcome: not compared")
UNREADABLE = "its per-point outcomes could not be read (see the build's log): not compared"
_log = logging.getLogger(__name__)


PACKED = "packed_bits"
"""The names of the arrays stored as bits (:func:`pack`): a boolean per point in an eighth of a byte."""


INDEX_STEPS = "index_steps"
"""The index list as its first value and steps (``np.diff``): the first ``n_ex`` points compress to nothing."""


def pack(points: dict) -> dict[str, np.ndarray]:
    """The arrays of ``evaluation/per_example.npz``: each boolean array packed to bits (``np.packbits``), named
    in ``packed_bits``, and the index list as steps (``index_steps``); 10,000 points take a few kB."""
    arrays = {name: np.asarray(value) for name, value in points.items()}
    packed = sorted(name for name, value in arrays.items() if value.dtype == bool)
    index = arrays.pop("index")
    return {INDEX_STEPS: np.diff(index, prepend=0).astype(index.dtype),
            **{name: np.packbits(value) if name in packed else value for name, value in arrays.items()},
            PACKED: np.array(packed, dtype=str)}


def unpack(arrays) -> dict[str, np.ndarray]:
    """:func:`pack`'s inverse, from the arrays of a loaded ``.npz``: the index list and booleans per point again."""
    index = np.cumsum(arrays[INDEX_STEPS]).astype(arrays[INDEX_STEPS].dtype) if INDEX_STEPS in arrays \
        else arrays["index"]
    packed = set(arrays[PACKED].tolist()) if PACKED in arrays else set()
    return {"index": index, **{name: np.unpackbits(arrays[name], count=len(index)).astype(bool) if name in packed
                               else arrays[name] for name in arrays if name not in (PACKED, INDEX_STEPS, "index")}}


def cache_dir() -> Path:
    """``$OTARENA_CACHE/per_example``, else ``$XDG_CACHE_HOME/otarena/per_example`` (``~/.cache`` by default)."""
    root = os.environ.get("OTARENA_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "otarena")
    return Path(root) / "per_example"


def _points(row: Row, ranking: str) -> str | None:
    """What the row's outcomes are on, ``None`` when it has none to compare."""
    if not row.test_points or (ranking == "aa_acc" and row.aa_acc_deterministic is not None):
        return None
    n_ex, _, index_hash = row.test_points.partition(":")
    return stats.points_key(int(float(n_ex)), index_hash) if n_ex.replace(".", "", 1).isdigit() else None


def read(client: MlflowClient, row: Row, key: str, cache: Path) -> dict[str, np.ndarray] | None:
    """A row's per-point arrays: from the cache, else downloaded into it; ``None`` when unreadable."""
    cached = cache / f"{row.run_id}-{row.per_example_hash or 'nohash'}.npz"
    if not cached.is_file() or not row.per_example_hash:
        try:
            cache.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=cache) as folder, reproductions.no_progress_bar():
                path = client.download_artifacts(row.run_id, ARTIFACT, folder)
                shutil.move(path, cached)  # whole or not at all: a build that stops leaves no half file
        except Exception as e:  # a missing or unreadable artifact costs the row its comparison, never the build
            _log.warning("run %s: cannot read its per-point outcomes (%s): not compared", row.run_id,
                         str(e).splitlines()[0] if str(e).strip() else type(e).__name__)
            return None
    with np.load(cached) as arrays:
        return unpack({name: arrays[name] for name in arrays.files}) if key in arrays.files else None


def standings(table: Table, client: MlflowClient, cache: Path) -> list[stats.Standing]:
    """The table's rows' :class:`~leaderboard.stats.Standing`, in rank order; reads only the outcomes it compares."""
    points = [_points(r, table.ranking) for r in table.rows]
    counts = Counter(p for p in points if p is not None)
    compared = max(counts.values(), default=0) >= 2
    outcomes: list[stats.Outcomes | None] = []
    reasons: dict[int, tuple[str, str]] = {}
    for i, (row, p) in enumerate(zip(table.rows, points)):
        if p is None:
            outcomes.append(None)
            if row.test_points:
                reasons[i] = (RANDOMIZED, "randomized model")
            continue
        arrays = read(client, row, OUTCOME[table.ranking], cache) if compared and counts[p] >= 2 else None
        if compared and counts[p] >= 2 and arrays is None:
            outcomes.append(None)
            reasons[i] = (UNREADABLE, "unreadable outcomes")
            continue
        outcomes.append(stats.Outcomes(p, arrays[OUTCOME[table.ranking]].tolist() if arrays is not None else ()))
    found = stats.tied_groups(outcomes)
    return [dataclasses.replace(s, reason=reasons[i][0], why=reasons[i][1]) if i in reasons else s
            for i, s in enumerate(found)]


def with_standings(tables: Sequence[Table], tracking_uri: str, cache: Path | None = None) -> list[Table]:
    """The tables with each row's :attr:`~leaderboard.schema.Row.standing` filled in."""
    if not any(r.test_points for t in tables for r in t.rows):
        return list(tables)  # an older store: nothing to read, nothing to compare
    client, cache = MlflowClient(tracking_uri), cache or cache_dir()
    # A table of one row has nothing to compare: it gets no standing (and no column).
    return [dataclasses.replace(t, rows=tuple(dataclasses.replace(r, standing=s)
                                              for r, s in zip(t.rows, standings(t, client, cache))))
            if len(t.rows) >= 2 else t for t in tables]
