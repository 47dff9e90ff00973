# SPDX-License-Identifier: Apache-2.0
"""Render leaderboard tables as Markdown, CSV, LaTeX and terminal text.

This is the only place numbers are formatted. Every string that comes from MLflow (method, arch,
parameter values, flags and their reasons) is user input, so each output format escapes it its own
way: Markdown escapes, CSV neutralises spreadsheet formulas, LaTeX escapes its special characters
(so a name cannot run ``\\input``), terminal text drops control characters (which could otherwise
smuggle ANSI escape sequences).
"""

from __future__ import annotations

import csv
import io
import json
import re
import unicodedata
from collections.abc import Callable

from leaderboard.schema import ACCURACIES, Row, Table, is_warning

EMPTY_MESSAGE = "No evaluated trial runs found: nothing to rank yet."
RULES = (
    "One table per (dataset, norm, eps). Each row is the best trial of a (method, architecture) "
    "by validation PGD accuracy, never by test numbers; rows are ranked by test AutoAttack accuracy. "
    "Accuracies in %; for a configuration trained with several seeds, mean ± std over the seeds "
    "(and ranked by that mean). AA 95% CI: Wilson interval of the trial's own AutoAttack accuracy "
    "over its n_ex test images. ⚠ marks a row whose evaluation may be unreliable (see its flags); "
    "unmarked flags are notes on statistical precision. "
    "Search cost: trials run and epochs trained over all trials of the search."
)
WARNING_MARK = "⚠"

# Markdown columns: (header, cell text for (rank, row)), unescaped. A row with a warning flag is
# marked ⚠ at its method as well as at the flag, so that it stands out when the table is scanned.
COLUMNS: list[tuple[str, Callable[[int, Row], str]]] = [
    ("Rank", lambda i, r: str(i)),
    ("Method", lambda i, r: f"{WARNING_MARK} {r.method}" if r.warnings else r.method),
    ("Clean", lambda i, r: _acc(r, "clean_acc")),
    ("PGD", lambda i, r: _acc(r, "pgd_acc")),
    ("AutoAttack", lambda i, r: _acc(r, "aa_acc")),
    ("AA 95% CI", lambda i, r: _ci(r.aa_ci)),
    ("Certified", lambda i, r: _acc(r, "certified_acc")),
    ("Arch", lambda i, r: r.arch),
    ("Epochs", lambda i, r: _num(r.epochs)),
    ("Hyperparameters", lambda i, r: ", ".join(f"{n}={_param(v)}" for n, v in r.hparams)),
    ("Trials", lambda i, r: _num(r.trials)),
    ("Trial-epochs", lambda i, r: _num(r.trial_epochs)),
    ("n_ex", lambda i, r: _num(r.n_ex)),
    ("Seeds", lambda i, r: str(r.n_seeds)),
    ("Flags", lambda i, r: "; ".join(_flag(f, dict(r.flag_reasons).get(f)) for f in _flag_order(r))),
    ("Run", lambda i, r: r.run_id),
]

# LaTeX columns: (header, tabular alignment, cell LaTeX for (rank, row)). Cells are escaped here.
# Flags are a mark only; the note under each table gives them with their reasons.
LATEX_COLUMNS: list[tuple[str, str, Callable[[int, Row], str]]] = [
    ("Rank", "r", lambda i, r: str(i)),
    ("Method", "l", lambda i, r: latex_escape(r.method)),
    ("Clean", "r", lambda i, r: _latex_number(_acc(r, "clean_acc"))),
    ("AutoAttack", "r", lambda i, r: _latex_number(_acc(r, "aa_acc"))),
    ("PGD", "r", lambda i, r: _latex_number(_acc(r, "pgd_acc"))),
    ("Certified", "r", lambda i, r: _latex_number(_acc(r, "certified_acc"))),
    ("Arch", "l", lambda i, r: latex_escape(r.arch)),
    ("Epochs", "r", lambda i, r: _latex_number(_num(r.epochs))),
    ("Flags", "c", lambda i, r: _latex_flags(r)),
]

# Terminal text stays compact: no CI column, and flag names without their reasons.
TEXT_COLUMNS: list[tuple[str, Callable[[int, Row], str]]] = [
    (h, (lambda i, r: ", ".join(_flag(f) for f in _flag_order(r))) if h == "Flags" else cell)
    for h, cell in COLUMNS if h != "AA 95% CI"
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
    *[(f"{m}_{s}", lambda i, r, key=f"{m}_{s}": getattr(r, key)) for m in ACCURACIES for s in ("mean", "std")],
    *[(f"{m.removesuffix('_acc')}_ci_{end}", lambda i, r, m=m, j=j: _ci_bound(r, m, j))
      for m in ACCURACIES for j, end in enumerate(("low", "high"))],
    ("arch", lambda i, r: r.arch),
    ("epochs", lambda i, r: r.epochs),
    ("hyperparameters", lambda i, r: ", ".join(f"{n}={v}" for n, v in r.hparams)),
    ("trials", lambda i, r: r.trials),
    ("trial_epochs", lambda i, r: r.trial_epochs),
    ("n_ex", lambda i, r: r.n_ex),
    ("n_seeds", lambda i, r: r.n_seeds),
    ("flags", lambda i, r: ";".join(r.flags)),
    # Sanitised before encoding: JSON would keep an ANSI escape as "\u001b" for the reader to decode.
    ("flag_reasons", lambda i, r: json.dumps({_printable(f): _printable(t) for f, t in r.flag_reasons},
                                             ensure_ascii=False)),
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


def to_latex(tables: list[Table], title: str = "otarena leaderboard") -> str:
    r"""A LaTeX fragment for a paper: one booktabs ``table`` float per threat model.

    Each float has a caption (``title``, then dataset, norm and eps, as :func:`table_title`) and a
    label ``tab:otarena-<dataset>-<norm>-<eps>``; its columns are :data:`LATEX_COLUMNS`. A row with
    flags gets a mark in the Flags column (:data:`LATEX_WARNING_MARK` when one questions the
    evaluation, :data:`LATEX_NOTE_MARK` for precision notes only), and a note under the table lists
    each flagged row's flags with their reasons. The preamble needs ``\usepackage{booktabs}``.

    Every string from MLflow goes through :func:`latex_escape`, so a method named
    ``\input{/etc/passwd}`` is printed, never executed.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        title: Leads every caption (escaped like any other text).
    """
    out = [
        "% " + latex_escape(title) + ": generated by otarena (leaderboard/render.py).",
        "% A LaTeX fragment to \\input; it needs \\usepackage{booktabs} in the preamble.",
        "% Too wide for a column? Use table* in two-column papers, or \\resizebox (graphicx) on the tabular.",
        "",
    ]
    if not tables:
        return "\n".join(out + ["% " + EMPTY_MESSAGE, "\\par\\noindent " + latex_escape(EMPTY_MESSAGE) + "\\par", ""])
    labels: set[str] = set()
    for t in tables:
        out += [
            "\\begin{table}[htbp]",
            "\\centering",
            "\\small",
            "\\setlength{\\tabcolsep}{4pt}",  # nine columns: 6pt padding would overflow a one-column page
            f"\\caption{{{latex_escape(title)}: {_latex_threat(t)}. {_LATEX_CAPTION}}}",
            f"\\label{{{_latex_label(t, labels)}}}",
            "\\begin{tabular}{" + "".join(align for _, align, _ in LATEX_COLUMNS) + "}",
            "\\toprule",
            " & ".join(head for head, _, _ in LATEX_COLUMNS) + " \\\\",
            "\\midrule",
        ]
        out += [" & ".join(cell(i, row) for _, _, cell in LATEX_COLUMNS) + " \\\\" for i, row in enumerate(t.rows, 1)]
        out += ["\\bottomrule", "\\end{tabular}"]
        notes = [_latex_flag_note(i, row) for i, row in enumerate(t.rows, 1) if row.flags]
        if notes:
            out += ["\\par\\smallskip", "{\\footnotesize\\raggedright", _LATEX_LEGEND + "\\par", *notes, "}"]
        out += ["\\end{table}", ""]
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
    """Aligned plain-text tables for a terminal, in the Markdown pipe-table shape.

    The columns are :data:`TEXT_COLUMNS`: the Markdown ones less the CI, with flag names only.
    """
    if not tables:
        return EMPTY_MESSAGE
    blocks = []
    for t in tables:
        grid = [[h for h, _ in TEXT_COLUMNS]]
        grid += [[_printable(cell(i, row)) for _, cell in TEXT_COLUMNS] for i, row in enumerate(t.rows, 1)]
        widths = [max(len(line[j]) for line in grid) for j in range(len(TEXT_COLUMNS))]
        pad = [str.rjust if h in _NUMERIC else str.ljust for h, _ in TEXT_COLUMNS]
        lines = ["| " + " | ".join(p(s, w) for p, s, w in zip(pad, line, widths)) + " |" for line in grid]
        lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
        blocks.append(_printable(table_title(t)) + "\n" + "\n".join(lines))
    return "\n\n".join(blocks)


# Characters with a meaning in Markdown or inline HTML. `&`, `<` and `>` become entities so that no
# HTML tag can form; the rest are backslash-escaped (`\|` is how GFM keeps a pipe inside a cell).
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_SPECIAL = re.compile(r"([\\|`*_\[\]$~])")  # $ and ~: GitHub renders math and strikethrough
_NUMERIC = {"Rank", "Clean", "PGD", "AutoAttack", "AA 95% CI", "Epochs", "Trials", "Trial-epochs", "n_ex", "Seeds"}


def md_escape(text: str) -> str:
    """Escape untrusted text for a Markdown table cell or heading."""
    text = _MD_SPECIAL.sub(r"\\\1", _printable(text))
    return "".join(_MD_ENTITIES.get(c, c) for c in text)


# LaTeX: the ten characters with a meaning in text mode, plus the three that OT1 fonts print as
# other glyphs (< > |). One pass, so that the braces of a replacement are never escaped again.
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_LATEX_SPECIAL_RE = re.compile("|".join(map(re.escape, _LATEX_SPECIAL)))
LATEX_WARNING_MARK = r"$\dagger$"
"""Flags-column mark of a row with a warning flag (the evaluation may be unreliable)."""
LATEX_NOTE_MARK = r"$\ast$"
"""Flags-column mark of a row whose flags are all notes on statistical precision."""
_LATEX_CAPTION = (r"Test accuracy in \%, ranked by AutoAttack accuracy; mean $\pm$ std over training seeds "
                  r"for a configuration trained with several.")
_LATEX_LEGEND = f"{LATEX_WARNING_MARK}~evaluation may be unreliable; {LATEX_NOTE_MARK}~note on statistical precision."
_LATEX_NORMS = {"Linf": r"$\ell_\infty$", "L2": r"$\ell_2$", "L1": r"$\ell_1$"}


def latex_escape(text: str) -> str:
    r"""Escape untrusted text for LaTeX text mode: ``\input{x}`` -> ``\textbackslash{}input\{x\}``.

    Control characters become spaces first (:func:`_printable`): a newline could end a comment or a
    paragraph, and ``^^J``-style input needs a ``^``, which is escaped too.
    """
    return _LATEX_SPECIAL_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], _printable(text))


def _latex_number(text: str) -> str:
    """A cell we formatted (never user text) with its Unicode made LaTeX: ``81.0 ± 0.5``, ``–``."""
    return text.replace(" ± ", r" $\pm$ ").replace("–", "--")


def _latex_flags(row: Row) -> str:
    if row.warnings:
        return LATEX_WARNING_MARK
    return LATEX_NOTE_MARK if row.flags else ""


def _latex_flag_note(rank: int, row: Row) -> str:
    """``2.~trades (small\\_cnn): $\\dagger$~masking:aa-gap (reason); small-sample (reason).\\par``"""
    reasons = dict(row.flag_reasons)
    flags = [(f"{LATEX_WARNING_MARK}~" if is_warning(f) else "") + latex_escape(f)
             + (f" ({latex_escape(reasons[f])})" if reasons.get(f) else "") for f in _flag_order(row)]
    return f"{rank}.~{latex_escape(row.method)} ({latex_escape(row.arch)}): " + "; ".join(flags) + ".\\par"


def _latex_threat(t: Table) -> str:
    """:func:`table_title` in LaTeX: ``cifar10, $\\ell_\\infty$, $\\varepsilon = 8/255$``."""
    norm = _LATEX_NORMS.get(t.norm) or latex_escape(t.norm)
    return f"{latex_escape(t.dataset)}, {norm}, $\\varepsilon = {_eps(t.eps)}$"


def _latex_label(t: Table, taken: set[str]) -> str:
    """``tab:otarena-cifar10-Linf-8/255`` made safe (letters, digits, ``-``, ``.``) and unique."""
    base = "tab:otarena-" + "-".join(re.sub(r"[^A-Za-z0-9.-]+", "", s) or "x" for s in (t.dataset, t.norm,
                                                                                      _eps(t.eps).replace("/", "-")))
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


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


def _acc(row: Row, metric: str) -> str:
    """``mean ± std`` over seeds (one decimal: the seed spread makes a second one noise), else the
    trial's own accuracy as before."""
    mean = getattr(row, f"{metric}_mean") if row.n_seeds >= 2 else None
    if mean is None:
        return _pct(getattr(row, metric))
    std = getattr(row, f"{metric}_std")
    return f"{100 * mean:.1f} ± {'–' if std is None else f'{100 * std:.1f}'}"


def _ci(ci: tuple[float, float] | None) -> str:
    return "–" if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def _ci_bound(row: Row, metric: str, j: int) -> float | None:
    """Bound ``j`` (0 low, 1 high) of the CI of ``metric`` (``aa_acc`` -> ``row.aa_ci``)."""
    ci = getattr(row, f"{metric.removesuffix('_acc')}_ci")
    return None if ci is None else ci[j]


def _flag_order(row: Row) -> list[str]:
    """Warnings first, then notes, each in the order the evaluation logged them."""
    return [*row.warnings, *row.notes]


def _flag(name: str, reason: str | None = None) -> str:
    """``⚠ masking:aa-gap (reason)`` for a warning, ``small-sample (reason)`` for a note (unescaped)."""
    text = f"{WARNING_MARK} {name}" if is_warning(name) else name
    return text if not reason else f"{text} ({reason})"


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
