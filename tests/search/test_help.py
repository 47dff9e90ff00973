# SPDX-License-Identifier: Apache-2.0
"""``--help`` explains every option with its default, ``--version`` names the release, and the
licence the SPDX lines name is in the repository."""
import argparse
import re
from pathlib import Path

import pytest

import otarena
from otarena.search.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[2]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_command_is_listed():
    assert set(_commands()) == {"methods", "train", "search", "evaluate", "leaderboard", "claims", "reproduce",
                                "studies", "ui"}


@pytest.mark.parametrize("command", sorted(_commands()))
def test_every_option_of_every_command_has_help(command):
    parser = _commands()[command]
    silent = [a.option_strings[-1] if a.option_strings else a.dest for a in parser._actions
              if not (a.help or "").strip()]
    assert not silent, f"otarena {command}: no help text for {silent}"
    assert parser.description, f"otarena {command} --help has no description"


@pytest.mark.parametrize("command", sorted(_commands()))
def test_help_shows_defaults_but_never_none_or_false(command):
    text = _commands()[command].format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    for action in _commands()[command]._actions:
        if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), (command, action.dest)


def test_top_level_help_reads_as_plain_text(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    assert "`" not in text   # no reStructuredText markup from a docstring
    assert text.splitlines()[2].startswith("otarena: search, track and rank adversarially robust training")


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"otarena {otarena.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", otarena.__version__)


def test_a_fraction_is_a_number_on_the_command_line(capsys):
    assert build_parser().parse_args(["evaluate", "--eps", "8/255"]).eps == 8 / 255
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--eps", "eight"])
    assert "argument --eps: invalid number value: 'eight'" in capsys.readouterr().err


def test_the_licence_is_apache_2_as_every_spdx_line_says():
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    assert (ROOT / "search" / "cli.py").read_text().startswith("# SPDX-License-Identifier: Apache-2.0")
