#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Make sure Debian's chromium package is installed: the HTML leaderboard test drives it headless
# (tests/leaderboard/test_html.py). Does nothing when /usr/bin/chromium already exists.
set -eu
[ -x /usr/bin/chromium ] && exit 0
if [ "$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium
