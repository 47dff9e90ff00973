# SPDX-License-Identifier: Apache-2.0
"""The static leaderboard site: one self-contained ``index.html`` with sortable tables and plots.

The page is the Jinja2 template ``templates/page.html``, rendered with autoescaping on: every string
read from MLflow is user input and is escaped (quotes included) wherever it lands, text or
attribute; links keep only ``http(s)`` URLs. This module only gathers what the template shows: the
columns of :data:`leaderboard.columns.COLUMNS` with the data of their richer cells, and the plots of
:mod:`leaderboard.plots`.

The page works from ``file://`` and requests nothing: CSS and JavaScript (``templates/site.css``,
``templates/site.js``) are inline, the plots inline SVG, and a Content-Security-Policy allows only
the page's own ``<style>`` and ``<script>`` (by hash) and no fetch of any kind, so even a string
that slipped through escaping could neither run nor phone home. The script is a constant: it reads
the numbers to sort by from ``data-value`` attributes, so no user data is ever placed inside
``<script>``.
"""

from __future__ import annotations

import base64
import hashlib
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from urllib.parse import quote

import jinja2
from markupsafe import Markup

from otarena.leaderboard import formatting as fmt
from otarena.leaderboard import plots, reproductions
from otarena.leaderboard.columns import HTML, Column, columns
from otarena.leaderboard.schema import Campaign, Row, Table, is_warning

TEMPLATES = Path(__file__).parent / "templates"
CSS = (TEMPLATES / "site.css").read_text(encoding="utf-8")
# Sorting: a header button cycles its column through the column's first direction and the other
# one; the numbers come from the cells' data-value attributes (no data-value = missing: always
# last); ties keep the leaderboard rank. It reads only the DOM, so no user data is ever in a script.
JS = (TEMPLATES / "site.js").read_text(encoding="utf-8")


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No source may be fetched (default-src 'none'); the inline style and script run by hash only.
CSP = (f"default-src 'none'; style-src {_sha256(CSS)}; script-src {_sha256(JS)}; img-src data:; "
       "base-uri 'none'; form-action 'none'")

_CAPTIONS = {
    "pareto": ("Every evaluated trial of this threat model (failed ones left out), at its own seed's test numbers; "
               "large outlined markers are the leaderboard entries. The step line joins the Pareto front, the trials "
               "no other trial beats on both axes; every other trial lies below it."),
    "tuning": ("What tuning bought: an arrow per entry from its search's first trial, the method's paper defaults "
               "(ring), to the tuned trial the search selected on validation (dot), both scored on the test split by "
               "the same protocol, at their own seed's numbers (the Default → tuned column)."),
    "eps-sweep": ("PGD accuracy of each entry at growing radii. A curve that stays flat far above the dashed "
                  "chance bound as eps grows suggests gradient masking."),
    "no-eps-sweep": "No row of this table logged an eps sweep (tag otarena.eps_sweep).",
    "cost": ("AutoAttack accuracy of each entry against the training device-hours of its configuration alone "
             "(its search cost more: the Device hours column). The step line joins the Pareto front of cost against "
             "robustness, the entries no other entry beats with both less training and more AutoAttack accuracy."),
    "validation-pareto": ("Each search's completed trials on validation, at their best epoch's clean and PGD accuracy. "
                          "The step line joins the Pareto set of each multi-objective search, the trials no other "
                          "trial of that search beats on both; the black rings are the leaderboard entries, chosen "
                          "on validation by the rule stated under the table."),
    "progress": ("Best validation PGD accuracy found so far against the epochs spent over the search's trials, "
                 "trials in the order they finished; one line per search, a dot at each improvement."),
}


@cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined,
        # Control characters (ANSI escapes, bidi overrides) never reach the page: user text is made
        # printable before it is escaped. Markup (the constant CSS/JS, the plots) is left alone.
        finalize=lambda v: v if isinstance(v, Markup) or not isinstance(v, str) else fmt.printable(v))
    return env.get_template("page.html")


def to_html(tables: list[Table], campaign: Campaign, *, title: str, run_url: str | None) -> str:
    """The whole static page.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        campaign: What the build read: candidate rows and every trial point (for the plots).
        title: The page heading (user text: escaped).
        run_url: Base URL of an MLflow UI; when given (and http(s)), each row links to its run.

    Returns:
        One self-contained HTML document.
    """
    color = plots.colors([*(r.method for r in campaign.rows), *(p.method for p in campaign.trials),
                          *(r.method for t in tables for r in t.rows)])
    # One scale per hyperparameter over the whole page: lr on a log axis for every method and table.
    log_axes = plots.log_scale_params(campaign.trials)
    return _template().render(
        title=title, csp=CSP, css=Markup(CSS), js=Markup(JS), rules=fmt.RULES, empty_message=fmt.EMPTY_MESSAGE,
        warning_mark=fmt.WARNING_MARK, generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        n_trials=len(campaign.trials), n_rows=len(campaign.rows), n_entries=sum(len(t.rows) for t in tables),
        experiments=sorted({r.experiment_name for r in campaign.rows if r.experiment_name}),
        tables=[_table(k, t, campaign, color, log_axes, run_url) for k, t in enumerate(tables, 1)],
        reproductions=reproductions.view(campaign.reproductions),
    ) + "\n"


def _table(k: int, t: Table, campaign: Campaign, color: dict[str, str], log_axes: set[str],
           run_url: str | None) -> dict:
    """Table ``k`` of the page: its columns (those with a value in some row), rows, notes and plots."""
    trials = [p for p in campaign.trials if (p.dataset, p.norm, p.eps) == (t.dataset, t.norm, t.eps)]
    eps_caption = _CAPTIONS["eps-sweep" if any(r.eps_sweep and r.eps_sweep.eps for r in t.rows) else "no-eps-sweep"]
    cols = columns(HTML, t.rows)
    # A flag's badge links to its note under the table: the reason is a tap away on a phone, where
    # the badge's hover title never shows.
    notes = [{"id": f"table-{k}-note-{j}", "badge": fmt.flag(n.flag), "warn": n.warning,
              "reason": n.reason or _default_reason(n.flag), "rows": fmt.rank_list(n.ranks), "note": n}
             for j, n in enumerate(fmt.flag_notes(t.rows), 1)]
    return {
        "title": fmt.table_title(t), "n_trials": len(trials), "n_searches": len({p.parent_id for p in trials}),
        "columns": [{"header": c.header_in(HTML), "numeric": c.numeric, "sorts_as_number": c.sorts_as_number,
                     "first": c.first, "tip": c.tip} for c in cols],
        "rows": [{"rank": i, "run_id": row.run_id, "warned": bool(row.warnings),
                  "cells": [_cell(c, i, row, run_url, notes) for c in cols]} for i, row in enumerate(t.rows, 1)],
        "notes": notes, "certified_note": fmt.certified_note(t), "selection": _selection(t),
        "plots": [(Markup(plots.pareto_plot(t, trials, color)), _CAPTIONS["pareto"]),
                  *([(Markup(plots.validation_pareto_plot(t, trials, color)), _CAPTIONS["validation-pareto"])]
                    if any(p.pareto and p.method in {r.method for r in t.rows} for p in trials) else []),
                  *([(Markup(plots.tuning_plot(t, color)), _CAPTIONS["tuning"])] if any(r.tuning for r in t.rows)
                    else []),
                  (Markup(plots.eps_plot(t, color)), eps_caption),
                  (Markup(plots.progress_plot(t, trials, color, campaign.fidelity)),
                   " ".join(filter(None, [_CAPTIONS["progress"], plots.fidelity_text(t, trials, campaign.fidelity)]))),
                  (Markup(plots.cost_plot(t, color)), _CAPTIONS["cost"])],
        "sensitivity": [{"method": m, "svgs": [Markup(s) for s in svgs], **_knobs(m, trials, campaign, color)}
                        for m, svgs in plots.sensitivity_plots(t, trials, color, log_axes)],
    }


def _selection(t: Table) -> list[tuple[str, str]]:
    """How the table's rows were chosen on validation: (rule, the rows it chose), in the order rows show them."""
    ranks: dict[str, list[int]] = {}
    for i, r in enumerate(t.rows, 1):
        if r.selection_rule:
            ranks.setdefault(r.selection_rule, []).append(i)
    every = sum(len(v) for v in ranks.values()) == len(t.rows) and len(ranks) == 1
    return [(rule, "every row" if every else fmt.rank_list(rows)) for rule, rows in ranks.items()]


def _knobs(method: str, trials: list, campaign: Campaign, color: dict[str, str]) -> dict:
    """Which knobs matter for ``method``'s searches in this table: a bar plot per search with importances, and the
    reason for each without (a search logged before importances were has neither)."""
    parents = {p.parent_id for p in trials if p.method == method}
    found = [i for i in campaign.importance if i.parent_id in parents]
    labelled = len(found) > 1  # a method searched twice in one table: say which search (architecture, run)

    def label(i) -> str:
        return f"{i.arch or '?'} · {i.parent_id[:8]}" if labelled else ""

    return {"knobs": [Markup(plots.importance_plot(i, color[method], label(i))) for i in found if i.values],
            "knob_evaluators": list(dict.fromkeys(i.evaluator for i in found if i.values and i.evaluator)),
            "knob_reasons": [(label(i), i.reason) for i in found if not i.values]}


def _default_reason(flag: str) -> str:
    return "may make the evaluation unreliable" if is_warning(flag) else "a note on precision"


def _cell(c: Column, i: int, r: Row, run_url: str | None, notes: list[dict]) -> dict:
    """What the template's cell needs: its text and sort value, and the data of a richer cell (``kind``)."""
    value = c.value(i, r)
    if value is not None:
        value = repr(float(value)) if c.sorts_as_number else str(value)
    cell = {"kind": "text", "text": c.text(i, r), "value": value, "css": "num" if c.numeric else c.name}
    if c.metric:
        ci = fmt.ci_of(r, c.metric)
        cell |= {"kind": "accuracy", "ci": fmt.interval(ci) if ci else None}
    elif c.name == "method":
        cell |= {"kind": "method", "warnings": r.warnings, "paper": r.paper, "link": fmt.safe_url(r.paper_link),
                 "method": r.method}
    elif c.hover is not None:
        cell |= {"kind": "hover", "hover": c.hover(i, r)}
    elif c.name == "hyperparameters":
        cell |= {"kind": "hyperparameters", "pairs": [(n, v, fmt.param(v)) for n, v in r.hparams]}
    elif c.name == "flags":
        cell |= {"kind": "flags", "badges": [n for n in notes if i in n["note"].ranks]}
    elif c.name == "run":
        link = fmt.safe_url(f"{run_url.rstrip('/')}/#/experiments/{quote(r.experiment_id, safe='')}"
                            f"/runs/{quote(r.run_id, safe='')}") if run_url else None
        cell |= {"kind": "run", "link": link, "name": r.run_name or r.run_id, "run_name": r.run_name,
                 "run_id": r.run_id, "tip": f"experiment {r.experiment_name or r.experiment_id} · run {r.run_id}"}
    return cell
