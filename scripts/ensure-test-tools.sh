#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Make sure the Debian packages the tests drive are installed: chromium (the HTML leaderboard test
# runs it headless, tests/leaderboard/test_html.py) and pdflatex with booktabs (the LaTeX table is
# compiled, tests/leaderboard/test_latex_and_model_info.py). Does nothing when both are there.
set -eu
missing=
[ -x /usr/bin/chromium ] || missing="$missing chromium"
command -v pdflatex >/dev/null 2>&1 && kpsewhich booktabs.sty >/dev/null 2>&1 || \
  missing="$missing texlive-latex-base texlive-latex-recommended"
[ -z "$missing" ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# shellcheck disable=SC2086 # one word per package
$SUDO apt-get install -y -qq --no-install-recommends $missing
