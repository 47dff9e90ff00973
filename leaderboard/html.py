# SPDX-License-Identifier: Apache-2.0
"""The static leaderboard site: one self-contained ``index.html`` with sortable tables and plots.

The page works from ``file://`` and requests nothing: CSS and JavaScript are inline, the plots are
inline SVG drawn here (no matplotlib, no chart library), and a Content-Security-Policy allows only
the page's own ``<style>`` and ``<script>`` (by hash) and no fetch of any kind, so even a string
that slipped through escaping could neither run nor phone home.

Per table (one per (dataset, norm, eps)), the page shows the ranked rows and four plots:

1. the Pareto front of clean against AutoAttack accuracy over every evaluated trial;
2. robust (PGD) accuracy against eps for the rows that logged an eps sweep;
3. the search progress: best validation robust accuracy against trial-epochs spent;
4. hyperparameter sensitivity: validation robust accuracy against each searched value, per method.

Every string read from MLflow is user input. It is escaped with :func:`html.escape` (quotes
included) wherever it lands, text or attribute, HTML or SVG; links keep only ``http(s)`` URLs. The
script is a constant: it reads the numbers to sort by from ``data-value`` attributes, so no user
data is ever placed inside ``<script>``.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from urllib.parse import quote, urlparse

from leaderboard import render
from leaderboard.schema import Campaign, Row, Table, TrialPoint, is_warning

# ----------------------------------------------------------------------------------------------------
# Page furniture: constants only, never formatted with user data (the CSP hashes them).

CSS = """
:root { --fg: #1d2330; --muted: #5b6475; --line: #d9dde5; --bg-alt: #f6f7f9; --warn: #a14b00;
        --warn-bg: #fff1e0; --note-bg: #eef1f6; --link: #1f5fbf; }
* { box-sizing: border-box; }
body { margin: 0 auto; max-width: 1760px; padding: 24px 28px 48px; color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
h1 { font-size: 26px; margin: 0 0 8px; }
h2 { font-size: 20px; margin: 36px 0 4px; padding-top: 8px; border-top: 2px solid var(--line); }
h3 { font-size: 15px; margin: 18px 0 6px; }
h4 { font-size: 13px; margin: 10px 0 4px; color: var(--muted); }
p.rules { max-width: 980px; color: var(--muted); margin: 4px 0; }
p.meta, p.note { color: var(--muted); font-size: 12.5px; margin: 2px 0 10px; }
p.empty { font-size: 16px; padding: 18px; background: var(--bg-alt); border-radius: 6px; }
nav.toc a { margin-right: 14px; white-space: nowrap; }
a { color: var(--link); text-decoration: none; }
a:hover { text-decoration: underline; }
.scroll { overflow-x: auto; border: 1px solid var(--line); border-radius: 6px; }
table.board { border-collapse: collapse; width: 100%; font-size: 13px; }
table.board th, table.board td { padding: 4px 7px; border-bottom: 1px solid var(--line); vertical-align: top;
                                 text-align: left; }
table.board thead th { background: var(--bg-alt); vertical-align: bottom; }
table.board th button { all: unset; cursor: pointer; font-weight: 600; }
table.board th button:focus-visible { outline: 2px solid var(--link); }
table.board th button:hover { text-decoration: underline; }
table.board th[aria-sort="ascending"] button::after { content: "\\00a0\\25B2"; }
table.board th[aria-sort="descending"] button::after { content: "\\00a0\\25BC"; }
table.board tbody tr:nth-child(even) { background: #fbfbfc; }
table.board tbody tr:hover { background: #f0f4fb; }
table.board th.num { text-align: right; }
table.board td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.board td.method { white-space: nowrap; max-width: 260px; overflow: hidden; text-overflow: ellipsis; }
table.board td.hp { min-width: 200px; max-width: 340px; font-size: 12px; }
table.board td.hp span { display: inline-block; max-width: 100%; margin-right: 8px; overflow-wrap: anywhere; }
table.board td.flags { min-width: 120px; }
table.board td.run { font-size: 12px; min-width: 110px; max-width: 220px; overflow-wrap: anywhere; }
.warn-mark { color: var(--warn); font-weight: 700; cursor: help; }
.badge { display: inline-block; padding: 0 6px; margin: 1px 3px 1px 0; border-radius: 9px; font-size: 11.5px;
         white-space: nowrap; cursor: help; background: var(--note-bg); color: var(--muted); }
.badge.warn { background: var(--warn-bg); color: var(--warn); border: 1px solid #f0c79b; }
.plots { display: flex; flex-wrap: wrap; gap: 18px; margin-top: 14px; }
.plots.small { gap: 10px; }
figure { margin: 0; }
figcaption { max-width: 400px; color: var(--muted); font-size: 12px; }
svg.plot { display: block; max-width: 100%; height: auto; background: #fff; }
svg.plot text { font-family: inherit; fill: #333; }
svg.plot .halo { paint-order: stroke; stroke: #fff; stroke-width: 3px; }
details summary { cursor: pointer; font-weight: 600; margin: 18px 0 4px; }
footer { margin-top: 40px; color: var(--muted); font-size: 12px; }
"""

# Sorting: a header button cycles its column through the column's first direction and the other
# one; the numbers come from the cells' data-value attributes (no data-value = missing: always
# last); ties keep the leaderboard rank. It reads only the DOM, so no user data is ever in a script.
JS = """
(function () {
  "use strict";
  function sortBy(table, col, th) {
    var cur = th.getAttribute("aria-sort");
    var dir = cur === "ascending" ? "descending" : cur === "descending" ? "ascending"
      : (th.getAttribute("data-first") || "ascending");
    var heads = table.tHead.rows[0].cells;
    for (var i = 0; i < heads.length; i++) heads[i].removeAttribute("aria-sort");
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1, numeric = th.getAttribute("data-type") === "num";
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    function rank(r) { return Number(r.getAttribute("data-rank")); }
    rows.sort(function (a, b) {
      var va = a.cells[col].getAttribute("data-value"), vb = b.cells[col].getAttribute("data-value");
      var ma = va === null || va === "", mb = vb === null || vb === "";
      if (ma || mb) return ma === mb ? rank(a) - rank(b) : (ma ? 1 : -1);
      var c = numeric ? Number(va) - Number(vb) : va.localeCompare(vb);
      return c * sign || rank(a) - rank(b);
    });
    rows.forEach(function (r) { body.appendChild(r); });
  }
  var tables = document.querySelectorAll("table.board");
  Array.prototype.forEach.call(tables, function (table) {
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th, col) {
      var button = th.querySelector("button");
      if (button) button.addEventListener("click", function () { sortBy(table, col, th); });
    });
  });
})();
"""

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")
"""Method colours (matplotlib's tab10 order), assigned by sorted method name so they agree across plots."""
PCT = (0.0, 100.0)
"""Where an accuracy axis ends: the padding around the points never runs past 0% or 100%."""


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# No source may be fetched (default-src 'none'); the inline style and script run by hash only.
CSP = (f"default-src 'none'; style-src {_sha256(CSS)}; script-src {_sha256(JS)}; img-src data:; "
       "base-uri 'none'; form-action 'none'")


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
    colors = _colors([*(r.method for r in campaign.rows), *(p.method for p in campaign.trials),
                      *(r.method for t in tables for r in t.rows)])
    body = [f"<h1>{_e(title)}</h1>", f'<p class="rules">{_e(render.RULES)}</p>', _generation_note(tables, campaign)]
    if not tables:
        body.append(f'<p class="empty">{_e(render.EMPTY_MESSAGE)}</p>')
        if campaign.trials:
            body.append(f'<p class="note">{len(campaign.trials)} trial runs found, none of them evaluated yet.</p>')
    else:
        links = " ".join(f'<a href="#table-{k}">{_e(render.table_title(t))}</a>' for k, t in enumerate(tables, 1))
        body.append(f'<nav class="toc">Tables: {links}</nav>')
    for k, t in enumerate(tables, 1):
        body.append(_section(k, t, campaign, colors, run_url))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',
        f"<title>{_e(title)}</title>",
        f"<style>{CSS}</style>",
        "</head>",
        "<body>",
        *body,
        '<footer>Static page generated by otarena\'s <code>leaderboard</code>: it loads nothing from the '
        "network; plots are inline SVG, hover a point or a flag for details.</footer>",
        f"<script>{JS}</script>",
        "</body>",
        "</html>",
        "",
    ])


def _generation_note(tables: list[Table], campaign: Campaign) -> str:
    names = sorted({r.experiment_name for r in campaign.rows if r.experiment_name})
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    entries = sum(len(t.rows) for t in tables)
    exps = f" in {len(names)} MLflow experiment{'s' * (len(names) != 1)} ({_e(', '.join(names))})" if names else ""
    return (f'<p class="meta">Generated {when} from {len(campaign.trials)} trial runs ({len(campaign.rows)} '
            f"evaluated){exps}: {entries} entries in {len(tables)} "
            f"table{'s' * (len(tables) != 1)}.</p>")


def _section(k: int, t: Table, campaign: Campaign, colors: dict[str, str], run_url: str | None) -> str:
    trials = [p for p in campaign.trials if (p.dataset, p.norm, p.eps) == (t.dataset, t.norm, t.eps)]
    searches = len({p.parent_id for p in trials})
    plots = [_pareto_plot(t, trials, colors), _eps_plot(t, colors), _progress_plot(t, trials, colors)]
    return "\n".join([
        f'<section id="table-{k}" class="threat-model">',
        f"<h2>{_e(render.table_title(t))}</h2>",
        f'<p class="meta">{len(t.rows)} entr{"ies" if len(t.rows) != 1 else "y"} · {len(trials)} trials '
        f"in {searches} search{'es' * (searches != 1)}</p>",
        _table(t, run_url),
        '<div class="plots">',
        *plots,
        "</div>",
        _sensitivity(t, trials, colors),
        "</section>",
    ])


# ----------------------------------------------------------------------------------------------------
# The table: one column list, like render.COLUMNS, but each cell gives (inner HTML, sort value).

Cell = Callable[[int, Row], "tuple[str, object]"]


@dataclass(frozen=True)
class _Col:
    header: str
    cell: Cell
    sort: str = "num"
    """``num`` (numeric sort on the cell's data-value) or ``text``."""
    css: str = "num"
    """The cells' class: ``num`` right-aligns."""
    first: str = "ascending"
    """The direction of the first click: best-first for accuracies."""
    tip: str = ""


def _acc_col(header: str, metric: str) -> _Col:
    def cell(i: int, r: Row) -> tuple[str, object]:
        ci = getattr(r, f"{metric.removesuffix('_acc')}_ci")
        tip = f' title="own 95% CI {_e(render._ci(ci))}"' if ci else ""
        return f"<span{tip}>{_e(render._acc(r, metric))}</span>", r.headline(metric)

    return _Col(header, cell, first="descending",
                tip=f"{header} accuracy (%); mean ± std over seeds when there are several")


def _columns(run_url: str | None) -> list[_Col]:
    return [
        _Col("Rank", lambda i, r: (str(i), i), tip="by AutoAttack accuracy"),
        _Col("Method", lambda i, r: (_method_cell(r), r.method), sort="text", css="method"),
        _acc_col("Clean", "clean_acc"),
        _acc_col("AutoAttack", "aa_acc"),
        _acc_col("PGD", "pgd_acc"),
        _acc_col("Certified", "certified_acc"),
        _Col("AA 95%\u00a0CI", lambda i, r: (_e(render._ci(r.aa_ci)), r.aa_ci[0] if r.aa_ci else None),
             first="descending", tip="Wilson interval of this trial's AutoAttack accuracy over its n_ex images"),
        _Col("Arch", lambda i, r: (_e(r.arch), r.arch), sort="text", css=""),
        _Col("Epochs", lambda i, r: (render._num(r.epochs), r.epochs)),
        _Col("Hyperparameters", lambda i, r: (_hparams_cell(r), ", ".join(f"{n}={v}" for n, v in r.hparams)),
             sort="text", css="hp", tip="the searched hyperparameters of this trial"),
        _Col("Trials", lambda i, r: (render._num(r.trials), r.trials), tip="search cost: trials run"),
        _Col("Trial-epochs", lambda i, r: (render._num(r.trial_epochs), r.trial_epochs),
             tip="search cost: epochs trained over all trials of the search"),
        _Col("Device hours", lambda i, r: (_hours(r.device_hours), r.device_hours),
             tip="search cost: device-hours (trial wall-clock hours times devices held)"),
        _Col("n_ex", lambda i, r: (render._num(r.n_ex), r.n_ex), tip="test images evaluated"),
        _Col("Seeds", lambda i, r: (str(r.n_seeds), r.n_seeds), first="descending"),
        _Col("Flags", lambda i, r: (_flags_cell(r), len(r.warnings) + len(r.notes) / 100), css="flags",
             first="descending", tip="⚠ warnings question the evaluation; the others are notes on precision"),
        _Col("Run", lambda i, r: (_run_cell(r, run_url), r.run_name or r.run_id), sort="text", css="run"),
    ]


def _table(t: Table, run_url: str | None) -> str:
    cols = _columns(run_url)
    head = []
    for c in cols:
        cls = ' class="num"' if c.css == "num" else ""
        tip = f' title="{_e(c.tip)}"' if c.tip else ""
        head.append(f'<th{cls} data-type="{c.sort}" data-first="{c.first}"{tip}>'
                    f'<button type="button">{_e(c.header)}</button></th>')
    lines = [f'<div class="scroll"><table class="board" data-table="{_e(render.table_title(t))}">',
             "<thead><tr>" + "".join(head) + "</tr></thead>", "<tbody>"]
    for i, row in enumerate(t.rows, 1):
        cells = []
        for c in cols:
            inner, value = c.cell(i, row)
            attrs = f' class="{c.css}"' if c.css else ""
            if value is not None:
                attrs += f' data-value="{_e(repr(float(value)) if c.sort == "num" else str(value))}"'
            cells.append(f"<td{attrs}>{inner}</td>")
        warn = ' class="warned"' if row.warnings else ""
        lines.append(f'<tr data-rank="{i}" data-run="{_e(row.run_id)}"{warn}>' + "".join(cells) + "</tr>")
    lines += ["</tbody>", "</table></div>"]
    return "\n".join(lines)


def _method_cell(r: Row) -> str:
    mark = ""
    if r.warnings:
        tip = "evaluation may be unreliable: " + ", ".join(r.warnings)
        mark = f'<span class="warn-mark" title="{_e(tip)}">{render.WARNING_MARK}</span> '
    tip = f' title="{_e(r.paper)}"' if r.paper else ""
    link = _safe_url(r.paper_link)
    if link:
        return f'{mark}<a href="{_e(link)}"{tip} rel="noopener noreferrer">{_e(r.method)}</a>'
    return f"{mark}<span{tip}>{_e(r.method)}</span>"


def _hparams_cell(r: Row) -> str:
    return " ".join(f'<span title="{_e(f"{n} = {v}")}">{_e(n)}=<b>{_e(render._param(v))}</b></span>'
                    for n, v in r.hparams)


def _flags_cell(r: Row) -> str:
    reasons = dict(r.flag_reasons)
    badges = []
    for flag in render._flag_order(r):
        warn = is_warning(flag)
        reason = reasons.get(flag) or ("may make the evaluation unreliable" if warn else "a note on precision")
        text = f"{render.WARNING_MARK} {flag}" if warn else flag
        badges.append(f'<span class="badge{" warn" if warn else ""}" title="{_e(reason)}">{_e(text)}</span>')
    return "".join(badges)


def _run_cell(r: Row, run_url: str | None) -> str:
    name = r.run_name or r.run_id
    tip = _e(f"experiment {r.experiment_name or r.experiment_id} · run {r.run_id}")
    link = _safe_url(f"{run_url.rstrip('/')}/#/experiments/{quote(r.experiment_id, safe='')}"
                     f"/runs/{quote(r.run_id, safe='')}") if run_url else None
    if link:
        return f'<a href="{_e(link)}" title="{tip}" rel="noopener noreferrer">{_e(name)}</a>'
    named = f'<span title="{tip}">{_e(r.run_name)}</span><br>' if r.run_name else ""
    return f"{named}<code>{_e(r.run_id)}</code>"


def _hours(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}" if x >= 0.995 else f"{x:.2g}"


# ----------------------------------------------------------------------------------------------------
# The plots' data: each function picks its points and hands them to _svg_plot.


def _pareto_plot(t: Table, trials: list[TrialPoint], colors: dict[str, str]) -> str:
    # Failed trials are no candidates (collect.is_candidate), so they do not shape the front either.
    pts = [p for p in trials if p.clean_acc is not None and p.aa_acc is not None and p.outcome != "failed"]
    rows = [r for r in t.rows if r.clean_acc is not None]
    series = []
    for method in _unique(p.method for p in pts):
        mine = [p for p in pts if p.method == method]
        series.append(_Series(method, [(100 * p.clean_acc, 100 * p.aa_acc) for p in mine], colors[method],
                              tips=[f"{p.method} · {p.arch}\nclean {100 * p.clean_acc:.2f}, "
                                    f"AA {100 * p.aa_acc:.2f}\nrun {p.run_id}" for p in mine]))
    xy = [(100 * p.clean_acc, 100 * p.aa_acc) for p in pts] + [(100 * r.clean_acc, 100 * r.aa_acc) for r in rows]
    front = _pareto_front(xy)
    if front:
        steps = [front[0]]
        for (_, y0), (x1, y1) in zip(front, front[1:]):
            steps += [(steps[-1][0], y1), (x1, y1)]
        series.append(_Series("Pareto front", steps, "#333", style="step"))
    for r in rows:
        series.append(_Series(None, [(100 * r.clean_acc, 100 * r.aa_acc)], colors[r.method], style="big",
                              tips=[f"leaderboard entry: {r.method} · {r.arch}\nclean {100 * r.clean_acc:.2f}, "
                                    f"AA {100 * r.aa_acc:.2f}\nrun {r.run_name or r.run_id}"],
                              texts=[r.method]))
    if rows:
        series.append(_Series("leaderboard entry", [], "#fff", style="big"))
    caption = ("Every evaluated trial of this threat model (failed ones left out), at its own seed's test "
               "numbers; large outlined markers are the leaderboard entries, the step line the Pareto front "
               "(no trial is better on both axes).")
    return _figure(_svg_plot("pareto", "Clean vs AutoAttack accuracy", series, _Axis("clean accuracy (%)", clamp=PCT),
                             _Axis("AutoAttack accuracy (%)", clamp=PCT), width=500), caption)


def _pareto_front(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates, by increasing x (so decreasing y)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(xy), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]


def _eps_plot(t: Table, colors: dict[str, str]) -> str:
    rows = [r for r in t.rows if r.eps_sweep and r.eps_sweep.eps]
    if not rows:
        return _figure(_svg_plot("eps-sweep", "Robust accuracy vs eps", [], _Axis("eps"),
                                 _Axis("PGD accuracy (%)", lo=0, hi=100), empty="no eps sweep logged"),
                       "No row of this table logged an eps sweep (tag otarena.eps_sweep).")
    labels = _labels(rows)
    series = [_Series(labels[r.run_id], [(e, 100 * a) for e, a in zip(r.eps_sweep.eps, r.eps_sweep.pgd_acc)],
                      colors[r.method], style="line",
                      tips=[f"{labels[r.run_id]}\neps {e:.4g}: PGD {100 * a:.2f}%"
                            for e, a in zip(r.eps_sweep.eps, r.eps_sweep.pgd_acc)])
              for r in rows]
    xs = [e for r in rows for e in r.eps_sweep.eps]
    lo, hi = min(xs), max(xs)
    bounds = sorted({r.eps_sweep.chance_bound for r in rows})
    for b in bounds:
        label = "chance bound" if len(bounds) == 1 else f"chance bound {100 * b:.3g}%"
        series.append(_Series(label, [(lo, 100 * b), (hi, 100 * b)], "#666", style="dash"))
    series.append(_Series(f"table eps ({render._eps(t.eps)})", [(t.eps, 0), (t.eps, 100)], "#aaa", style="dot-line"))
    caption = ("PGD accuracy of each entry at growing radii. A curve that stays flat far above the dashed "
               "chance bound as eps grows suggests gradient masking.")
    return _figure(_svg_plot("eps-sweep", "Robust accuracy vs eps", series, _Axis("eps"),
                             _Axis("PGD accuracy (%)", lo=0, hi=100)), caption)


def _progress_plot(t: Table, trials: list[TrialPoint], colors: dict[str, str]) -> str:
    searches: dict[tuple[str, str], list[TrialPoint]] = {}
    methods = _unique(r.method for r in t.rows)
    for p in trials:
        if p.method in methods:
            searches.setdefault((p.method, p.parent_id), []).append(p)
    keys = sorted(searches, key=lambda k: (methods.index(k[0]), k[1]))
    labels = _search_labels(keys, searches)
    series = []
    for key in keys:
        method, label = key[0], labels[key]
        pts = sorted(searches[key], key=lambda p: (p.end_time is None, p.end_time or 0, p.run_id))
        spent, best, steps, marks, tips = 0.0, None, [], [], []
        for p in pts:
            spent += p.epochs or 0.0
            if p.val_pgd_acc is not None and (best is None or p.val_pgd_acc > best):
                best = p.val_pgd_acc
                marks.append((spent, 100 * best))
                tips.append(f"{label}\nnew best {100 * best:.2f}% after {spent:g} trial-epochs\nrun {p.run_id}")
            if best is not None:
                if steps:  # hold the previous best until this trial's epochs are spent
                    steps.append((spent, steps[-1][1]))
                steps.append((spent, 100 * best))
        if steps:
            series.append(_Series(label, steps, colors[method], style="step"))
            series.append(_Series(None, marks, colors[method], tips=tips))
    caption = ("Best validation PGD accuracy found so far against the epochs spent over the search's trials, "
               "trials in the order they finished; one line per search, a dot at each improvement.")
    return _figure(_svg_plot("progress", "Search progress", series, _Axis("cumulative trial-epochs", lo=0),
                             _Axis("best val PGD accuracy (%)", clamp=PCT), empty="no trials logged"), caption)


def _search_labels(keys: list[tuple[str, str]], searches: dict) -> dict[tuple[str, str], str]:
    """``method``; ``method · arch`` when a method ran several searches; ``#n`` if that still repeats."""
    per_method: dict[str, int] = {}
    for m, _ in keys:
        per_method[m] = per_method.get(m, 0) + 1
    labels = {}
    for m, parent in keys:
        archs = ", ".join(_unique(p.arch for p in searches[(m, parent)]))
        labels[(m, parent)] = m if per_method[m] == 1 else f"{m} · {archs}"
    seen: dict[str, int] = {}
    for key, label in list(labels.items()):
        if list(labels.values()).count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            labels[key] = f"{label} #{seen[label]}"
    return labels


_OUTCOME_STYLE = {"pruned": "ring", "failed": "cross"}


def _sensitivity(t: Table, trials: list[TrialPoint], colors: dict[str, str]) -> str:
    chosen = {r.run_id for r in t.rows}
    out = ['<details class="sensitivity" open><summary>Hyperparameter sensitivity</summary>',
           '<p class="note">Validation PGD accuracy of every trial against each searched value: filled '
           "markers completed, rings pruned, crosses failed; the black ring is the trial on the leaderboard.</p>"]
    for method in _unique(r.method for r in t.rows):
        pts = [p for p in trials if p.method == method and p.val_pgd_acc is not None]
        names = _unique(n for p in pts for n, _ in p.hparams)
        out.append(f"<h4>{_e(method)}</h4>")
        if not names:
            out.append('<p class="note">No searched hyperparameters logged.</p>')
            continue
        out.append('<div class="plots small">')
        for name in names:
            vals = [(v, p) for p in pts for n, v in p.hparams if n == name]
            nums = [_float(v) for v, _ in vals]
            numeric = all(x is not None for x in nums)
            cats = None if numeric else sorted({v for v, _ in vals})
            xs = nums if numeric else [float(cats.index(v)) for v, _ in vals]
            log = numeric and min(xs) > 0 and max(xs) / min(xs) > 10
            series = []
            for outcome, style in (("completed", "dot"), ("pruned", "ring"), ("failed", "cross")):
                sel = [(x, v, p) for x, (v, p) in zip(xs, vals) if _OUTCOME_STYLE.get(p.outcome, "dot") == style]
                if not sel:
                    continue
                series.append(_Series(outcome, [(x, 100 * p.val_pgd_acc) for x, _, p in sel], colors[method],
                                      style=style, size=2.6,
                                      tips=[f"{name} = {v}\nval PGD {100 * p.val_pgd_acc:.2f}% ({p.outcome or '?'})"
                                            f"\nrun {p.run_id}" for _, v, p in sel]))
            top = [(x, 100 * p.val_pgd_acc) for x, (v, p) in zip(xs, vals) if p.run_id in chosen]
            if top:
                series.append(_Series("leaderboard", top, "#000", style="ring", size=5.5))
            svg = _svg_plot("sensitivity", name, series, _Axis(name, log=log, categories=cats),
                            _Axis("val PGD acc (%)", clamp=PCT), width=240, height=190, legend="bottom",
                            attrs={"data-method": method, "data-param": name})
            out.append(svg)
        out.append("</div>")
    out.append("</details>")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# A small SVG plotter: linear, log or categorical x; markers, lines, step lines; a legend.


@dataclass
class _Series:
    label: str | None
    """Legend text; ``None`` for no legend entry. A series with a label and no points is legend-only."""
    xy: list[tuple[float, float]]
    color: str
    style: str = "dot"
    """Markers ``dot``, ``ring``, ``cross``, ``big`` (outlined); lines ``line`` (with dots), ``step``,
    ``dash``, ``dot-line``."""
    size: float = 3.0
    tips: list[str] | None = None
    """Hover text per point (SVG ``<title>``)."""
    texts: list[str] | None = None
    """A label drawn beside each point."""


@dataclass
class _Axis:
    label: str
    log: bool = False
    categories: list[str] | None = None
    lo: float | None = None
    """Forced bounds: the axis always includes them (``lo=0``)."""
    hi: float | None = None
    clamp: tuple[float, float] | None = None
    """Hard limits the padding around the data may not cross (accuracies: 0 to 100)."""
    ticks: list[tuple[float, str]] = field(default_factory=list)

    def fit(self, values: list[float]) -> tuple[float, float]:
        """Choose the domain (in log10 units for a log axis) and the ticks."""
        if self.categories is not None:
            n = len(self.categories)
            self.ticks = [(float(k), _short(c, 10)) for k, c in enumerate(self.categories)]
            return -0.5, n - 0.5
        vs = [v for v in values if math.isfinite(v) and (v > 0 or not self.log)]
        vs += [v for v in (self.lo, self.hi) if v is not None]
        if self.log:
            a, b = (math.log10(min(vs)), math.log10(max(vs))) if vs else (0.0, 1.0)
            pad = max(b - a, 0.3) * 0.06
            a, b = a - pad, b + pad
            self.ticks = _log_ticks(a, b)
            return a, b
        lo, hi = (min(vs), max(vs)) if vs else (0.0, 1.0)
        if hi - lo < 1e-12:
            lo, hi = lo - max(abs(lo) * 0.1, 1.0), hi + max(abs(hi) * 0.1, 1.0)
        pad = (hi - lo) * 0.06
        a, b = lo - pad, hi + pad
        # Pad, but not past a clamp or a forced bound the data itself does not cross.
        for bound in (self.clamp[0] if self.clamp else None, self.lo):
            if bound is not None and min(vs, default=bound) >= bound:
                a = max(a, bound)
        for bound in (self.clamp[1] if self.clamp else None, self.hi):
            if bound is not None and max(vs, default=bound) <= bound:
                b = min(b, bound)
        self.ticks = [(v, f"{v:.6g}") for v in _nice_ticks(a, b)]
        return a, b


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw * (1 - 1e-9))
    return [round(k * step, 12) for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]


def _log_ticks(a: float, b: float) -> list[tuple[float, str]]:
    """Ticks in log10 units: the decades, or 1-2-5 within them when fewer than two decades show."""
    for mults in ((1,), (1, 2, 5), (1, 2, 3, 4, 5, 6, 7, 8, 9)):
        ticks = [math.log10(m) + d for d in range(math.floor(a), math.ceil(b) + 1) for m in mults]
        ticks = [x for x in ticks if a <= x <= b]
        if len(ticks) >= 3 or mults[-1] == 9:
            return [(x, f"{10 ** x:.3g}") for x in ticks]
    return []


_FONT_W = 6.2  # average glyph width (px) at 11px in a sans-serif: enough to size the legend


def _svg_plot(kind: str, title: str, series: list[_Series], xaxis: _Axis, yaxis: _Axis, *,
              width: int = 400, height: int = 300, legend: str = "right", empty: str = "no data",
              attrs: dict[str, str] | None = None) -> str:
    """An ``<svg class="plot" data-plot=kind>`` with axes, ticks, labels, a legend and the series."""
    series = [_drawable(s, xaxis.log, yaxis.log) for s in series]
    entries = _unique_by_label(s for s in series if s.label)
    left, top, right, bottom = 52, 26, 12, 40
    if legend == "right" and entries:
        right += min(170, 26 + _FONT_W * max(len(_short(s.label, 24)) for s in entries))
    spots = _legend_flow(entries, width) if legend == "bottom" else []
    if spots:
        bottom += 15 * (1 + max(r for _, r in spots))
    pw, ph = width - left - right, height - top - bottom
    xs = [x for s in series for x, _ in s.xy]
    ys = [y for s in series for _, y in s.xy]
    x0, x1 = xaxis.fit([x for x in xs])
    y0, y1 = yaxis.fit(ys)

    def px(x: float) -> float:
        v = math.log10(x) if xaxis.log else x
        return left + (v - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        v = math.log10(y) if yaxis.log else y
        return top + ph - (v - y0) / (y1 - y0) * ph

    extra = "".join(f' {k}="{_e(v)}"' for k, v in (attrs or {}).items())
    out = [f'<svg class="plot" data-plot="{kind}"{extra} viewBox="0 0 {width} {height}" width="{width}" '
           f'height="{height}" role="img" aria-label="{_e(title)}">',
           f'<text x="{left}" y="16" font-size="12.5" font-weight="600">{_e(_short(title, 60))}</text>',
           f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="#fff" stroke="#ccc"/>']
    for v, label in xaxis.ticks:
        x = left + (v - x0) / (x1 - x0) * pw
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#eee"/>'
                   f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#666"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 15}" font-size="10" text-anchor="middle">{_e(label)}</text>')
    for v, label in yaxis.ticks:
        y = top + ph - (v - y0) / (y1 - y0) * ph
        out.append(f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left + pw}" y2="{y:.1f}" stroke="#eee"/>'
                   f'<line x1="{left - 4}" y1="{y:.1f}" x2="{left}" y2="{y:.1f}" stroke="#666"/>'
                   f'<text x="{left - 6}" y="{y + 3.5:.1f}" font-size="10" text-anchor="end">{_e(label)}</text>')
    out.append(f'<line x1="{left}" y1="{top + ph}" x2="{left + pw}" y2="{top + ph}" stroke="#666"/>'
               f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + ph}" stroke="#666"/>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph + 30}" font-size="11" text-anchor="middle">'
               f'{_e(_short(xaxis.label, 48))}{" (log)" if xaxis.log else ""}</text>')
    out.append(f'<text transform="translate(13 {top + ph / 2:.1f}) rotate(-90)" font-size="11" '
               f'text-anchor="middle">{_e(yaxis.label)}</text>')
    if not xs:
        out.append(f'<text x="{left + pw / 2:.1f}" y="{top + ph / 2:.1f}" font-size="12" fill="#888" '
                   f'text-anchor="middle">{_e(empty)}</text>')
    # Lines first, markers on top, labels last so that they stay readable.
    for s in sorted(series, key=lambda s: s.style not in ("step", "line", "dash", "dot-line")):
        pts = [(px(x), py(y)) for x, y in s.xy]
        if s.style in ("step", "line", "dash", "dot-line") and len(pts) >= 2:
            dash = {"dash": ' stroke-dasharray="6 4"', "dot-line": ' stroke-dasharray="2 3"'}.get(s.style, "")
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
            out.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" stroke-width="1.8"{dash}/>')
        if s.style in ("step", "dash", "dot-line"):
            continue
        for k, (x, y) in enumerate(pts):
            tip = f"<title>{_e(s.tips[k])}</title>" if s.tips and k < len(s.tips) else ""
            out.append(_marker("dot" if s.style == "line" else s.style, x, y, s.color, s.size, tip))
    labels = [(px(x), py(y), _short(text, 20)) for s in series for (x, y), text in zip(s.xy, s.texts or ())]
    out += _place_labels(labels, (left, top, left + pw, top + ph))
    if legend == "right":
        lx, ly = left + pw + 14, top + 8
        for k, s in enumerate(entries):
            out.append(_legend_entry(s, lx, ly + 16 * k))
    else:
        for s, (x, r) in zip(entries, spots):
            out.append(_legend_entry(s, x, top + ph + 46 + 15 * r, font=10))
    out.append("</svg>")
    return "\n".join(out)


def _drawable(s: _Series, xlog: bool, ylog: bool) -> _Series:
    """The series without the points an axis cannot show (NaN, infinities, and values <= 0 on a log axis)."""
    def ok(v: float, log: bool) -> bool:
        return math.isfinite(v) and (v > 0 or not log)

    keep = [k for k, (x, y) in enumerate(s.xy) if ok(x, xlog) and ok(y, ylog)]
    if len(keep) == len(s.xy):
        return s
    def pick(items: list) -> list:
        return [items[k] for k in keep if k < len(items)]

    return _Series(s.label, pick(s.xy), s.color, s.style, s.size, s.tips and pick(s.tips), s.texts and pick(s.texts))


def _place_labels(labels: list[tuple[float, float, str]], box: tuple[float, float, float, float]) -> list[str]:
    """Point labels, each at the first of a few spots beside its point that overlaps no label before it."""
    # Boxes as (left, baseline, width, height); the labelled markers are obstacles too.
    placed: list[tuple[float, float, float, float]] = [(x - 7, y + 7, 14, 14) for x, y, _ in labels]
    out = []
    for x, y, text in sorted(labels, key=lambda t: t[1]):
        w, h = _FONT_W * 0.95 * len(text), 11.0
        spots = [(x + 8, y - 5), (x + 8, y + 13), (x - 8 - w, y - 5), (x - 8 - w, y + 13), (x + 8, y + 4),
                 (x - 8 - w, y + 4), (x - w / 2, y - 10), (x - w / 2, y + 19)]
        inside = [(a, b) for a, b in spots if a >= box[0] and a + w <= box[2] and b - h >= box[1] and b <= box[3]]
        free = [(a, b) for a, b in inside or spots
                if all(a + w < c or c + d < a or b < f - g or f < b - h for c, f, d, g in placed)]
        a, b = (free or inside or spots)[0]
        placed.append((a, b, w, h))
        out.append(f'<text class="halo" x="{a:.1f}" y="{b:.1f}" font-size="10.5">{_e(text)}</text>')
    return out


def _legend_flow(entries: list[_Series], width: int) -> list[tuple[float, int]]:
    """(x, row) of each legend entry laid out left to right under the plot, wrapping at ``width``."""
    spots, x, row = [], 10.0, 0
    for s in entries:
        w = 26 + _FONT_W * 0.9 * len(_short(s.label, 24))
        if x + w > width and x > 10:
            x, row = 10.0, row + 1
        spots.append((x, row))
        x += w
    return spots


def _marker(style: str, x: float, y: float, color: str, size: float, tip: str = "") -> str:
    if style == "cross":
        d = size * 1.1
        return (f'<path d="M{x - d:.1f},{y - d:.1f}L{x + d:.1f},{y + d:.1f}M{x - d:.1f},{y + d:.1f}L{x + d:.1f},'
                f'{y - d:.1f}" stroke="{color}" stroke-width="1.6">{tip}</path>')
    if style == "ring":
        return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size}" fill="none" stroke="{color}" '
                f'stroke-width="1.4">{tip}</circle>')
    if style == "big":
        return (f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size + 3}" fill="{color}" stroke="#111" '
                f'stroke-width="1.6">{tip}</circle>')
    return f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{size}" fill="{color}" fill-opacity="0.75">{tip}</circle>'


def _legend_entry(s: _Series, x: float, y: float, font: float = 11) -> str:
    if s.style in ("step", "line", "dash", "dot-line"):
        dash = {"dash": ' stroke-dasharray="6 4"', "dot-line": ' stroke-dasharray="2 3"'}.get(s.style, "")
        swatch = f'<line x1="{x}" y1="{y}" x2="{x + 16}" y2="{y}" stroke="{s.color}" stroke-width="2"{dash}/>'
    else:
        swatch = _marker(s.style, x + 8, y, s.color, min(s.size, 3.5) if s.style != "big" else 2.0)
    return (swatch + f'<text x="{x + 20}" y="{y + 3.5}" font-size="{font}">'
            f'<title>{_e(s.label)}</title>{_e(_short(s.label, 24))}</text>')


def _figure(svg: str, caption: str) -> str:
    return f"<figure>{svg}<figcaption>{_e(caption)}</figcaption></figure>"


# ----------------------------------------------------------------------------------------------------
# Small helpers.


def _e(text: object) -> str:
    """Escape untrusted text for HTML or SVG text and (double-quoted) attributes, control characters dropped."""
    return html.escape(render._printable(str(text)), quote=True)


def _safe_url(url: str | None) -> str | None:
    """The URL when it is an absolute http(s) link, else ``None`` (no ``javascript:`` or ``data:``)."""
    if not url:
        return None
    url = url.strip()
    try:
        parsed = urlparse(url)
    except ValueError:
        return None
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
        return None
    if any(c.isspace() or ord(c) < 32 or c in "\"'<>`\\" for c in url):
        return None
    return url


def _float(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _short(text: str, n: int) -> str:
    text = render._printable(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def _unique_by_label(series: Iterable[_Series]) -> list[_Series]:
    seen: dict[str, _Series] = {}
    for s in series:
        seen.setdefault(s.label, s)
    return list(seen.values())


def _labels(rows: list[Row]) -> dict[str, str]:
    """A legend label per row: its method, with the architecture when the method appears twice."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.method] = counts.get(r.method, 0) + 1
    return {r.run_id: r.method if counts[r.method] == 1 else f"{r.method} · {r.arch}" for r in rows}


def _colors(methods: Iterable[str]) -> dict[str, str]:
    return {m: PALETTE[k % len(PALETTE)] for k, m in enumerate(sorted(set(methods)))}
