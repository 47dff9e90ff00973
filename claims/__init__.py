# SPDX-License-Identifier: Apache-2.0
"""The source papers' published numbers, one YAML file per paper (``<seed number>_<method>.yaml``).

Data only: the schema, the loader and the matching live in :mod:`otarena.leaderboard.claims`;
``otarena claims`` lists them. This folder installs as the package ``otarena.claims`` so that the
files ship with otarena.
"""
