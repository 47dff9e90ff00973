# SPDX-License-Identifier: Apache-2.0
"""The leaderboard's columns, declared once: every writer (Markdown, CSV, LaTeX, terminal, HTML) reads them.

A :class:`Column` says what a column is called in each format, what its cells show (plain text,
unescaped: each writer escapes it its own way), the value it sorts by and carries at full precision,
its alignment, and which formats show it. Adding a column is one entry in :data:`COLUMNS`; a writer
that wants a richer cell (a link, a badge, a LaTeX mark) keys it by the column's ``name``.

The order is RobustBench's: clean accuracy, then the ranking metric (AutoAttack) with its confidence
interval beside it, then the other attacks. The AutoAttack column is shown in every table, "–" where
it did not run, so that a table ranked by PGD says so in every row.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from otarena.leaderboard import claims, stats
from otarena.leaderboard import formatting as fmt
from otarena.leaderboard.schema import Row

Cell = Callable[[int, Row], object]
"""A function of (rank within the table, row)."""

MD, TEXT, TEX, HTML, CSV = "md", "text", "tex", "html", "csv"
TABLES = frozenset({MD, TEXT, TEX, HTML})
"""The formats that show columns as a table (CSV has its own fields: :attr:`Column.csv`)."""


@dataclass(frozen=True)
class Column:
    """One leaderboard column."""

    name: str
    """Identifier: the key of a writer's own cell for it, and the HTML cells' class."""
    header: str
    """The header in every format that does not override it in ``headers``."""
    text: Cell
    """The cell as plain, unescaped text."""
    value: Cell
    """What the column sorts by (a number, text, or ``None`` for missing: sorted last)."""
    align: str = "left"
    """``left``, ``right`` (numbers) or ``center`` (marks)."""
    formats: frozenset[str] = TABLES
    """The table formats that show it."""
    headers: dict[str, str] = field(default_factory=dict)
    """Per-format headers, e.g. ``{"html": ...}``."""
    csv: tuple[tuple[str, Cell], ...] = ()
    """The CSV fields it contributes, each a (field name, value at full precision) pair."""
    sort: str = ""
    """``number`` or ``text``; by default numbers for a right-aligned column, else text."""
    first: str = "ascending"
    """Direction of a first click on its HTML header: accuracies sort best first."""
    tip: str = ""
    """The HTML header's hover text."""
    metric: str | None = None
    """The test accuracy the column shows (``aa_acc``), whose CI the HTML cell gives on hover."""
    always: bool = False
    """Shown even in a table where no row has a value: AutoAttack's "–" says that it did not run."""
    hover: Cell | None = None
    """The HTML cell's hover text, where a row has more to say than its cell (a p-value, a reason)."""

    @property
    def numeric(self) -> bool:
        """Right-aligned columns hold numbers and sort as numbers."""
        return self.align == "right"

    @property
    def sorts_as_number(self) -> bool:
        return self.sort == "number" or (not self.sort and self.numeric)

    def header_in(self, fmt_name: str) -> str:
        return self.headers.get(fmt_name, self.header)


def columns(fmt_name: str, rows: Sequence[Row] | None = None) -> list[Column]:
    """The columns a table format shows, in order.

    Given a table's rows, a column with no value in any of them is left out (an Linf table has no
    certified accuracy: a column of dashes only widens it). The CSV keeps every field, so that its
    header is the same for every store.
    """
    shown = [c for c in COLUMNS if fmt_name in c.formats]
    if rows is None:
        return shown
    return [c for c in shown if c.always or any(c.value(i, r) is not None for i, r in enumerate(rows, 1))]


def csv_fields() -> list[tuple[str, Cell]]:
    """The CSV's fields, column by column: (name, value at full precision)."""
    return [f for c in COLUMNS for f in c.csv]


def _accuracy(name: str, header: str, metric: str, formats: frozenset[str] = TABLES, always: bool = False) -> Column:
    """A test accuracy: shown as its headline (mean ± std over seeds), in the CSV with its spread and CI."""
    prefix = metric.removesuffix("_acc")
    return Column(
        name, header, text=lambda i, r: fmt.accuracy(r, metric), value=lambda i, r: r.headline(metric),
        align="right", formats=formats, first="descending", metric=metric, always=always,
        tip=f"{header} accuracy (%); mean ± std over seeds when there are several",
        csv=((metric, lambda i, r: getattr(r, metric)),
             *((f"{metric}_{s}", lambda i, r, key=f"{metric}_{s}": getattr(r, key)) for s in ("mean", "std")),
             *((f"{prefix}_ci_{end}", lambda i, r, j=j: None if (ci := fmt.ci_of(r, metric)) is None else ci[j])
               for j, end in enumerate(("low", "high")))))


def _count(name: str, header: str, attr: str, tip: str = "", formats: frozenset[str] = TABLES - {TEX},
           csv: str | None = None) -> Column:
    """A count logged as a float metric (epochs, trials, n_ex): an integer in the CSV too."""
    return Column(name, header, text=lambda i, r: fmt.count(getattr(r, attr)), value=lambda i, r: getattr(r, attr),
                  align="right", formats=formats, tip=tip,
                  csv=((csv or attr, lambda i, r: fmt.integral(getattr(r, attr))),))


def _train_cost(r: Row) -> str:
    """``0.012 h, 4.3 s/epoch, 300 img/s``: the row's training device-hours, device-seconds per epoch, images per
    second."""
    if r.train_device_hours is None:
        return fmt.MISSING
    parts = [f"{fmt.hours(r.train_device_hours)} h"]
    if r.epoch_device_s is not None:
        parts.append(f"{r.epoch_device_s:.2g} s/epoch" if r.epoch_device_s < 10 else f"{r.epoch_device_s:.0f} s/epoch")
    if r.images_per_s is not None:
        parts.append(f"{r.images_per_s:,.0f} img/s")
    return ", ".join(parts)


def _hparams(r: Row, show: Callable[[str], str] = fmt.param) -> str:
    return ", ".join(f"{n}={show(v)}" for n, v in r.hparams)


def _flags(r: Row) -> str:
    reasons = dict(r.flag_reasons)
    return "; ".join(fmt.flag(f, reasons.get(f)) for f in fmt.flag_order(r))


def _reported(r: Row) -> claims.Claim | None:
    """The source paper's own number for this row's setting (:func:`leaderboard.claims.reported`)."""
    return claims.reported(r.dataset, r.norm, r.eps, r.method, r.arch)


def _reported_text(r: Row) -> str:
    c = _reported(r)
    return fmt.MISSING if c is None else f"{c.value:.2f} ({c.metric.describe()}, seed {c.paper[:3]} {c.table})"


def _reported_source(r: Row) -> str | None:
    c = _reported(r)
    where = None if c is None else ", ".join(filter(None, (c.paper, c.table, c.row, c.column)))
    return None if c is None else f"{where}: {c.metric.describe(how=True)}"


def _tied_text(r: Row) -> str:
    """The tied group's ranks (``1–3``), or why the row was not compared."""
    s = r.standing
    if s is None:
        return fmt.MISSING
    return s.ranks if s.group is not None else f"not compared ({s.why})"


def _tied_hover(r: Row) -> str:
    s = r.standing
    if s is None or s.group is None:
        return "" if s is None else s.reason
    tied = f"group {s.letter}, ranks {s.ranks}: not told apart at 5% (Holm)"
    if s.p_next is None:
        return tied
    return (f"{tied}; against the next compared row down, exact McNemar p = {stats.format_p(s.p_next)}, "
            f"Holm-adjusted {stats.format_p(s.p_next_holm)}")


def _tied_value(r: Row) -> int | None:
    """Sorts by group; a row not compared sorts after every group, and still shows the column (it says why)."""
    s = r.standing
    return None if s is None else s.group if s.group is not None else NOT_COMPARED_SORT


NOT_COMPARED_SORT = 10 ** 6


def _gain(r: Row) -> float | None:
    return None if r.tuning is None else r.tuning[2] - r.tuning[1]


def _tuning_text(r: Row) -> str:
    found = r.tuning
    if found is None:
        return fmt.MISSING
    metric, default, tuned = found
    p = "" if r.default_p is None else f", McNemar p {stats.format_p(r.default_p)}"
    text = f"{fmt.pct(default)} → {fmt.pct(tuned)} ({100 * (tuned - default):+.2f}{p})"
    if metric != "aa_acc":
        text += " PGD"
    if r.default_run_id == r.run_id:
        return text + ", the default itself"
    if r.default_epochs is not None and r.epochs is not None and r.default_epochs < r.epochs:
        text += f", default stopped at {fmt.count(r.default_epochs)} epochs"
    return text


def _table_key(name: str) -> Column:
    """dataset, norm, eps: each table's title in the other formats (with its ranking metric), a field of every
    CSV row."""
    return Column(name, name, text=lambda i, r: str(getattr(r, name)), value=lambda i, r: getattr(r, name),
                  formats=frozenset(), csv=((name, lambda i, r: getattr(r, name)),))


COLUMNS: tuple[Column, ...] = (
    _table_key("dataset"),
    _table_key("norm"),
    _table_key("eps"),
    # The table's ranking metric (schema.RANKINGS): with dataset, norm and eps, what a CSV row's rank is within.
    Column("ranked_by", "Ranked by", text=lambda i, r: r.ranking, value=lambda i, r: r.ranking, formats=frozenset(),
           csv=(("ranked_by", lambda i, r: r.ranking),)),
    Column("rank", "Rank", text=lambda i, r: str(i), value=lambda i, r: i, align="right",
           tip="by the table's ranking metric, named in its title (AutoAttack, else PGD or certified accuracy)",
           csv=(("rank", lambda i, r: i),)),
    # A row with a warning flag is marked at its method as well as at the flag, so that it stands
    # out when the table is scanned.
    Column("method", "Method", text=lambda i, r: f"{fmt.WARNING_MARK} {r.method}" if r.warnings else r.method,
           value=lambda i, r: r.method, csv=(("method", lambda i, r: r.method),)),
    # Statistically tied groups (leaderboard.stats): shown in tables where rows were compared.
    Column("tied", "Tied ranks", text=lambda i, r: _tied_text(r),
           value=lambda i, r: _tied_value(r), align="right", sort="number",
           hover=lambda i, r: _tied_hover(r),
           tip="the ranks of the rows this one is statistically tied with: each row is compared with the next one "
               "down by an exact McNemar test on their per-point outcomes under the ranking attack, Holm-corrected "
               "over the table's adjacent comparisons; tied when not significant at 5%. Rows on other test points "
               "are never compared",
           csv=(("tied_group", lambda i, r: r.standing.letter or None if r.standing else None),
                ("tied_ranks", lambda i, r: r.standing.ranks or None if r.standing else None),
                ("tied_p_next", lambda i, r: r.standing.p_next if r.standing else None),
                ("tied_p_next_holm", lambda i, r: r.standing.p_next_holm if r.standing else None),
                ("not_compared", lambda i, r: r.standing.reason or None if r.standing else None))),
    _accuracy("clean", "Clean", "clean_acc"),
    _accuracy("autoattack", "AutoAttack", "aa_acc", always=True),
    Column("aa_ci", "AA 95% CI", text=lambda i, r: fmt.interval(r.aa_ci),
           value=lambda i, r: r.aa_ci[0] if r.aa_ci else None, align="right", formats=frozenset({MD, HTML}),
           headers={HTML: "AA 95%\u00a0CI"}, first="descending",
           tip="Wilson interval of this trial's AutoAttack accuracy over its n_ex images: test-sample variance. The "
               "± beside it, in the AutoAttack column, is the std over training seeds: training variance"),
    # A randomized model's AutoAttack without EOT, beside the EOT number that ranks it: shown only in tables
    # where a row has one.
    Column("aa_deterministic", "AA no EOT", text=lambda i, r: fmt.pct(r.aa_acc_deterministic),
           value=lambda i, r: r.aa_acc_deterministic, align="right", formats=frozenset({MD, HTML}),
           first="descending",
           tip="a randomized model's AutoAttack cascade without Expectation over Transformation; its AutoAttack "
               "column is AutoAttack's rand version with EOT, which ranks the row"),
    _accuracy("pgd", "PGD", "pgd_acc"),
    _accuracy("certified", "Certified", "certified_acc"),
    # What tuning bought: shown only in tables where a row has a default evaluation.
    Column("tuning", "Default → tuned", text=lambda i, r: _tuning_text(r),
           value=lambda i, r: _gain(r), align="right",
           headers={TEX: "Default to tuned"}, first="descending",
           tip="the search's first trial, the method's paper defaults, scored on the test split by the same protocol "
               "as the tuned (selected) trial: its AutoAttack accuracy (else PGD), the tuned one's, and the "
               "difference in points, with the exact McNemar p-value of the two on the same test points; both this "
               "trial's own seed",
           csv=(("default_clean_acc", lambda i, r: r.default_clean_acc),
                ("default_aa_acc", lambda i, r: r.default_aa_acc),
                ("default_pgd_acc", lambda i, r: r.default_pgd_acc),
                ("tuning_gain", lambda i, r: _gain(r)), ("tuning_p", lambda i, r: r.default_p),
                ("default_run_id", lambda i, r: r.default_run_id or None))),
    # The paper's claim beside the measured numbers: shown only in tables where a row has one.
    Column("reported", "Reported", text=lambda i, r: _reported_text(r),
           value=lambda i, r: None if (c := _reported(r)) is None else c.value / 100, align="right",
           formats=frozenset({MD, HTML}), first="descending",
           tip="the source paper's own number for this dataset, norm, eps, method and architecture (claims/): "
               "AutoAttack, else its closest robust metric, measured by the paper's protocol",
           csv=(("reported", lambda i, r: None if (c := _reported(r)) is None else c.value / 100),
                ("reported_source", lambda i, r: _reported_source(r)))),
    Column("arch", "Arch", text=lambda i, r: r.arch, value=lambda i, r: r.arch, csv=(("arch", lambda i, r: r.arch),)),
    _count("epochs", "Epochs", "epochs", formats=TABLES),
    # Robust overfitting: shown only in tables where a row has it.
    Column("overfit_gap", "Best − last", text=lambda i, r: fmt.pct(r.overfit_gap), value=lambda i, r: r.overfit_gap,
           align="right", headers={TEX: "Best - last"},
           tip="robust overfitting: the best epoch's validation PGD accuracy minus the last epoch's, in points (the "
               "best epoch is what is scored); above final_eval.thresholds.robust_overfitting, the note "
               "robust-overfitting",
           csv=(("overfit_gap", lambda i, r: r.overfit_gap),)),
    Column("hyperparameters", "Hyperparameters", text=lambda i, r: _hparams(r),
           value=lambda i, r: _hparams(r, str), formats=TABLES - {TEX},
           tip="the searched hyperparameters of this trial", csv=(("hyperparameters", lambda i, r: _hparams(r, str)),)),
    _count("trials", "Trials", "trials", tip="search cost: trials run"),
    _count("trial_epochs", "Trial-epochs", "trial_epochs",
           tip="search cost: epochs trained over all trials of the search"),
    Column("device_hours", "Device hours", text=lambda i, r: fmt.hours(r.device_hours),
           value=lambda i, r: r.device_hours, align="right", formats=frozenset({HTML}),
           tip="search cost: device-hours (trial wall-clock hours times devices held)"),
    # The selected configuration's own training, beside what its whole search cost.
    Column("train_cost", "Train cost", text=lambda i, r: _train_cost(r), value=lambda i, r: r.train_device_hours,
           sort="number", first="ascending",  # text that may wrap: the board fits 1400 px
           tip="training cost of this configuration alone: device-hours over its epochs, device-seconds per epoch "
               "(validation included) and training images per second measured by its training loop",
           csv=(("train_device_hours", lambda i, r: r.train_device_hours),
                ("epoch_device_s", lambda i, r: r.epoch_device_s), ("images_per_s", lambda i, r: r.images_per_s))),
    _count("n_ex", "n_ex", "n_ex", tip="test images evaluated"),
    Column("seeds", "Seeds", text=lambda i, r: str(r.n_seeds), value=lambda i, r: r.n_seeds, align="right",
           formats=TABLES - {TEX}, first="descending", csv=(("n_seeds", lambda i, r: r.n_seeds),)),
    # Sorted by warnings, then notes; the CSV's reasons are sanitised before encoding (JSON would
    # keep an ANSI escape as "\u001b" for the reader to decode).
    Column("flags", "Flags", text=lambda i, r: _flags(r), value=lambda i, r: len(r.warnings) + len(r.notes) / 100,
           sort="number", first="descending",
           tip="⚠ warnings question the evaluation; the others are notes on precision",
           csv=(("flags", lambda i, r: ";".join(r.flags)),
                ("flag_reasons", lambda i, r: json.dumps({fmt.printable(f): fmt.printable(t)
                                                          for f, t in r.flag_reasons}, ensure_ascii=False)))),
    Column("run", "Run", text=lambda i, r: r.run_id, value=lambda i, r: r.run_name or r.run_id,
           formats=TABLES - {TEX}, csv=(("run_id", lambda i, r: r.run_id),
                                        ("experiment_id", lambda i, r: r.experiment_id))),
)
"""Every column, in the one order all formats use."""
