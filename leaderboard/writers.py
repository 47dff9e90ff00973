# SPDX-License-Identifier: Apache-2.0
"""The output formats, registered once: :func:`leaderboard.build`, the CLI's ``--format`` help and the
end-of-search message all read :data:`FORMATS`.

Adding a format is one function of an :class:`Output` plus one line in :data:`FORMATS`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from otarena.leaderboard import html, render, robustbench
from otarena.leaderboard.schema import Campaign, Table


@dataclass(frozen=True)
class Output:
    """Everything a writer may need."""

    tables: list[Table]
    campaign: Campaign
    title: str
    run_url: str | None
    """Base URL of an MLflow UI that runs link to (credentials removed), or ``None``."""


@dataclass(frozen=True)
class Format:
    """One output format: where it goes under the output folder and the function that writes it."""

    file: str
    """The file (or, for a format of many files, the folder) under the output folder."""
    description: str
    """What it is, for the CLI help."""
    write: Callable[[Path, Output], None]
    """Writes the format at the given path."""
    entries: tuple[str, str] = ()
    """For a folder: the glob of the files it holds, and what they are, for :meth:`describe`."""

    def describe(self, path: str | Path) -> str:
        """``wrote site/leaderboard.md``; for a folder, with the number of its entries."""
        if not self.entries:
            return f"wrote {path}"
        pattern, noun = self.entries
        return f"wrote {path}{os.sep} ({len(list(Path(path).glob(pattern)))} {noun})"


def _text(render_text: Callable[[Output], str]) -> Callable[[Path, Output], None]:
    """A writer of one text file (UTF-8, newlines as rendered)."""
    return lambda path, out: path.write_text(render_text(out), encoding="utf-8", newline="")


FORMATS: dict[str, Format] = {
    "md": Format("leaderboard.md", "Markdown",
                 _text(lambda o: render.to_markdown(o.tables, title=o.title, run_url=o.run_url))),
    "csv": Format("leaderboard.csv", "CSV", _text(lambda o: render.to_csv(o.tables))),
    "tex": Format("leaderboard.tex", "LaTeX", _text(lambda o: render.to_latex(o.tables, title=o.title))),
    "html": Format("index.html", "the static HTML site",
                   _text(lambda o: html.to_html(o.tables, o.campaign, title=o.title, run_url=o.run_url))),
    "json": Format("model_info", "RobustBench model_info JSON, one file per entry",
                   lambda path, o: robustbench.write_model_info(o.tables, path),
                   entries=("**/otarena_*.json", "model_info JSON files")),  # no-autoattack/ one level down
}
"""Output formats by name, in the order they are written."""


def help_text() -> str:
    """The CLI's ``--format`` help: ``md: Markdown (leaderboard.md); csv: CSV (leaderboard.csv); ...``."""
    return "; ".join(f"{name}: {f.description} ({f.file})" for name, f in FORMATS.items())
