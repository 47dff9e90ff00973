# SPDX-License-Identifier: Apache-2.0
"""Leaderboards of adversarially robust training runs, built from an MLflow tracking store.

MLflow runs -> :mod:`~leaderboard.collect` (typed rows) -> :mod:`~leaderboard.schema` (RobustBench-like
selection and ranking) -> :mod:`~leaderboard.render` (Markdown, CSV, terminal text).

This package meets ``search/`` only through the MLflow key names of ``docs/mlflow-schema.md``; it
never imports torch, ray or ``methods``, so a leaderboard can be built on a laptop with no GPU stack.

Example:
    >>> tables = build("sqlite:///mlflow.db", out_dir="site")  # doctest: +SKIP
    >>> print(format_text(tables))  # doctest: +SKIP
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from leaderboard import render
from leaderboard.collect import collect
from leaderboard.render import format_text
from leaderboard.schema import Row, Table, tabulate

__all__ = ["FORMATS", "Row", "Table", "build", "collect", "format_text", "tabulate"]

FORMATS = {"md": "leaderboard.md", "csv": "leaderboard.csv"}
"""Output formats :func:`build` writes, with their file names under ``out_dir``."""


def build(
    tracking_uri: str,
    out_dir: str | Path = "site",
    experiments: Iterable[str] | None = None,
    filter_string: str = "",
    formats: Iterable[str] = ("md", "csv"),
    title: str = "otarena leaderboard",
) -> list[Table]:
    """Read a tracking store, apply the leaderboard rules and write the outputs.

    Args:
        tracking_uri: The MLflow store, e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``.
        out_dir: Directory for ``leaderboard.md`` / ``leaderboard.csv``; created if needed.
        experiments: Experiment names (or ids) to include; ``None`` includes all of them.
        filter_string: An optional MLflow search filter on the trial runs,
            e.g. ``"tags.`otarena.method` = 'trades'"``.
        formats: Any of :data:`FORMATS`' keys, or one comma-separated string (``"md,csv"``).
        title: The Markdown page heading.

    Returns:
        The tables, one per (dataset, norm, eps); empty for a store with no evaluated trials
        (the files then say so).

    Raises:
        ValueError: An unknown format, a missing store, an unknown experiment or a bad filter.
        RuntimeError: The store exists but cannot be read.
    """
    formats = [f.strip() for f in formats.split(",")] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown leaderboard format(s) {', '.join(unknown)}; "
                         f"supported: {', '.join(FORMATS)}")
    tables = tabulate(collect(tracking_uri, experiments, filter_string))
    # Runs link to the MLflow UI only when the store is a server (a local file has no UI URL),
    # and never with the credentials a server URI may carry: the page is meant to be published.
    run_url = None
    if urlparse(tracking_uri).scheme in ("http", "https"):
        run_url = re.sub(r"//[^/@]*@", "//", tracking_uri)
    texts = {
        "md": lambda: render.to_markdown(tables, title=title, run_url=run_url),
        "csv": lambda: render.to_csv(tables),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for fmt in formats:
        (out / FORMATS[fmt]).write_text(texts[fmt](), encoding="utf-8", newline="")
    return tables
