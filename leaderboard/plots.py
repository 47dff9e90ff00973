# SPDX-License-Identifier: Apache-2.0
"""Every plot otarena draws, with matplotlib: the site's inline SVG and the evaluation's eps-sweep PNG.

Per leaderboard table the site shows:

1. the Pareto front of clean against AutoAttack accuracy over every evaluated trial;
2. robust (PGD) accuracy against eps for the rows that logged an eps sweep (:func:`draw_eps_sweep`,
   which also draws the PNG that ``search/evaluation.py`` writes beside a report);
3. the search progress: best validation robust accuracy against trial-epochs spent, with each search's
   rank fidelity per ASHA rung (:func:`fidelity_text`);
4. hyperparameter sensitivity: validation robust accuracy against each searched value, per method, beside
   which knobs matter: the importance of each searched value for the search's selection metric
   (:func:`importance_plot`);
5. the cost: AutoAttack accuracy against each entry's training device-hours, with the Pareto front of cost
   against robustness (:func:`cost_plot`).

Where a search had several objectives, the table also shows each search's trials on the validation trade-off
(clean against PGD accuracy) with its Pareto set joined (:func:`validation_pareto_plot`). Where the final
evaluation scored a search's paper-default trial, the table also shows what tuning bought: an
arrow per entry from the default to the tuned trial on the clean-vs-AutoAttack plane (:func:`tuning_plot`).

The figures become inline SVG the page's Content-Security-Policy allows in :mod:`leaderboard.svg`.

matplotlib is imported on first use: ``import leaderboard`` (and ``otarena --help``) stays fast.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from otarena.leaderboard import formatting as fmt
from otarena.leaderboard.schema import Fidelity, Importance, Row, Table, TrialPoint
from otarena.leaderboard.svg import RC, Series, finish, new_figure, plot_series, to_svg

if TYPE_CHECKING:
    from matplotlib.axes import Axes

PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
           "#bcbd22", "#7f7f7f")
"""Method colours (matplotlib's tab10), assigned by sorted method name so they agree across plots."""


def colors(methods: Iterable[str]) -> dict[str, str]:
    """One colour per method, by sorted name."""
    return {m: PALETTE[k % len(PALETTE)] for k, m in enumerate(sorted(set(methods)))}


def _percent_axis(ax: Axes, which: str, values: list[float]) -> None:
    """An accuracy axis: at least 10 points wide around the data, padded, never past 0% or 100%."""
    finite = [v for v in values if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 100.0)
    widen = max(0.0, 10.0 - (hi - lo)) / 2
    pad = (hi - lo + 2 * widen) * 0.06
    (ax.set_xlim if which == "x" else ax.set_ylim)(max(0.0, lo - widen - pad), min(100.0, hi + widen + pad))


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", color="#888888")


# ----------------------------------------------------------------------------------------------------
# The eps sweep: one drawing for the site and for the evaluation's PNG


def draw_eps_sweep(ax: Axes, curves: list[Series], chance_bounds: Sequence[float], table_eps: float | None = None,
                   tips: list | None = None, bound_label: str = "chance bound") -> None:
    """Accuracy (%) against eps, with each chance bound dashed and the table's eps dotted.

    A curve that stays flat far above the chance bound as eps grows suggests gradient masking.
    """
    tips = [] if tips is None else tips
    plot_series(ax, curves, tips)
    bounds = sorted(set(chance_bounds))
    for b in bounds:
        label = bound_label if len(bounds) == 1 else f"{bound_label} {100 * b:.3g}%"
        ax.axhline(100 * b, color="#666666", linestyle="--", linewidth=1, label=label)
    if table_eps is not None:
        ax.axvline(table_eps, color="#aaaaaa", linestyle=":", linewidth=1.4, label=f"table eps ({fmt.eps(table_eps)})")
    ax.set_ylim(0, 100)


def eps_sweep_png(sweep: dict[str, Any], path: str, title: str = "") -> str:
    """The evaluation's eps sweep of one model as a PNG (``<report>.eps_sweep.png``); returns ``path``.

    Args:
        sweep: ``eps``, ``pgd_acc``, ``robust_acc`` (fractions), ``chance_bound``, ``steps`` and ``norm``.
    """
    import matplotlib

    with matplotlib.rc_context(RC):
        fig = new_figure(600, 408)
        ax = fig.add_subplot()
        curves = [Series(f"PGD-{sweep['steps']}", list(sweep["eps"]), [100 * a for a in sweep["pgd_acc"]], PALETTE[0],
                         line="-"),
                  Series("PGD + grey-image candidate", list(sweep["eps"]), [100 * a for a in sweep["robust_acc"]],
                         PALETTE[1], marker="s", line="--")]
        draw_eps_sweep(ax, curves, [sweep["chance_bound"]], bound_label="chance bound (largest class)")
        finish(ax, title or "Robust accuracy against eps", f"eps ({sweep['norm']}, [0, 1] pixels)",
               "robust accuracy (%)", legend="inside")
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    return path


# ----------------------------------------------------------------------------------------------------
# The site's plots, per table


def pareto_plot(t: Table, trials: list[TrialPoint], color: dict[str, str]) -> str:
    """Clean against AutoAttack accuracy of every evaluated trial, the front, and the leaderboard entries."""
    import matplotlib

    # Failed trials are no candidates (collect.is_candidate), so they do not shape the front either.
    pts = [p for p in trials if p.clean_acc is not None and p.aa_acc is not None and p.outcome != "failed"]
    rows = [r for r in t.rows if r.clean_acc is not None and r.aa_acc is not None]  # a PGD table's have no AA
    series = [Series(method, [100 * p.clean_acc for p in mine], [100 * p.aa_acc for p in mine], color[method],
                     size=4.5, tips=[f"{p.method} · {p.arch}\nclean {100 * p.clean_acc:.2f}, AA {100 * p.aa_acc:.2f}"
                                     f"\nrun {p.run_id}" for p in mine])
              for method in _unique(p.method for p in pts) for mine in [[p for p in pts if p.method == method]]]
    xy = [(100 * p.clean_acc, 100 * p.aa_acc) for p in pts] + [(100 * r.clean_acc, 100 * r.aa_acc) for r in rows]
    front = pareto_front(xy)
    if front:
        series.append(Series("Pareto front", *pareto_staircase(front), "#333333", marker="", line="-"))
    series += [Series(None, [100 * r.clean_acc], [100 * r.aa_acc], color[r.method], size=9,
                      tips=[f"leaderboard entry: {r.method} · {r.arch}\nclean {100 * r.clean_acc:.2f}, "
                            f"AA {100 * r.aa_acc:.2f}\nrun {r.run_name or r.run_id}"]) for r in rows]
    if rows:  # a neutral legend entry for the outlined markers, whatever their method's colour
        series.append(Series("leaderboard entry", [], [], "#ffffff", size=9))
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips: list = []
        plot_series(ax, series, tips)
        for line in ax.get_lines()[-len(rows) - 1:] if rows else []:
            line.set_markeredgecolor("#111111")
            line.set_markeredgewidth(1.4)
        for r in rows:
            ax.annotate(fmt.short(r.method, 16), (100 * r.clean_acc, 100 * r.aa_acc), xytext=(6, 4),
                        textcoords="offset points", fontsize=7.5)
        if xy:
            _percent_axis(ax, "x", [x for x, _ in xy])
            _percent_axis(ax, "y", [y for _, y in xy])
        else:
            # A table ranked by PGD has evaluated trials, none of them with AutoAttack to plot.
            _empty(ax, "no AutoAttack run: ranked by PGD" if t.ranking == "pgd_acc" else "no evaluated trials")
        finish(ax, "Clean vs AutoAttack accuracy", "clean accuracy (%)", "AutoAttack accuracy (%)")
    return to_svg(fig, "pareto", "Clean vs AutoAttack accuracy", tips)


def validation_pareto_plot(t: Table, trials: list[TrialPoint], color: dict[str, str]) -> str:
    """The searches' trade-off on validation: every completed trial's best-epoch clean against PGD accuracy, each
    multi-objective search's Pareto set (``otarena.pareto``) joined by its step line, and the leaderboard entries
    (black rings), chosen among them on validation by the rule the page states."""
    import matplotlib

    searches, keys, labels = _searches(t, [p for p in trials if p.outcome == "completed" and p.val_pgd_acc is not None
                                           and p.val_clean_acc is not None])
    pts = [p for key in keys for p in searches[key]]
    series = []
    for key in keys:
        mine = searches[key]
        label, front = labels[key], sorted((p for p in mine if p.pareto),
                                           key=lambda p: (p.val_clean_acc, -p.val_pgd_acc))
        series.append(Series(label, [100 * p.val_clean_acc for p in mine], [100 * p.val_pgd_acc for p in mine],
                             color[key[0]], size=4.5,
                             tips=[f"{label}{': Pareto set' if p.pareto else ''}\nval clean "
                                   f"{100 * p.val_clean_acc:.2f}, val PGD {100 * p.val_pgd_acc:.2f}\nrun {p.run_id}"
                                   for p in mine]))
        if front:
            xs, ys = pareto_staircase([(100 * p.val_clean_acc, 100 * p.val_pgd_acc) for p in front])
            series.append(Series(None, xs, ys, color[key[0]], marker="", line="-"))
    if any(p.pareto for p in pts):  # a neutral legend entry for the step lines, whatever their method's colour
        series.append(Series("Pareto set", [], [], "#555555", marker="", line="-"))
    chosen = [r for r in t.rows if r.val_pgd_acc is not None and r.val_clean_acc is not None]
    if chosen:
        series.append(Series("leaderboard", [100 * r.val_clean_acc for r in chosen],
                             [100 * r.val_pgd_acc for r in chosen], "#000000", marker="ring", size=8,
                             tips=[f"leaderboard entry: {r.method} · {r.arch}, chosen on validation by "
                                   f"{r.selection_rule or 'the highest val PGD accuracy'}\nrun {r.run_name or r.run_id}"
                                   for r in chosen]))
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips: list = []
        plot_series(ax, series, tips)
        xy = [(100 * p.val_clean_acc, 100 * p.val_pgd_acc) for p in pts]
        if xy:
            _percent_axis(ax, "x", [x for x, _ in xy])
            _percent_axis(ax, "y", [y for _, y in xy])
        else:
            _empty(ax, "no completed trials")
        finish(ax, "Validation trade-off: clean vs PGD", "val clean accuracy (%)", "val PGD accuracy (%)")
    return to_svg(fig, "validation-pareto", "Validation trade-off: clean vs PGD accuracy", tips)


def cost_plot(t: Table, color: dict[str, str]) -> str:
    """AutoAttack accuracy of each entry against its configuration's training device-hours (log scale), with the
    Pareto front of cost against robustness: the entries no other entry beats with less training and more
    AutoAttack accuracy."""
    import matplotlib

    rows = [r for r in t.rows if r.aa_acc is not None and r.train_device_hours and r.train_device_hours > 0]
    series = [Series(method, [r.train_device_hours for r in mine], [100 * r.aa_acc for r in mine], color[method],
                     size=7, tips=[f"{r.method} · {r.arch}\nAA {100 * r.aa_acc:.2f}, training "
                                   f"{fmt.hours(r.train_device_hours)} device-hours"
                                   + (f" ({r.epoch_device_s:.3g} device-s per epoch)" if r.epoch_device_s else "")
                                   + f"\nrun {r.run_name or r.run_id}" for r in mine])
              for method in _unique(r.method for r in rows) for mine in [[r for r in rows if r.method == method]]]
    # Less cost is better: the front of (-hours, accuracy), both to maximise, drawn back at +hours.
    front = pareto_front([(-r.train_device_hours, 100 * r.aa_acc) for r in rows])
    if front:
        xs, ys = pareto_staircase(front)
        series.append(Series("Pareto front", [-x for x in xs], ys, "#333333", marker="", line="-"))
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips: list = []
        plot_series(ax, series, tips)
        if rows:
            ax.set_xscale("log")
            _value_ticks(ax, [r.train_device_hours for r in rows], log=True)  # labels that never overlap
            _percent_axis(ax, "y", [100 * r.aa_acc for r in rows])
        else:
            _empty(ax, "no AutoAttack run: ranked by PGD" if t.ranking == "pgd_acc" else "no training cost logged")
        finish(ax, "AutoAttack accuracy vs training cost", "training device-hours (log)", "AutoAttack accuracy (%)")
    return to_svg(fig, "cost", "AutoAttack accuracy vs training cost", tips)


def pareto_front(xy: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both coordinates, by increasing x (so decreasing y)."""
    front: list[tuple[float, float]] = []
    for x, y in sorted(set(xy), key=lambda p: (-p[0], -p[1])):
        if not front or y > front[-1][1]:
            front.append((x, y))
    return front[::-1]


def pareto_staircase(front: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
    """The front's step line (x, y vertices): from each point across at its height, then down to the next.

    No trial off the front can lie on it: a point on a horizontal run (x, y_i), x_i < x < x_(i+1), or
    on a drop (x_(i+1), y), y_(i+1) < y < y_i, would be beaten on both axes by no front point, so it
    would be on the front itself. (Dropping first, then going across, would run through every trial
    that ties a front point's clean or AutoAttack accuracy, which few test images make common.)
    """
    xs, ys = [], []
    for k, (x, y) in enumerate(front):
        if k:
            xs.append(x)
            ys.append(front[k - 1][1])
        xs.append(x)
        ys.append(y)
    return xs, ys


def eps_plot(t: Table, color: dict[str, str]) -> str:
    """PGD accuracy of each entry at growing radii (tag ``otarena.eps_sweep``)."""
    import matplotlib

    rows = [r for r in t.rows if r.eps_sweep and r.eps_sweep.eps]
    labels = _labels(rows)
    curves = [Series(labels[r.run_id], list(r.eps_sweep.eps), [100 * a for a in r.eps_sweep.pgd_acc], color[r.method],
                     line="-", size=3.5, tips=[f"{labels[r.run_id]}\neps {e:.4g}: PGD {100 * a:.2f}%"
                                               for e, a in zip(r.eps_sweep.eps, r.eps_sweep.pgd_acc)])
              for r in rows]
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips: list = []
        if rows:
            draw_eps_sweep(ax, curves, [r.eps_sweep.chance_bound for r in rows], t.eps, tips)
        else:
            ax.set_ylim(0, 100)
            _empty(ax, "no eps sweep logged")
        finish(ax, "Robust accuracy vs eps", "eps", "PGD accuracy (%)")
    return to_svg(fig, "eps-sweep", "Robust accuracy vs eps", tips)


def tuning_plot(t: Table, color: dict[str, str]) -> str:
    """What tuning bought: per entry, an arrow on the clean-vs-robust plane from its search's paper-default trial
    (a ring) to the tuned, selected trial (a dot), both scored on the test split by the same protocol
    (:attr:`leaderboard.schema.Row.tuning`; AutoAttack, else PGD in a table ranked by PGD)."""
    import matplotlib

    rows = [r for r in t.rows if r.tuning is not None and r.clean_acc is not None and r.default_clean_acc is not None]
    attack = "PGD" if rows and rows[0].tuning[0] == "pgd_acc" else "AutoAttack"
    pairs = {r.run_id: ((100 * r.default_clean_acc, 100 * r.tuning[1]), (100 * r.clean_acc, 100 * r.tuning[2]))
             for r in rows}
    series = []
    for r in rows:
        (dx, dy), (tx, ty) = pairs[r.run_id]
        gain = f"{ty - dy:+.2f} points of {attack}"
        series += [Series(None, [dx], [dy], color[r.method], marker="ring", size=7,
                          tips=[f"{r.method} · {r.arch}: paper defaults\nclean {dx:.2f}, {attack} {dy:.2f}\n"
                                f"tuning bought {gain}\nrun {r.default_run_id}"]),
                   Series(r.method, [tx], [ty], color[r.method], size=7,
                          tips=[f"{r.method} · {r.arch}: tuned\nclean {tx:.2f}, {attack} {ty:.2f}\n"
                                f"tuning bought {gain}\nrun {r.run_name or r.run_id}"])]
    if rows:  # a neutral legend entry for the rings, whatever their method's colour
        series.append(Series("paper defaults", [], [], "#555555", marker="ring", size=7))
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips: list = []
        for r in rows:
            start, end = pairs[r.run_id]
            ax.annotate("", xy=end, xytext=start, arrowprops={"arrowstyle": "->", "color": color[r.method], "lw": 1.4,
                                                              "shrinkA": 4, "shrinkB": 4})
        plot_series(ax, series, tips)
        if rows:
            _percent_axis(ax, "x", [x for a, b in pairs.values() for x, _ in (a, b)])
            _percent_axis(ax, "y", [y for a, b in pairs.values() for _, y in (a, b)])
        else:
            _empty(ax, "no paper-default trial evaluated")
        finish(ax, "Paper defaults → tuned", "clean accuracy (%)", f"{attack} accuracy (%)")
    return to_svg(fig, "tuning", "Paper defaults to tuned", tips)


def progress_plot(t: Table, trials: list[TrialPoint], color: dict[str, str], fidelity: Sequence[Fidelity] = ()) -> str:
    """Best validation PGD accuracy so far against the trial-epochs spent, one step line per search.

    A search's legend entry ends with its rank fidelity at each rung (ρ, "–" where it has none);
    :func:`fidelity_text` says what the numbers are.
    """
    import matplotlib

    searches, keys, labels = _searches(t, trials)
    series = []
    for key in keys:
        rhos = [_rho_text(f.rho) for f in fidelity if f.parent_id == key[1]]
        method, label = key[0], labels[key] + (f" (ρ {' / '.join(rhos)})" if rhos else "")
        spent, best, xs, ys, marks, tips = 0.0, None, [], [], [], []
        for p in sorted(searches[key], key=lambda p: (p.end_time is None, p.end_time or 0, p.run_id)):
            spent += p.epochs or 0.0
            if p.val_pgd_acc is not None and (best is None or p.val_pgd_acc > best):
                best = p.val_pgd_acc
                marks.append((spent, 100 * best))
                tips.append(f"{label}\nnew best {100 * best:.2f}% after {spent:g} trial-epochs\nrun {p.run_id}")
            if best is not None:
                xs.append(spent)
                ys.append(100 * best)
        if xs:
            series.append(Series(label, xs, ys, color[method], marker="", line="steps-post"))
            series.append(Series(None, [x for x, _ in marks], [y for _, y in marks], color[method], size=4, tips=tips))
    with matplotlib.rc_context(RC):
        fig = new_figure(400, 300)
        ax = fig.add_subplot()
        tips_out: list = []
        plot_series(ax, series, tips_out)
        ys = [y for s in series for y in s.y]
        if ys:
            _percent_axis(ax, "y", ys)
            ax.set_xlim(left=0)
        else:
            _empty(ax, "no trials logged")
        finish(ax, "Search progress", "cumulative trial-epochs", "best val PGD accuracy (%)")
    return to_svg(fig, "progress", "Search progress", tips_out)


FIDELITY_WARN_BELOW = 0.5
"""Below it, a rung ranks the trials too unlike their final result to prune on (the search warns too)."""


def _rho_text(rho: float | None) -> str:
    return "–" if rho is None else f"{rho:+.2f}"


def fidelity_text(t: Table, trials: list[TrialPoint], fidelity: Sequence[Fidelity]) -> str:
    """The rank fidelity of the table's searches, in words, for the progress plot's caption ("" without any)."""
    _, keys, labels = _searches(t, trials)
    parts = []
    for key in keys:
        rungs = []
        for f in (f for f in fidelity if f.parent_id == key[1]):
            text = f"epoch {f.epoch} {_rho_text(f.rho)}" if f.rho is not None else f"epoch {f.epoch} none ({f.reason})"
            if f.rho is not None and f.rho < FIDELITY_WARN_BELOW:
                text += f" (below {FIDELITY_WARN_BELOW}: pruning there may drop the best trials)"
            rungs.append(text)
        if rungs:
            parts.append(f"{labels[key]}: {', '.join(rungs)}")
    if not parts:
        return ""
    return ("Rank fidelity (ρ in the legend): per ASHA rung, Spearman's rho between the trials' validation PGD "
            "accuracy at that epoch and their best over the whole run, among the trials that reached max_epochs; "
            "near 1, pruning there keeps the trials that end best. " + "; ".join(parts) + ".")


def _searches(t: Table, trials: list[TrialPoint]) -> tuple[dict, list[tuple[str, str]], dict]:
    """The table's searches: their trials by (method, parent run), those keys in table order, and their labels."""
    searches: dict[tuple[str, str], list[TrialPoint]] = {}
    methods = _unique(r.method for r in t.rows)
    for p in trials:
        if p.method in methods:
            searches.setdefault((p.method, p.parent_id), []).append(p)
    keys = sorted(searches, key=lambda k: (methods.index(k[0]), k[1]))
    return searches, keys, _search_labels(keys, searches)


def log_scale_params(trials: Iterable[TrialPoint]) -> set[str]:
    """The hyperparameters to plot on a log axis: positive values spanning more than a decade, over all ``trials``.

    Decided once per name over the whole page, so that ``lr``, searched on a log scale, gets a log
    axis for every method and table, also where one method's few trials span less than a decade.
    """
    values: dict[str, list[float | None]] = {}
    for p in trials:
        for name, value in p.hparams:
            values.setdefault(name, []).append(_float(value))
    return {name for name, xs in values.items()
            if all(x is not None and x > 0 for x in xs) and max(xs) / min(xs) > 10}


def sensitivity_plots(t: Table, trials: list[TrialPoint], color: dict[str, str],
                      log_axes: set[str] | None = None) -> list[tuple[str, list[str]]]:
    """Per method of the table: (method, one plot per searched hyperparameter) of validation PGD accuracy.

    Filled markers are completed trials, rings pruned ones, crosses failed ones; the black ring is
    the trial on the leaderboard. The hyperparameters in ``log_axes`` (default:
    :func:`log_scale_params` of ``trials``) are shown on a log axis.
    """
    import matplotlib

    log_axes = log_scale_params(trials) if log_axes is None else log_axes
    chosen = {r.run_id for r in t.rows}
    out = []
    for method in _unique(r.method for r in t.rows):
        pts = [p for p in trials if p.method == method and p.val_pgd_acc is not None]
        svgs = []
        for name in _unique(n for p in pts for n, _ in p.hparams):
            vals = [(v, p) for p in pts for n, v in p.hparams if n == name]
            nums = [_float(v) for v, _ in vals]
            numeric = all(x is not None for x in nums)
            cats = None if numeric else sorted({v for v, _ in vals})
            xs = nums if numeric else [float(cats.index(v)) for v, _ in vals]
            log = numeric and name in log_axes and min(xs) > 0
            series = []
            for outcome, marker in (("completed", "o"), ("pruned", "ring"), ("failed", "x")):
                sel = [(x, v, p) for x, (v, p) in zip(xs, vals)
                       if {"pruned": "ring", "failed": "x"}.get(p.outcome, "o") == marker]
                if sel:
                    series.append(Series(outcome, [x for x, _, _ in sel], [100 * p.val_pgd_acc for _, _, p in sel],
                                         color[method], marker=marker, size=3.5,
                                         tips=[f"{name} = {v}\nval PGD {100 * p.val_pgd_acc:.2f}% ({p.outcome or '?'})"
                                               f"\nrun {p.run_id}" for _, v, p in sel]))
            top = [(x, 100 * p.val_pgd_acc) for x, (v, p) in zip(xs, vals) if p.run_id in chosen]
            if top:
                series.append(Series("leaderboard", [x for x, _ in top], [y for _, y in top], "#000000",
                                     marker="ring", size=8))
            with matplotlib.rc_context(RC):
                fig = new_figure(250, 200)
                ax = fig.add_subplot()
                if log:
                    ax.set_xscale("log")
                tips: list = []
                plot_series(ax, series, tips)
                if cats is not None:
                    # As many characters as a category's share of the axis holds (~5.5 px each at 8.5 pt).
                    ax.set_xticks(range(len(cats)), [fmt.short(c, max(3, 34 // len(cats))) for c in cats])
                    ax.set_xlim(-0.5, len(cats) - 0.5)
                else:
                    _value_ticks(ax, xs, log)
                _percent_axis(ax, "y", [100 * p.val_pgd_acc for _, p in vals])
                # The note above the plots explains the markers: no legend in each small plot.
                finish(ax, name, name + (" (log)" if log else ""), "val PGD acc (%)", legend="none")
            svgs.append(to_svg(fig, "sensitivity", name, tips, attrs={"data-method": method, "data-param": name}))
        out.append((method, svgs))
    return out


def importance_plot(importance: Importance, color: str, label: str = "") -> str:
    """Which knobs matter for one search: a bar per searched hyperparameter, its share of the importance for the
    search's selection metric (``importance/<param>``), largest on top."""
    import matplotlib

    names = [fmt.short(name, 16) for name, _ in importance.values]
    shares = [100 * value for _, value in importance.values]
    with matplotlib.rc_context(RC):
        fig = new_figure(250, max(200, 82 + 18 * len(names)))
        ax = fig.add_subplot()
        ax.barh(range(len(names)), shares, color=color, height=0.6)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()  # the largest on top
        ax.set_xlim(0, 100)
        ax.grid(axis="y", visible=False)
        for k, share in enumerate(shares):
            ax.text(share + 2 if share < 70 else share - 2, k, f"{share:.0f}%", va="center",
                    ha="left" if share < 70 else "right", fontsize=7.5, color="#111111" if share < 70 else "#ffffff")
        finish(ax, "Which knobs matter" + (f": {label}" if label else ""), "share of importance (%)", "",
               legend="none")
        width = fig.get_size_inches()[0] * 96
        # Room for the names left of the bars (up to ~6.5 px a character at 8.5 pt), never less than the usual
        # margin; measuring the labels instead would cost more than drawing the plot.
        fig.subplots_adjust(left=max(50, 14 + 6.5 * max((len(n) for n in names), default=0)) / width)
    return to_svg(fig, "importance", "Which knobs matter", attrs={"data-method": importance.method})


# ----------------------------------------------------------------------------------------------------
# Small helpers


def _value_ticks(ax: Axes, xs: list[float], log: bool) -> None:
    """At most four x tick labels, short (``0.004``, not ``0.0040``), so that they never overlap on a small plot.

    On a log axis: decades, else half decades (1, 3), else 1-2-5 steps, else every mantissa, thinned
    to four: a range narrower than a decade still gets two labels or more.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullLocator

    # 0.001, not 10^-3: the page draws no mathtext (user text must never be read as TeX)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
    if not log:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4, min_n_ticks=2))
        return
    ax.xaxis.set_minor_locator(NullLocator())  # minor log ticks cost more than the whole plot
    lo, hi = min(xs), max(xs)
    ticks: list[float] = []
    for mantissas in ((1,), (1, 3), (1, 2, 5), range(1, 10)):
        ticks = [float(f"{m}e{e}") for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                 for m in mantissas if lo * (1 - 1e-9) <= m * 10.0**e <= hi * (1 + 1e-9)]
        if len(ticks) >= 2:
            break
    if len(ticks) < 2:  # within one mantissa step: the two ends, at two significant digits
        ticks = sorted({float(f"{lo:.2g}"), float(f"{hi:.2g}")})
    ax.xaxis.set_major_locator(FixedLocator(ticks[::math.ceil(len(ticks) / 4)]))


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


def _labels(rows: list[Row]) -> dict[str, str]:
    """A legend label per row: its method, with the architecture when the method appears twice."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.method] = counts.get(r.method, 0) + 1
    return {r.run_id: r.method if counts[r.method] == 1 else f"{r.method} · {r.arch}" for r in rows}


def _float(value: str) -> float | None:
    try:
        x = float(value)
    except ValueError:
        return None
    return x if math.isfinite(x) else None


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))
