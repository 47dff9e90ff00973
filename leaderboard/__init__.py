# SPDX-License-Identifier: Apache-2.0
"""Leaderboards of adversarially robust training runs, built from an MLflow tracking store.

MLflow runs -> :mod:`~leaderboard.collect` (typed rows and trial points) -> :mod:`~leaderboard.schema`
(RobustBench-like selection and ranking) -> the writers of :data:`~leaderboard.writers.FORMATS`:
:mod:`~leaderboard.render` (Markdown, CSV, LaTeX, terminal text), :mod:`~leaderboard.html` (the
static site, with the plots of :mod:`~leaderboard.plots`) and :mod:`~leaderboard.robustbench`
(RobustBench ``model_info`` JSON). Every table format reads the one column spec,
:data:`~leaderboard.columns.COLUMNS`, and formats with :mod:`~leaderboard.formatting`.

This package meets ``search/`` only through the MLflow key names of ``docs/mlflow-schema.md`` (the tag
names are :mod:`~leaderboard.tags`, which ``search/`` writes with); it never imports torch, ray,
``search`` or ``methods``, so a leaderboard can be built on a laptop with no GPU stack.

Example:
    >>> tables = build("sqlite:///mlflow.db", out_dir="site")  # doctest: +SKIP
    >>> print(format_text(tables))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from otarena.leaderboard import per_example, reproductions
from otarena.leaderboard.collect import collect, collect_campaign
from otarena.leaderboard.render import format_text
from otarena.leaderboard.schema import Campaign, Row, Table, tabulate
from otarena.leaderboard.writers import FORMATS, Output

__all__ = ["FORMATS", "Campaign", "EmptySelection", "Output", "Row", "Table", "build", "collect", "collect_campaign",
           "format_text", "tabulate"]


class EmptySelection(ValueError):
    """A filter matched no evaluated trial: :func:`build` wrote nothing (see its ``allow_empty``)."""


def build(
    tracking_uri: str,
    out_dir: str | Path = "site",
    experiments: Iterable[str] | None = None,
    filter_string: str = "",
    formats: Iterable[str] = tuple(FORMATS),
    title: str = "otarena leaderboard",
    mlflow_url: str | None = None,
    allow_empty: bool = False,
    reproductions_dir: str | Path | None = None,
) -> list[Table]:
    """Read a tracking store, apply the leaderboard rules and write the outputs.

    Args:
        tracking_uri: The MLflow store, e.g. ``sqlite:///mlflow.db`` or ``http://host:5000``.
        out_dir: Directory for the outputs; created if needed.
        experiments: Experiment names (or ids) to include; ``None`` includes all of them.
        filter_string: An optional MLflow search filter on the trial runs,
            e.g. ``"tags.`otarena.method` = 'trades'"``.
        formats: Any of :data:`~leaderboard.writers.FORMATS`' keys (``md``, ``csv``, ``tex``, ``html``
            for the static site ``index.html``, ``json`` for RobustBench
            ``model_info/<dataset>/<norm>/<entry>.json``), or one comma-separated string (``"md,csv"``).
        title: The page heading.
        mlflow_url: Base URL of the MLflow UI that runs link to; default: the tracking URI when it
            is a server (without the credentials it may carry), else no links.
        allow_empty: Write an empty leaderboard even when ``filter_string`` matches no evaluated
            trial. Without a filter an empty result is always written: it is what the store holds
            (a search publishes its first, empty board so).
        reproductions_dir: A folder of ``otarena reproduce`` tables (``reproductions/``) for the site's
            section "Do the papers' numbers hold?", beside those the store's reproduction runs carry
            (the store's win where both measured a claim set at one budget).

    Returns:
        The tables, one per (dataset, norm, eps); empty for a store with no evaluated trials
        (the files then say so).

    Raises:
        EmptySelection: ``filter_string`` matched no evaluated trial and ``allow_empty`` is false;
            nothing was written, so an earlier leaderboard in ``out_dir`` stays as it was.
        ValueError: An unknown format, a reproductions folder without tables, a missing store, an unknown experiment or a bad filter.
        RuntimeError: The store exists but cannot be read.
    """
    formats = [f.strip() for f in formats.split(",") if f.strip()] if isinstance(formats, str) else list(formats)
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown or not formats:
        raise ValueError(f"unknown leaderboard format(s) {', '.join(unknown) or '(none given)'}; "
                         f"supported: {', '.join(FORMATS)}")
    from_files = reproductions.read_folder(reproductions_dir) if reproductions_dir is not None else ()
    campaign = collect_campaign(tracking_uri, experiments, filter_string)
    if from_files:
        campaign = dataclasses.replace(campaign, reproductions=reproductions.merge(campaign.reproductions, from_files))
    tables = tabulate(list(campaign.rows))
    # The tied groups: the one step that reads artifacts, only those of the rows a table compares.
    tables = per_example.with_standings(tables, tracking_uri)
    if not tables and filter_string and not allow_empty:
        # A typo in a filter would otherwise replace a published site with an empty page.
        matched = f"{len(campaign.trials)} trial runs, none of them evaluated" if campaign.trials else "no trial run"
        raise EmptySelection(f"the filter {filter_string!r} matches {matched}: nothing to rank, "
                             f"nothing written to {out_dir}")
    # Never publish the credentials a server URI may carry: the page is meant to be public.
    if mlflow_url is None and urlparse(tracking_uri).scheme in ("http", "https"):
        mlflow_url = tracking_uri
    run_url = re.sub(r"//[^/@]*@", "//", mlflow_url).rstrip("/") if mlflow_url else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    output = Output(tables, campaign, title, run_url)
    for fmt in dict.fromkeys(formats):
        FORMATS[fmt].write(out / FORMATS[fmt].file, output)
    return tables
