# SPDX-License-Identifier: Apache-2.0
"""matplotlib figures as inline SVG that the leaderboard page's Content-Security-Policy allows.

The page allows no inline style, so :func:`to_svg` turns matplotlib's ``style="..."`` attributes into
SVG presentation attributes (which no CSP governs), drops its ``<style>`` and metadata, and prefixes
its ids so that several plots can share one page. Text stays text (``svg.fonttype: none``) and is
never read as mathtext, so user strings are drawn as they are; matplotlib escapes them for XML.
Each point drawn by :func:`plot_series` can carry a hover ``<title>``.

matplotlib is imported on first use: ``import leaderboard`` stays fast.
"""

from __future__ import annotations

import html
import io
import itertools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from otarena.leaderboard import formatting as fmt

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RC = {"svg.fonttype": "none", "svg.hashsalt": "otarena", "text.parse_math": False, "font.size": 8.5,
      "axes.titlesize": 9.5, "axes.titleweight": "bold", "legend.fontsize": 8, "axes.grid": True,
      "grid.color": "#eeeeee", "axes.axisbelow": True, "axes.formatter.useoffset": False}
"""The look of every plot (matplotlib rcParams); ``text.parse_math: False`` keeps user text plain text."""
_STYLE_PROPERTIES = {"fill", "fill-opacity", "fill-rule", "stroke", "stroke-width", "stroke-linejoin",
                     "stroke-linecap", "stroke-opacity", "stroke-dasharray", "stroke-dashoffset",
                     "stroke-miterlimit", "opacity", "font-size", "font-weight", "font-style", "text-anchor"}
_ids = itertools.count()  # a prefix per plot keeps ids unique on the page


@dataclass
class Series:
    """Points of one legend entry, with optional hover text per point."""

    label: str | None
    x: list[float]
    y: list[float]
    color: str
    marker: str = "o"
    """A matplotlib marker, ``ring`` (an unfilled circle) or ``""`` (none)."""
    line: str = ""
    """``""`` (markers only), a matplotlib line style (``-``, ``--``, ``:``), or ``steps-pre``/``steps-post``."""
    size: float = 4.0
    tips: list[str] | None = None


def new_figure(width_px: int, height_px: int) -> Figure:
    """A figure of that CSS size, not registered with pyplot (no global state, freed when dropped)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width_px / 96, height_px / 96), dpi=96)


def to_svg(fig: Figure, kind: str, title: str, tips: Sequence[list[str] | None] = (),
           attrs: dict[str, str] | None = None) -> str:
    """The figure as an inline ``<svg class="plot" data-plot=kind>``, safe under the page's CSP.

    Args:
        fig: A figure whose point series were drawn by :func:`plot_series` (their hover texts are ``tips``).
        kind: The ``data-plot`` attribute; ``title`` becomes its accessible name.
        tips: Per :func:`plot_series` call, in order, its points' hover texts.
        attrs: Extra attributes (user text: escaped here).
    """
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<style[^>]*>.*?</style>", "", svg, flags=re.S)
    svg = re.sub(r'style="([^"]*)"', lambda m: _presentation(m.group(1)), svg)
    prefix = f"f{next(_ids)}-"
    svg = re.sub(r'id="([^"]+)"', rf'id="{prefix}\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}\1)", svg)
    svg = re.sub(r'xlink:href="#([^"]+)"', rf'xlink:href="#{prefix}\1"', svg)
    for k, texts in enumerate(tips):
        if texts:
            svg = _add_titles(svg, f'id="{prefix}tips{k}"', texts)
    width, height = (round(v * 96) for v in fig.get_size_inches())
    extra = "".join(f' {k}="{fmt.html_escape(v)}"' for k, v in (attrs or {}).items())
    head = (f'<svg class="plot" data-plot="{fmt.html_escape(kind)}"{extra} viewBox="{_viewbox(svg)}" '
            f'width="{width}" height="{height}" role="img" aria-label="{fmt.html_escape(title)}" '
            'stroke-linejoin="round" stroke-linecap="butt">')
    return head + svg[svg.index(">") + 1:].strip()


def _viewbox(svg: str) -> str:
    return re.search(r'viewBox="([^"]+)"', svg[: svg.index(">")]).group(1)


def _presentation(style: str) -> str:
    """``fill: #fff; stroke-width: 0.8`` -> ``fill="#fff" stroke-width="0.8"`` (the font family is the page's)."""
    pairs = [p.split(":", 1) for p in style.split(";") if ":" in p]
    return " ".join(f'{k.strip()}="{html.escape(v.strip())}"' for k, v in pairs if k.strip() in _STYLE_PROPERTIES)


def _add_titles(svg: str, group: str, texts: list[str]) -> str:
    """Give the first ``len(texts)`` markers after ``group`` (one series' points, in order) a hover title."""
    start = svg.find(group)
    if start < 0:
        return svg
    head, tail = svg[:start], svg[start:]
    texts_iter = iter(texts)

    def title(m: re.Match) -> str:
        text = next(texts_iter, None)
        return m.group(0) if text is None else f"{m.group(1)}><title>{fmt.html_escape(text)}</title></use>"

    return head + re.sub(r"(<use [^>]*?)\s*/>", title, tail, count=len(texts))


def plot_series(ax: Axes, series: list[Series], tips: list) -> None:
    """Draw the series, dropping points an axis cannot show (NaN, infinities, <= 0 on a log axis)."""
    xlog, ylog = ax.get_xscale() == "log", ax.get_yscale() == "log"
    for s in series:
        keep = [k for k, (x, y) in enumerate(zip(s.x, s.y)) if _shown(x, xlog) and _shown(y, ylog)]
        label = None if s.label is None else _legend_text(s.label)
        steps = s.line.startswith("steps")
        line, = ax.plot([s.x[k] for k in keep], [s.y[k] for k in keep], color=s.color, linewidth=1.6,
                        marker={"ring": "o", "": "None"}.get(s.marker, s.marker), markersize=s.size,
                        markerfacecolor="none" if s.marker == "ring" else s.color,
                        linestyle="-" if steps else (s.line or "None"), drawstyle=s.line if steps else "default",
                        label=label or "_nolegend_")
        if s.tips and s.marker:
            line.set_gid(f"tips{len(tips)}")
            tips.append([s.tips[k] for k in keep if k < len(s.tips)])
        else:
            tips.append(None)


def _shown(v: float, log: bool) -> bool:
    return math.isfinite(v) and (v > 0 or not log)


def _legend_text(label: str) -> str:
    """matplotlib hides labels that start with ``_``: a method may well be named so."""
    label = fmt.short(label, 26)
    return "\u2009" + label if label.startswith("_") else label


def finish(ax: Axes, title: str, xlabel: str, ylabel: str, *, legend: str = "bottom", ncol: int = 2) -> None:
    """Title, axis labels, legend and margins.

    With ``legend="bottom"`` the figure grows by the legend's rows, under the axes, and the margins
    are fixed in pixels: the plot keeps its width, so that it can shrink to a narrow screen. With
    ``inside`` the legend sits in the axes; ``none`` draws none.
    """
    fig = ax.figure
    # A fixed title height: matplotlib's automatic one measures every tick label (a tenth of a plot's time).
    ax.set_title(fmt.short(title, 60), loc="left", y=1.0, pad=5)
    ax.set_xlabel(fmt.short(xlabel, 48))
    ax.set_ylabel(ylabel)
    handles, labels = ax.get_legend_handles_labels()
    if legend == "inside":
        if handles:
            ax.legend(loc="upper right")
        return
    width, height = (v * 96 for v in fig.get_size_inches())
    rows = math.ceil(len(handles) / ncol) if legend == "bottom" else 0
    below = 42 + (14 * rows + 6 if rows else 0)  # tick labels and axis label, then the legend
    height += below - 42
    fig.set_size_inches(width / 96, height / 96)
    fig.subplots_adjust(left=50 / width, right=1 - 12 / width, top=1 - 24 / height, bottom=below / height)
    if rows:
        fig.legend(handles, labels, loc="lower left", bbox_to_anchor=(4 / width, 2 / height), ncol=ncol,
                   frameon=False, borderaxespad=0, columnspacing=1.2, handlelength=1.6)
