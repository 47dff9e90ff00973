# SPDX-License-Identifier: Apache-2.0
"""The ``otarena.*`` MLflow tag names, declared once: ``search/`` writes them, ``leaderboard/`` reads them.

``docs/mlflow-schema.md`` says what each holds and on which runs. This module imports nothing, so
``search/`` can use it without pulling in the leaderboard's writers, and ``leaderboard/`` never has to
import ``search/`` (or torch) to know a name.
"""

PREFIX = "otarena."
"""Every otarena tag starts with it; a seed run copies the trial's tags that do (less the trial's own)."""

ROLE = "otarena.role"
"""What a run is: ``search``, ``trial``, ``seed``, ``evaluation`` or ``lost``."""
METHOD = "otarena.method"
DATASET = "otarena.dataset"
ARCH = "otarena.arch"
NORM = "otarena.norm"
EPS = "otarena.eps"
"""The threat model's radius, as ``repr(float)``."""
SEARCH_KEYS = (METHOD, DATASET, ARCH, NORM, EPS)
"""The tags that identify one method's search (parent, trials, seeds and evaluations all carry them)."""
PAPER = "otarena.paper"
"""The method's short citation (``Madry et al., Title (ICLR 2018)``): the page's hover text."""
PAPER_LINK = "otarena.paper_link"
PAPER_TITLE = "otarena.paper_title"
"""The paper's title alone, its authors (comma-separated) and venue: RobustBench's ``name``, ``authors``
and ``venue``."""
PAPER_AUTHORS = "otarena.paper_authors"
PAPER_VENUE = "otarena.paper_venue"
RANK_BY = "otarena.rank_by"
"""``certified_acc`` on a certified method's runs whose config asks to rank them by certified accuracy
(``final_eval.rank_certified``); absent otherwise: AutoAttack ranks, else PGD."""

TRIAL_ID = "otarena.trial_id"
"""Ray Tune's trial id: the one key a trial's run is found by."""
OUTCOME = "otarena.outcome"
"""``completed``, ``pruned`` or ``failed``."""
SEARCHED = "otarena.searched"
"""Comma-separated names of the searched hyperparameters."""
NODE_ID = "otarena.node_id"
CHECKPOINT = "otarena.checkpoint"
FAILURE = "otarena.failure"
RAY_PATH = "otarena.ray_path"
"""On a search's parent run: the Ray experiment folder that ``--resume`` restores."""
TRACKING_OUTAGE_S = "otarena.tracking_outage_s"
FIDELITY_REASON = "otarena.fidelity.rung_"
"""On a search's parent run, ``otarena.fidelity.rung_<epoch>``: why that rung has no rank fidelity
(``fidelity/rung_<epoch>`` metric), e.g. too few trials reached max_epochs (search/fidelity.py)."""
REPRODUCES = "otarena.reproduces"
"""On an ``otarena reproduce`` run: the claim set it measured (``003:Table 6``); its table is the artifact
``reproduction/<paper>-<table>-<budget>.json``."""
REPRODUCTION_BUDGET = "otarena.budget"
"""``paper``, ``reduced`` or ``custom``: how much of the paper's setting the reproduction ran."""
REPRODUCTION_SETTING = "otarena.reproduction_setting"
"""``paper`` (trained with the paper's hyperparameters) or ``tuned`` (the best trial of an otarena search)."""
DEVIATIONS = "otarena.deviations"
"""A reproduction run's departures from the paper's setting, as a JSON list of sentences."""
INTERRUPTED = "otarena.interrupted"
"""``true`` on a search's parent run (KILLED) and its running trials' runs that a Ctrl-C stopped;
``otarena search --resume`` continues them and removes it."""

EVALUATED = "otarena.evaluated"
"""``true`` once the final evaluation has run. On a search's parent run: ``false`` from the end of its
search until its final evaluation is recorded, then ``true``."""
FLAGS = "otarena.flags"
FLAG_REASONS = "otarena.flag_reasons"
"""A JSON object ``{flag: one-line reason}``."""
EPS_SWEEP = "otarena.eps_sweep"
TEST_POINTS = "otarena.test_points"
"""``<n_ex>:<index hash>`` on an evaluated run that stored its per-point outcomes (the artifact
``evaluation/per_example.npz``): two runs with the same value were evaluated on the same points."""
PER_EXAMPLE_HASH = "otarena.per_example_hash"
"""The SHA-256 (16 hex digits) of that artifact's outcome arrays: a changed evaluation has another."""
CERTIFICATE_REFUSED = "otarena.certificate_refused"

DEFAULT = "otarena.default"
"""``true`` on the trial run of the method's paper defaults, its search's first trial (``points_to_evaluate``),
once the final evaluation has scored it on the test split too."""
DEFAULT_RUN = "otarena.default_run"
"""On an evaluated trial run: the run holding its search's paper-default evaluation (the default trial's own run
when it was selected, else an ``evaluation`` run under it), whose numbers it carries as ``default/*``."""

SEED = "otarena.seed"
SEED_OF = "otarena.seed_of"
"""On a seed run: the trial run it replicates."""
EVALUATES = "otarena.evaluates"
"""On an ``otarena evaluate`` run: the trial run it evaluates."""

OBJECTIVES = "otarena.objectives"
"""On a search's parent run and its trials: the comma-separated metrics the search maximized (``objectives``);
absent on a single-objective search of ``val/pgd_acc``."""
PARETO = "otarena.pareto"
"""``true`` on a trial run in its multi-objective search's Pareto set (no other trial of the search at least as
good on every objective and better on one); the parent run holds the set as ``search/pareto.json``."""
SELECTION_RULE = "otarena.selection_rule"
"""On a search's parent run and its evaluated trials: the rule, in words, that chose the leaderboard row on
validation (``final_eval.select``), shown on the page."""
SELECTION_RANK = "otarena.selection_rank"
"""On each evaluated trial: its place in the selection rule's order, ``1`` for the rule's pick. Only a search's
pick competes for its leaderboard row, so that ``top_k > 1`` or ``top_k: pareto`` never puts a trial the rule
ranks lower on the board."""
OPTUNA_STUDY = "otarena.optuna_study"
OPTUNA_STORAGE = "otarena.optuna_storage"
"""On a search's parent run: its persistent Optuna study's name and the storage URL it lives in
(``optuna-dashboard <storage>`` opens it; passwords are left out)."""
IMPORTANCE_REASON = "otarena.importance_reason"
"""On a search's parent run without ``importance/<param>`` metrics: why (e.g. too few completed trials)."""
