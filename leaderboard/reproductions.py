# SPDX-License-Identifier: Apache-2.0
"""The site's section "Do the papers' numbers hold?": the claimed-against-measured tables of
``otarena reproduce``, read back from the MLflow runs that measured them.

Each reproduction run (tag ``otarena.reproduces``) carries its table as the artifact
``reproduction/<paper>-<table>-<budget>.json`` (the format of ``otarena reproduce``'s ``--out``
folder, ``"otarena_reproduction": 1``). Every model of a table carries the same file, so one
download per (claim set, budget) is enough: the newest run's. A table whose file is missing or not
a reproduction is left out with a warning, never guessed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from otarena.leaderboard import tags as tag

_log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARTIFACT_DIR = "reproduction"
FILTER = f"tags.`{tag.REPRODUCES}` LIKE '%'"

VERDICT_CSS = {"reproduced": "ok", "below claim": "below", "above claim": "above", "impossible": "impossible",
               "not comparable": "na"}
"""The verdict's style on the page; a verdict this module does not know is shown plain."""


def collect(client: MlflowClient, runs: Sequence) -> tuple[dict, ...]:
    """The newest table of each (claim set, budget) among ``runs`` (those :data:`FILTER` finds), in
    claim-set order."""
    newest: dict[tuple[str, str], object] = {}
    for run in sorted(runs, key=lambda r: r.info.start_time or 0, reverse=True):
        key = (run.data.tags[tag.REPRODUCES], run.data.tags.get(tag.REPRODUCTION_BUDGET, ""))
        newest.setdefault(key, run)
    tables = [t for t in (_table(client, run) for _, run in sorted(newest.items())) if t is not None]
    return tuple(tables)


def read_folder(folder: str | Path) -> tuple[dict, ...]:
    """The reproduction tables of an ``otarena reproduce --out`` folder (``reproductions/`` of the
    repository), in file-name order; ValueError (one line) for a folder that is missing or holds none."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"reproductions folder {str(folder)!r} does not exist")
    tables = []
    for file in sorted(path.glob("*.json")):
        try:
            table = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise ValueError(f"{file}: not readable as JSON ({err})") from None
        if isinstance(table, dict) and table.get("otarena_reproduction") == FORMAT_VERSION:
            tables.append(table)
    if not tables:
        raise ValueError(f"reproductions folder {str(folder)!r} holds no otarena reproduction table (*.json)")
    return tuple(tables)


def merge(from_store: Sequence[dict], from_files: Sequence[dict]) -> tuple[dict, ...]:
    """Both, the store's table first where both measured one (claim set, budget)."""
    seen = {(t["claim_set"], t["budget"]) for t in from_store}
    return tuple(from_store) + tuple(t for t in from_files if (t["claim_set"], t["budget"]) not in seen)


def _table(client: MlflowClient, run) -> dict | None:
    run_id = run.info.run_id
    try:
        files = [f.path for f in client.list_artifacts(run_id, ARTIFACT_DIR) if f.path.endswith(".json")]
        if not files:
            raise FileNotFoundError(f"no {ARTIFACT_DIR}/*.json artifact")
        with tempfile.TemporaryDirectory() as folder, no_progress_bar():
            table = json.loads(Path(client.download_artifacts(run_id, files[0], folder)).read_text())
    except (MlflowException, OSError, ValueError) as err:
        _log.warning("reproduction run %s: its table cannot be read (%s); left out", run_id, err)
        return None
    if not isinstance(table, dict) or table.get("otarena_reproduction") != FORMAT_VERSION:
        _log.warning("reproduction run %s: %s is not an otarena reproduction table; left out", run_id, files[0])
        return None
    return table


@contextmanager
def no_progress_bar() -> Iterator[None]:
    """A download of a few kB needs no progress bar on the builder's terminal."""
    before = os.environ.get(_PROGRESS_BAR)
    os.environ[_PROGRESS_BAR] = "false"
    try:
        yield
    finally:
        if before is None:
            del os.environ[_PROGRESS_BAR]
        else:
            os.environ[_PROGRESS_BAR] = before


_PROGRESS_BAR = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


def _percent(value) -> str:
    return "–" if value is None else f"{value:.2f}"


def view(tables: Sequence[dict]) -> list[dict]:
    """What the page shows of each table: its heading, budget, machine and rows as text."""
    out = []
    for k, t in enumerate(tables, 1):
        m = t.get("machine", {})
        machine = f"{m.get('processor') or 'CPU'} x {m.get('cpu_count', '?')}, torch {m.get('torch', '?')}" + (
            f", GPU {m['cuda']}" if m.get("cuda") else ", no GPU")
        rows = []
        for r in t["rows"]:
            ours = r.get("otarena") or {}
            claimed = f"{r['claimed']:+g} vs {r['relative_to']}" if r.get("relative_to") else f"{r['claimed']:g}"
            measured = "–" if r["measured"] is None else (
                f"{r['measured']:.2f} [{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}]")
            rows.append({
                "row": r["row"] + (", otarena-tuned" if r.get("setting") == "tuned" else ""),
                "column": r.get("column") or "", "metric": r["metric"], "eps": f"{r['eps']:g}", "claimed": claimed,
                "measured": measured, "n": f"{r['n']:,}" if r.get("n") else "", "how": r.get("measured_how", ""),
                "difference": "–" if r["difference"] is None else f"{r['difference']:+.2f}",
                "verdict": r["verdict"], "verdict_css": VERDICT_CSS.get(r["verdict"], ""), "why": r.get("why", ""),
                "otarena": "–" if ours.get("value") is None else f"{_percent(ours['value'])} ({ours.get('how', '')})"})
        counts: dict[str, int] = {}
        for r in t["rows"]:
            counts[r["verdict"]] = counts.get(r["verdict"], 0) + 1
        out.append({
            "id": f"reproduction-{k}", "claim_set": t["claim_set"], "budget": t["budget"],
            "citation": t.get("citation", ""), "source": t.get("source", ""),
            "reductions": t.get("reductions", []), "machine": machine, "seconds": f"{t.get('seconds', 0):,.0f}",
            "counts": ", ".join(f"{n} {v}" for v, n in counts.items()),
            "deviations": [(model["name"], model.get("deviations", [])) for model in t.get("models", [])],
            "rows": rows, "verdicts": t.get("verdicts", {})})
    return out
