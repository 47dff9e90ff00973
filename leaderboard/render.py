# SPDX-License-Identifier: Apache-2.0
"""Render leaderboard tables as Markdown, CSV, LaTeX and terminal text.

The columns are :data:`leaderboard.columns.COLUMNS`; the numbers and the escaping come from
:mod:`leaderboard.formatting`. A writer adds only what its format needs beyond a column's plain text
(a Markdown link, a LaTeX mark), keyed by the column's name.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable

from otarena.leaderboard import formatting as fmt
from otarena.leaderboard.columns import MD, TEX, TEXT, Column, columns, csv_fields
from otarena.leaderboard.schema import Row, Table

LATEX_WARNING_MARK = r"$\dagger$"
"""Flags-column mark of a row with a warning flag (the evaluation may be unreliable)."""
LATEX_NOTE_MARK = r"$\ast$"
"""Flags-column mark of a row whose flags are all notes on statistical precision."""
_LATEX_CAPTION = (r"Test accuracy in \%, ranked by {ranking}; mean $\pm$ std over training seeds "
                  r"for a configuration trained with several.")
_LATEX_RANKINGS = {"aa_acc": "AutoAttack accuracy", "certified_acc": "certified accuracy",
                   "pgd_acc": r"PGD accuracy (no AutoAttack: not comparable with AutoAttack rankings)"}
_LATEX_LEGEND = f"{LATEX_WARNING_MARK}~evaluation may be unreliable; {LATEX_NOTE_MARK}~note on statistical precision."
_LATEX_NORMS = {"Linf": r"$\ell_\infty$", "L2": r"$\ell_2$", "L1": r"$\ell_1$"}
_LATEX_ALIGN = {"left": "l", "right": "r", "center": "c"}


def to_markdown(tables: list[Table], title: str = "otarena leaderboard", run_url: str | None = None) -> str:
    """GitHub-flavoured Markdown: a title, the rules, one section and table per threat model.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        title: The page heading (escaped like any other text).
        run_url: Base URL of an MLflow UI (``http://host:5000``); when given, run ids link to it.
    """
    def cell(c: Column, i: int, row: Row) -> str:
        text = fmt.md_escape(c.text(i, row))
        if c.name == "run" and run_url:
            return f"[{text}]({run_url.rstrip('/')}/#/experiments/{row.experiment_id}/runs/{row.run_id})"
        return text

    out = [f"# {fmt.md_escape(title)}", "", fmt.RULES, ""]
    if not tables:
        out += [fmt.EMPTY_MESSAGE, ""]
    for t in tables:
        cols = columns(MD, t.rows)
        out += [f"## {fmt.md_escape(fmt.table_title(t))}", ""]
        out.append("| " + " | ".join(c.header_in(MD) for c in cols) + " |")
        out.append("|" + "|".join("---:" if c.numeric else "---" for c in cols) + "|")
        out += ["| " + " | ".join(cell(c, i, row) for c in cols) + " |" for i, row in enumerate(t.rows, 1)]
        out.append("")
        if note := fmt.certified_note(t):
            out += [fmt.md_escape(note), ""]
    return "\n".join(out)


def _latex_flags(notes: list[fmt.FlagNote]) -> Callable[[int, Row], str]:
    """A row's Flags cell: its mark (a warning's, else a note's) with its footnotes' letters, ``$\\dagger^{a,b}$``."""
    def cell(i: int, row: Row) -> str:
        letters = [_letter(k) for k, n in enumerate(notes) if i in n.ranks]
        if not letters:
            return ""
        mark = LATEX_WARNING_MARK if row.warnings else LATEX_NOTE_MARK
        return mark[:-1] + "^{\\mathrm{" + ",".join(letters) + "}}$"
    return cell


def _letter(k: int) -> str:
    """Footnote letters: a, b, ..., z, aa, ab, ..."""
    return ("" if k < 26 else _letter(k // 26 - 1)) + "abcdefghijklmnopqrstuvwxyz"[k % 26]


_LATEX_CELLS: dict[str, tuple[str, Callable[[int, Row], str]]] = {
    "method": ("l", lambda i, r: fmt.latex_escape(r.method)),  # the Flags mark says it: no ⚠ here
}
"""LaTeX's own (alignment, cell) for a column, where its plain text will not do."""


def _latex_cell(c: Column, notes: list[fmt.FlagNote]) -> tuple[str, Callable[[int, Row], str]]:
    if c.name == "flags":
        return "c", _latex_flags(notes)
    if c.name in _LATEX_CELLS:
        return _LATEX_CELLS[c.name]
    if c.numeric:  # numbers we formatted: only their Unicode needs LaTeX
        return "r", lambda i, r: fmt.latex_number(c.text(i, r))
    return _LATEX_ALIGN[c.align], lambda i, r: fmt.latex_escape(c.text(i, r))


def to_latex(tables: list[Table], title: str = "otarena leaderboard") -> str:
    r"""A LaTeX fragment for a paper: one booktabs ``table`` float per threat model.

    Each float has a caption (``title``, then dataset, norm and eps, as
    :func:`leaderboard.formatting.table_title`, and the ranking metric) and a label
    ``tab:otarena-<dataset>-<norm>-<eps>`` (``-pgd`` or ``-certified`` after it for those rankings);
    its columns are those of :data:`leaderboard.columns.COLUMNS` shown in ``tex`` that have a value in
    some row. A row with flags gets a mark in the Flags column (:data:`LATEX_WARNING_MARK` when one
    questions the evaluation, :data:`LATEX_NOTE_MARK` for precision notes only) with the letters of
    its footnotes; under the table, one footnote per distinct flag and reason
    (:func:`leaderboard.formatting.flag_notes`), however many rows share it. The preamble needs
    ``\usepackage{booktabs}``.

    Every string from MLflow goes through :func:`leaderboard.formatting.latex_escape`, so a method
    named ``\input{/etc/passwd}`` is printed, never executed.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        title: Leads every caption (escaped like any other text).
    """
    out = [
        "% " + fmt.latex_escape(title) + ": generated by otarena (leaderboard/render.py).",
        "% A LaTeX fragment to \\input; it needs \\usepackage{booktabs} in the preamble.",
        "% Too wide for a column? Use table* in two-column papers, or \\resizebox (graphicx) on the tabular.",
        "",
    ]
    if not tables:
        return "\n".join(out + ["% " + fmt.EMPTY_MESSAGE, "\\par\\noindent " + fmt.latex_escape(fmt.EMPTY_MESSAGE)
                                + "\\par", ""])
    labels: set[str] = set()
    for t in tables:
        notes = fmt.flag_notes(t.rows)
        cols = [(c, *_latex_cell(c, notes)) for c in columns(TEX, t.rows)]
        out += [
            "\\begin{table}[htbp]",
            "\\centering",
            "\\small",
            "\\setlength{\\tabcolsep}{4pt}",  # nine columns: 6pt padding would overflow a one-column page
            f"\\caption{{{fmt.latex_escape(title)}: {_latex_threat(t)}. "
            f"{_LATEX_CAPTION.format(ranking=_LATEX_RANKINGS[t.ranking])}}}",
            f"\\label{{{_latex_label(t, labels)}}}",
            "\\begin{tabular}{" + "".join(align for _, align, _ in cols) + "}",
            "\\toprule",
            " & ".join(fmt.latex_escape(c.header_in(TEX)) for c, _, _ in cols) + " \\\\",
            "\\midrule",
        ]
        out += [" & ".join(cell(i, row) for _, _, cell in cols) + " \\\\" for i, row in enumerate(t.rows, 1)]
        out += ["\\bottomrule", "\\end{tabular}"]
        certified = fmt.certified_note(t)
        if notes or certified:
            out += ["\\par\\smallskip", "{\\footnotesize\\raggedright"]
            out += [_LATEX_LEGEND + "\\par", *(_latex_flag_note(k, n) for k, n in enumerate(notes))] if notes else []
            out += [fmt.latex_escape(certified) + "\\par"] if certified else []
            out.append("}")
        out += ["\\end{table}", ""]
    return "\n".join(out)


def to_csv(tables: list[Table]) -> str:
    """One CSV row per leaderboard row: each column's fields (:attr:`leaderboard.columns.Column.csv`),
    accuracies as fractions, floats at full precision."""
    fields = csv_fields()
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([name for name, _ in fields])
    for t in tables:
        for i, row in enumerate(t.rows, 1):
            writer.writerow([fmt.csv_cell(get(i, row)) for _, get in fields])
    return buf.getvalue()


def format_text(tables: list[Table]) -> str:
    """Aligned plain-text tables for a terminal, in the Markdown pipe-table shape.

    The columns are those shown in ``text`` that have a value in some row: the Markdown ones less the
    CI, with flag names only.
    """
    if not tables:
        return fmt.EMPTY_MESSAGE

    def cell(c: Column, i: int, row: Row) -> str:
        if c.name == "flags":  # compact: names without their reasons
            return ", ".join(fmt.flag(f) for f in fmt.flag_order(row))
        return c.text(i, row)

    blocks = []
    for t in tables:
        cols = columns(TEXT, t.rows)
        grid = [[c.header_in(TEXT) for c in cols]]
        grid += [[fmt.printable(cell(c, i, row)) for c in cols] for i, row in enumerate(t.rows, 1)]
        widths = [max(len(line[j]) for line in grid) for j in range(len(cols))]
        pad = [str.rjust if c.numeric else str.ljust for c in cols]
        lines = ["| " + " | ".join(p(s, w) for p, s, w in zip(pad, line, widths)) + " |" for line in grid]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append(fmt.printable(fmt.table_title(t)) + "\n" + "\n".join(lines))
    return "\n\n".join(blocks)


def _latex_flag_note(k: int, note: fmt.FlagNote) -> str:
    """``$^{\\mathrm{a}}$~$\\dagger$~masking:aa-gap (reason).\\par``: footnote ``k`` of a table."""
    return (f"$^{{\\mathrm{{{_letter(k)}}}}}$~" + (f"{LATEX_WARNING_MARK}~" if note.warning else "")
            + fmt.latex_escape(note.flag) + (f" ({fmt.latex_escape(note.reason)})" if note.reason else "") + ".\\par")


def _latex_threat(t: Table) -> str:
    """The table title in LaTeX: ``cifar10, $\\ell_\\infty$, $\\varepsilon = 8/255$``."""
    norm = _LATEX_NORMS.get(t.norm) or fmt.latex_escape(t.norm)
    return f"{fmt.latex_escape(t.dataset)}, {norm}, $\\varepsilon = {fmt.eps(t.eps)}$"


def _latex_label(t: Table, taken: set[str]) -> str:
    """``tab:otarena-cifar10-Linf-8/255`` made safe (letters, digits, ``-``, ``.``) and unique."""
    base = "tab:otarena-" + "-".join(re.sub(r"[^A-Za-z0-9.-]+", "", s) or "x"
                                     for s in (t.dataset, t.norm, fmt.eps(t.eps).replace("/", "-")))
    base += "" if t.ranking == "aa_acc" else "-" + t.ranking.removesuffix("_acc")
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label
