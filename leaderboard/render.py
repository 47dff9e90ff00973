# SPDX-License-Identifier: Apache-2.0
"""Render leaderboard tables as Markdown, CSV and terminal text.

This is the only place numbers are formatted. Every string that comes from MLflow (method, arch,
parameter values, flags) is user input, so each output format escapes it its own way: Markdown
escapes, CSV neutralises spreadsheet formulas, terminal text drops control characters (which
could otherwise smuggle ANSI escape sequences).
"""

from __future__ import annotations

import csv
import io
import re
import unicodedata
from collections.abc import Callable

from leaderboard.schema import Row, Table

EMPTY_MESSAGE = "No evaluated trial runs found: nothing to rank yet."
RULES = (
    "One table per (dataset, norm, eps). Each row is the best trial of a (method, architecture) "
    "by validation PGD accuracy, never by test numbers; rows are ranked by test AutoAttack accuracy. "
    "Accuracies in %. Search cost: trials run and epochs trained over all trials of the search."
)

# Display columns shared by Markdown and terminal text: (header, cell text for (rank, row)).
COLUMNS: list[tuple[str, Callable[[int, Row], str]]] = [
    ("Rank", lambda i, r: str(i)),
    ("Method", lambda i, r: r.method),
    ("Clean", lambda i, r: _pct(r.clean_acc)),
    ("PGD", lambda i, r: _pct(r.pgd_acc)),
    ("AutoAttack", lambda i, r: _pct(r.aa_acc)),
    ("Certified", lambda i, r: _pct(r.certified_acc)),
    ("Arch", lambda i, r: r.arch),
    ("Epochs", lambda i, r: _num(r.epochs)),
    ("Hyperparameters", lambda i, r: ", ".join(f"{n}={_param(v)}" for n, v in r.hparams)),
    ("Trials", lambda i, r: _num(r.trials)),
    ("Trial-epochs", lambda i, r: _num(r.trial_epochs)),
    ("n_ex", lambda i, r: _num(r.n_ex)),
    ("Flags", lambda i, r: ", ".join(r.flags)),
    ("Run", lambda i, r: r.run_id),
]

# CSV: the display columns plus the table key and provenance, numbers at full precision.
CSV_COLUMNS: list[tuple[str, Callable[[int, Row], object]]] = [
    ("dataset", lambda i, r: r.dataset),
    ("norm", lambda i, r: r.norm),
    ("eps", lambda i, r: r.eps),
    ("rank", lambda i, r: i),
    ("method", lambda i, r: r.method),
    ("clean_acc", lambda i, r: r.clean_acc),
    ("pgd_acc", lambda i, r: r.pgd_acc),
    ("aa_acc", lambda i, r: r.aa_acc),
    ("certified_acc", lambda i, r: r.certified_acc),
    ("arch", lambda i, r: r.arch),
    ("epochs", lambda i, r: r.epochs),
    ("hyperparameters", lambda i, r: ", ".join(f"{n}={v}" for n, v in r.hparams)),
    ("trials", lambda i, r: r.trials),
    ("trial_epochs", lambda i, r: r.trial_epochs),
    ("n_ex", lambda i, r: r.n_ex),
    ("flags", lambda i, r: ",".join(r.flags)),
    ("run_id", lambda i, r: r.run_id),
    ("experiment_id", lambda i, r: r.experiment_id),
]


def table_title(t: Table) -> str:
    """``digits · Linf · eps=0.2`` (unescaped)."""
    return f"{t.dataset} · {t.norm} · eps={_eps(t.eps)}"


def to_markdown(tables: list[Table], title: str = "otarena leaderboard", run_url: str | None = None) -> str:
    """GitHub-flavoured Markdown: a title, the rules, one section and table per threat model.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        title: The page heading (escaped like any other text).
        run_url: Base URL of an MLflow UI (``http://host:5000``); when given, run ids link to it.
    """
    out = [f"# {md_escape(title)}", "", RULES, ""]
    if not tables:
        out += [EMPTY_MESSAGE, ""]
    for t in tables:
        out += [f"## {md_escape(table_title(t))}", ""]
        out.append("| " + " | ".join(h for h, _ in COLUMNS) + " |")
        out.append("|" + "|".join("---:" if h in _NUMERIC else "---" for h, _ in COLUMNS) + "|")
        for i, row in enumerate(t.rows, 1):
            cells = [md_escape(cell(i, row)) for _, cell in COLUMNS]
            if run_url:
                link = f"{run_url.rstrip('/')}/#/experiments/{row.experiment_id}/runs/{row.run_id}"
                cells[-1] = f"[{cells[-1]}]({link})"
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def to_csv(tables: list[Table]) -> str:
    """One CSV row per leaderboard row; accuracies as fractions, floats at full precision."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([name for name, _ in CSV_COLUMNS])
    for t in tables:
        for i, row in enumerate(t.rows, 1):
            writer.writerow([_csv_cell(get(i, row)) for _, get in CSV_COLUMNS])
    return buf.getvalue()


def format_text(tables: list[Table]) -> str:
    """Aligned plain-text tables for a terminal, in the Markdown pipe-table shape."""
    if not tables:
        return EMPTY_MESSAGE
    blocks = []
    for t in tables:
        grid = [[h for h, _ in COLUMNS]]
        grid += [[_printable(cell(i, row)) for _, cell in COLUMNS] for i, row in enumerate(t.rows, 1)]
        widths = [max(len(line[j]) for line in grid) for j in range(len(COLUMNS))]
        pad = [str.rjust if h in _NUMERIC else str.ljust for h, _ in COLUMNS]
        lines = ["| " + " | ".join(p(s, w) for p, s, w in zip(pad, line, widths)) + " |" for line in grid]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append(_printable(table_title(t)) + "\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# Characters with a meaning in Markdown or inline HTML. `&`, `<` and `>` become entities so that no
# HTML tag can form; the rest are backslash-escaped (`\|` is how GFM keeps a pipe inside a cell).
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_SPECIAL = re.compile(r"([\\|`*_\[\]])")
_NUMERIC = {"Rank", "Clean", "PGD", "AutoAttack", "Epochs", "Trials", "Trial-epochs", "n_ex"}


def md_escape(text: str) -> str:
    """Escape untrusted text for a Markdown table cell or heading."""
    text = _MD_SPECIAL.sub(r"\\\1", _printable(text))
    return "".join(_MD_ENTITIES.get(c, c) for c in text)


def _printable(text: str) -> str:
    """Replace control and format characters (newlines, ANSI escapes, bidi overrides) by a space."""
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in str(text))


def _csv_cell(value: object) -> object:
    """None -> empty; floats as repr (full precision); text printable and never a formula."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        value = _printable(value)
        if value[:1] in ("=", "+", "-", "@"):
            return "'" + value  # OWASP CSV-injection advice: a spreadsheet must not evaluate it
    return value


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f}"


def _num(x: float | None) -> str:
    """Counts (epochs, trials, n_ex) are logged as MLflow float metrics; show them as integers."""
    if x is None:
        return "–"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _param(value: str) -> str:
    """A parameter as logged is a string; shorten long floats (0.0031622776601683794 -> 0.003162)."""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


def _eps(eps: float) -> str:
    """Short eps: ``0.2``, or ``8/255`` for the usual pixel-step values that have long decimals."""
    k = eps * 255
    if len(repr(eps)) > 8 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return repr(eps)
