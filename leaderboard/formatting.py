# SPDX-License-Identifier: Apache-2.0
"""How numbers and user text are shown: the one place every writer takes its formatting from.

Numbers stay floats in :mod:`leaderboard.schema`; the functions here turn them into cell text
(accuracies in %, counts, eps as ``8/255``). Every string that comes from MLflow (method, arch,
parameter values, flags and their reasons) is user input, so each output format has its escaper
here: Markdown escapes, CSV neutralises spreadsheet formulas, LaTeX escapes its special characters
(so a name cannot run ``\\input``), HTML escapes quotes too, and terminal text drops control
characters (which could otherwise smuggle ANSI escape sequences).
"""

from __future__ import annotations

import html
import math
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlparse

from otarena.leaderboard.schema import Row, Table, is_warning

EMPTY_MESSAGE = "No evaluated trial runs found: nothing to rank yet."
RULES = (
    "One table per (dataset, norm, eps) and ranking metric, named in its title. Each row is the best trial of a "
    "(method, architecture) by validation PGD accuracy, never by test numbers; rows are ranked by test AutoAttack "
    "accuracy, as on RobustBench. Trials evaluated without AutoAttack (final_eval.autoattack: null) are ranked "
    "by PGD accuracy in a table of their own after it (AutoAttack –, flag no-autoattack): PGD only bounds robust "
    "accuracy from above, so they are never ranked among AutoAttack's numbers. With final_eval.rank_certified, a "
    "certified method's rows are ranked by certified accuracy, in a table of their own. "
    "Accuracies in %; for a configuration trained with several seeds, mean ± std over the seeds "
    "(and ranked by that mean). AA 95% CI: Wilson interval of the trial's own AutoAttack accuracy "
    "over its n_ex test images. ⚠ marks a row whose evaluation may be unreliable (see its flags); "
    "unmarked flags are notes (on statistical precision, or no-autoattack). "
    "Search cost: trials run and epochs trained over all trials of the search. "
    "Tied ranks: the rows a row cannot be told apart from. Each row is compared with the next one down on the "
    "same test points by an exact McNemar test of their per-point outcomes under the ranking attack (the points "
    "one gets right and the other wrong), Holm-corrected over the table's adjacent comparisons; rows not "
    "significantly different at 5% are tied. Rows on other test points are never compared. "
    "Two spreads, two sources: the seed spread (the ± of a mean over training seeds) is training variance, what "
    "retraining the same configuration moves; the AA 95% CI beside it is test-sample variance, what another draw "
    "of n_ex test images would move. The tied groups use one seed's outcomes and so see only the second."
)
WARNING_MARK = "⚠"
MISSING = "–"
"""The text of a number that was not logged."""

# ----------------------------------------------------------------------------------------------------
# Numbers


def pct(x: float | None) -> str:
    """A fraction in percent with two decimals: ``0.4712`` -> ``47.12``."""
    return MISSING if x is None else f"{100 * x:.2f}"


def accuracy(row: Row, metric: str) -> str:
    """``mean ± std`` over seeds (one decimal: the seed spread makes a second one noise), else the
    trial's own accuracy (:func:`pct`)."""
    mean = getattr(row, f"{metric}_mean") if row.n_seeds >= 2 else None
    if mean is None:
        return pct(getattr(row, metric))
    std = getattr(row, f"{metric}_std")
    return f"{100 * mean:.1f} ± {MISSING if std is None else f'{100 * std:.1f}'}"


def interval(ci: tuple[float, float] | None) -> str:
    """A 95% CI in percent: ``[41.2, 50.3]``."""
    return MISSING if ci is None else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def ci_of(row: Row, metric: str) -> tuple[float, float] | None:
    """The CI of ``metric`` (``aa_acc`` -> ``row.aa_ci``)."""
    return getattr(row, f"{metric.removesuffix('_acc')}_ci")


def integral(x: float | None) -> int | float | None:
    """A count logged as an MLflow float metric (epochs, trials, n_ex) as the integer it is: ``10.0`` -> ``10``."""
    return int(x) if x is not None and float(x).is_integer() else x


def count(x: float | None) -> str:
    """A count as text: ``10``, or ``2.5`` for the rare count that is no integer."""
    if x is None:
        return MISSING
    return str(integral(x)) if float(x).is_integer() else f"{x:g}"


def hours(x: float | None) -> str:
    """Device-hours: two decimals from one hour on, two significant digits below."""
    return MISSING if x is None else f"{x:.2f}" if x >= 0.995 else f"{x:.2g}"


def param(value: str) -> str:
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


def eps(x: float) -> str:
    """Short eps: ``0.2``, or ``8/255`` for the usual pixel-step values that have long decimals."""
    k = x * 255
    if len(repr(x)) > 8 and abs(k - round(k)) < 1e-6:
        return f"{round(k)}/255"
    return repr(x)


RANKING_NAMES = {"aa_acc": "AutoAttack", "certified_acc": "certified accuracy", "pgd_acc": "PGD (no AutoAttack)"}
"""How a table's ranking metric (:data:`leaderboard.schema.RANKINGS`) is named in its title."""


def table_title(t: Table) -> str:
    """``digits · Linf · eps=0.2 · ranked by AutoAttack`` (unescaped): the threat model and the ranking metric."""
    return f"{t.dataset} · {t.norm} · eps={eps(t.eps)} · ranked by {RANKING_NAMES[t.ranking]}"


# ----------------------------------------------------------------------------------------------------
# Flags


def flag_order(row: Row) -> list[str]:
    """Warnings first, then notes, each in the order the evaluation logged them."""
    return [*row.warnings, *row.notes]


def flag(name: str, reason: str | None = None) -> str:
    """``⚠ masking:aa-gap (reason)`` for a warning, ``small-sample (reason)`` for a note (unescaped)."""
    text = f"{WARNING_MARK} {name}" if is_warning(name) else name
    return text if not reason else f"{text} ({reason})"


@dataclass(frozen=True)
class FlagNote:
    """One distinct flag of a table with its reason, and the ranks of the rows that carry it."""

    flag: str
    reason: str | None
    ranks: tuple[int, ...]

    @property
    def warning(self) -> bool:
        return is_warning(self.flag)


def flag_notes(rows: Sequence[Row]) -> list[FlagNote]:
    """A table's flags as notes under it: one per distinct (flag, reason), not one per row.

    Warnings come first, then notes, each in the order the rows first show them; the LaTeX
    footnotes and the page's notes (which a tap on a flag reaches, on a phone too) both list these.
    """
    ranks: dict[tuple[str, str | None], list[int]] = {}
    for i, r in enumerate(rows, 1):
        reasons = dict(r.flag_reasons)
        for f in flag_order(r):
            ranks.setdefault((f, reasons.get(f)), []).append(i)
    keys = sorted(ranks, key=lambda k: not is_warning(k[0]))  # stable: first-seen order within each kind
    return [FlagNote(f, reason, tuple(ranks[(f, reason)])) for f, reason in keys]


def rank_list(ranks: Sequence[int]) -> str:
    """``row 2``, ``rows 1, 3``, ``rows 1–4, 6``: runs of three or more consecutive ranks as a range."""
    parts, k = [], 0
    while k < len(ranks):
        j = k
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        parts += [f"{ranks[k]}–{ranks[j]}"] if j - k >= 2 else [str(x) for x in ranks[k:j + 1]]
        k = j + 1
    return ("row " if len(ranks) == 1 else "rows ") + ", ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Certified accuracy far below the empirical one

CERTIFIED_FAR_BELOW = 0.5
"""A certified accuracy under this share of the AutoAttack accuracy gets a note explaining the gap."""


def certified_note(t: Table) -> str | None:
    """Why a certified accuracy can sit far below AutoAttack's, for a table whose rows show it; else ``None``.

    Both numbers are right: an attack gives an upper bound on robust accuracy, a certificate a lower
    one. A 1-Lipschitz net's logit gap M certifies the L2 radius M / sqrt(2) (Tsuzuku et al. 2018,
    "Lipschitz-Margin Training", arXiv:1802.04034; Serrurier et al. 2021, HKR, arXiv:2006.06520), so an
    image is certified at eps only when its gap exceeds sqrt(2) x eps, and a net trained to a smaller
    margin is robust in practice yet certifies few images.
    """
    ranks = [i for i, r in enumerate(t.rows, 1)
             if (c := r.headline("certified_acc")) is not None and (a := r.headline("aa_acc")) is not None
             and c < CERTIFIED_FAR_BELOW * a]
    if not ranks:
        return None
    threshold = (f": for a 1-Lipschitz net a logit margin above sqrt(2) x eps = {math.sqrt(2) * t.eps:.3g} here"
                 if t.norm == "L2" else "")
    return (f"Certified accuracy far below AutoAttack ({rank_list(ranks)}): an attack only bounds robust accuracy "
            "from above, a certificate from below. A test image counts as certified only when its logit margin "
            f"proves that no perturbation within eps can change its class{threshold}. A net trained to a smaller "
            "margin (HKR's hkr_margin) resists the attacks yet certifies few images: the certified column is a "
            "guarantee, the attacks are evidence.")


# ----------------------------------------------------------------------------------------------------
# User text, escaped per format


def printable(text: object) -> str:
    """Replace control and format characters (newlines, ANSI escapes, bidi overrides) by a space."""
    text = str(text)
    if text.isprintable():  # no character of category C (nor a separator but " "): the common case, in C
        return text
    return "".join(" " if unicodedata.category(c).startswith("C") else c for c in text)


def short(text: str, n: int) -> str:
    """:func:`printable` text cut to ``n`` characters, with an ellipsis when cut."""
    text = printable(text)
    return text if len(text) <= n else text[: n - 1] + "…"


# Characters with a meaning in Markdown or inline HTML. `&`, `<` and `>` become entities so that no
# HTML tag can form; the rest are backslash-escaped (`\|` is how GFM keeps a pipe inside a cell).
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_MD_SPECIAL = re.compile(r"([\\|`*_\[\]$~])")  # $ and ~: GitHub renders math and strikethrough


def md_escape(text: str) -> str:
    """Escape untrusted text for a Markdown table cell or heading."""
    text = _MD_SPECIAL.sub(r"\\\1", printable(text))
    return "".join(_MD_ENTITIES.get(c, c) for c in text)


# LaTeX: the ten characters with a meaning in text mode, plus the three that OT1 fonts print as
# other glyphs (< > |). One pass, so that the braces of a replacement are never escaped again.
_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
    "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
    "<": r"\textless{}", ">": r"\textgreater{}", "|": r"\textbar{}",
}
_LATEX_SPECIAL_RE = re.compile("|".join(map(re.escape, _LATEX_SPECIAL)))


def latex_escape(text: str) -> str:
    r"""Escape untrusted text for LaTeX text mode: ``\input{x}`` -> ``\textbackslash{}input\{x\}``.

    Control characters become spaces first (:func:`printable`): a newline could end a comment or a
    paragraph, and ``^^J``-style input needs a ``^``, which is escaped too.
    """
    return _LATEX_SPECIAL_RE.sub(lambda m: _LATEX_SPECIAL[m.group()], printable(text))


def latex_number(text: str) -> str:
    """A cell we formatted (never user text) with its Unicode made LaTeX: ``81.0 ± 0.5``, ``–``, ``40.0 → 45.0``."""
    return text.replace(" ± ", r" $\pm$ ").replace(" → ", r" $\to$ ").replace(MISSING, "--")


def csv_cell(value: object) -> object:
    """None -> empty; floats as repr (full precision); text printable and never a formula."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        value = printable(value)
        if value[:1] in ("=", "+", "-", "@"):
            return "'" + value  # OWASP CSV-injection advice: a spreadsheet must not evaluate it
    return value


def html_escape(text: object) -> str:
    """Escape untrusted text for HTML or SVG text and (double-quoted) attributes, control characters dropped."""
    return html.escape(printable(str(text)), quote=True)


def safe_url(url: str | None) -> str | None:
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
