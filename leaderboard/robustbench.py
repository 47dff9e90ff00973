# SPDX-License-Identifier: Apache-2.0
"""RobustBench ``model_info`` JSON files, one per leaderboard entry.

RobustBench [1] keeps each leaderboard entry as one JSON file,
``model_info/<dataset>/<threat_model>/<ModelId>.json``, and generates its HTML, Markdown and LaTeX
tables from those files. :func:`write_model_info` writes one such file per leaderboard row, so an
otarena entry can be read by RobustBench's tooling or set beside its entries.

**Fields.** :data:`MODEL_INFO_FIELDS` are RobustBench's: the fields of its ``ModelInfo`` dataclass
(``robustbench/utils.py``, what ``benchmark(..., to_disk=True)`` writes) plus ``external`` and
``unreliable``, which its stored files and templates use. Types follow the stored files, which is
what RobustBench's readers parse, where they differ from the dataclass annotations:

* accuracies (``clean_acc``, ``autoattack_acc``, ``external``) are **strings**, percent with two
  decimals: ``"53.42"``. RobustBench's readers call ``float()`` on them and divide by 100.
* ``eps`` is a **string** as well: ``"8/255"`` for a multiple of 1/255 (CIFAR Linf), else the
  decimal (``"0.5"``, CIFAR L2), the same text as the leaderboard's table titles. The stored files
  all do this (the dataclass annotates a float, and ``benchmark`` writes one: we follow the files).
* ``reported`` (RobustBench: the number the paper claimed) is the published number of one of our
  source papers for the same dataset, norm, eps, method and architecture, when ``claims/`` has one
  (:func:`leaderboard.claims.reported`: AutoAttack, else the closest robust metric); else ``null``.
  The footnote names its source, metric and protocol, and ``otarena.reported`` has the whole claim.
* ``name``, ``authors``, ``venue`` and ``link`` come from the method's paper data (its ``paper``
  attribute in ``methods/``, written by the search as the tags ``otarena.paper_title``,
  ``otarena.paper_authors``, ``otarena.paper_venue`` and ``otarena.paper_link``), as RobustBench fills
  them: the title alone, every author comma-separated, ``ICLR 2018``-style venues (``N/A`` for the
  undefended baseline). A store written before those tags has the short citation (tag
  ``otarena.paper``) as ``name`` and ``""`` for ``authors`` and ``venue`` (RobustBench renders
  "Unpublished"). ``link`` is kept only when it is an http(s) URL.
* ``additional_data`` is false and ``number_forward_passes`` 1 (one deterministic forward pass).
* ``unreliable`` is true when a row has a warning flag (:func:`leaderboard.schema.is_warning`): the
  evaluation layer's masking and AutoAttack checks, RobustBench's meaning of the field.
* ``external`` (RobustBench: the best *lower* robust accuracy another attack found, and what it
  ranks by) is the PGD accuracy when PGD did better than AutoAttack; it is absent otherwise.
* ``footnote`` says how the entry was made: search size, test images, the AA 95% CI, the seed
  spread, why ``external`` is set, and the flags with their reasons.
* The corruption fields are left out: otarena has no corruption benchmark.

**Rows without AutoAttack.** A row of a table ranked by PGD (``final_eval.autoattack: null``) has no
``autoattack_acc``, and RobustBench's ``generate_leaderboard`` ranks every ``*.json`` of
``<dataset>/<threat_model>/`` by that field. So such entries go one folder down,
``<dataset>/<norm>/no-autoattack/``, which its tooling never reads; they carry RobustBench's other
fields, ``otarena.ranked_by`` ``"pgd_acc"`` and their rank in the PGD table, the flag
``no-autoattack`` and a footnote that says so. An entry that has AutoAttack stays in
``<dataset>/<norm>/``, whatever the table it is ranked in (a certified table: ``ranked_by``
``"certified_acc"``).

**Which numbers.** The RobustBench fields carry the trial's own accuracies: a ``model_info`` file
describes one checkpoint, the one the run id names and that can be evaluated again. For a
configuration trained with several seeds, the leaderboard ranks by the mean over seeds; that mean
and std are in the ``otarena`` object and the footnote.

**Extra key.** Everything otarena knows that RobustBench has no field for goes under one extra key,
``otarena`` (:data:`OTARENA_KEYS`): run and experiment ids, rank, accuracies as fractions in
[0, 1] at full precision, their 95% CIs and seed mean/std, ``n_ex``, flags and reasons, the
hyperparameters and the search cost. RobustBench's readers ignore it. Its fractions carry no float
noise: each is rounded to the precision its ``n_ex`` test images support (:func:`fraction`), so
132 of 200 is ``0.66``, never ``0.6600000262``.

**Escaping.** RobustBench's template renders ``name``, ``architecture`` and ``footnote`` into its
page unescaped (its name ends in ``.j2``, which jinja's ``select_autoescape(['html', 'xml'])`` does
not escape; footnotes are meant to hold HTML), so user text in those fields is HTML-escaped here.
The ``otarena`` object keeps the text as logged (it is data, and JSON encoding is its escaping),
with control characters replaced by spaces as in the CSV.

**Files.** The entry name is ``otarena_<method>_<arch>_<run id prefix>``, cut to ``[A-Za-z0-9_-]``
and unique even on a case-insensitive file system. The folder belongs to the build: an
``otarena_*.json`` entry of an earlier build that is no longer on the leaderboard is deleted, so
RobustBench's tooling, which reads every file in the folder, never ranks a stale entry. Other files
(RobustBench's own entries, copied beside ours) are never touched. Unlike RobustBench's folders,
one ``<dataset>/<norm>`` folder may hold entries at several eps; group them by ``eps``.

References:
    1. Croce, Andriushchenko, Sehwag, Debenedetti, Flammarion, Chiang, Mittal, Hein. "RobustBench:
       a standardized adversarial robustness benchmark", NeurIPS 2021 Datasets and Benchmarks
       track, arXiv:2010.09670. Repository RobustBench/robustbench: ``robustbench/utils.py``
       (``ModelInfo``, ``ACC_FIELDS``), ``model_info/cifar10/Linf/Kang2021Stable.json``.
"""

from __future__ import annotations

import html
import json
import logging
import math
import re
from pathlib import Path

from otarena.leaderboard import claims
from otarena.leaderboard.formatting import count, eps, pct, printable
from otarena.leaderboard.schema import ACCURACIES, Row, Table, is_warning

MODEL_INFO_FIELDS = (
    "link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
    "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "external", "footnote", "unreliable",
    "corruptions_acc", "corruptions_mce", "corruptions_acc_3d", "corruptions_mce_3d",
)
"""RobustBench's ``model_info`` fields, in its files' order."""

REQUIRED_FIELDS = MODEL_INFO_FIELDS[:11]
"""The fields every RobustBench entry has (``link`` ... ``reported``); each also has one of
:data:`ROBUST_ACC_FIELDS`."""

ROBUST_ACC_FIELDS = ("autoattack_acc", "corruptions_acc", "corruptions_acc_3d")
"""The ranking accuracy of a threat model (RobustBench's ``ACC_FIELDS``): an entry needs one."""

OTARENA_KEY = "otarena"
"""The one extra key an otarena entry adds to RobustBench's fields."""

OTARENA_KEYS = (
    "run_id", "run_name", "experiment_id", "experiment", "rank", "ranked_by", "method", "arch", "dataset", "norm", "eps",
    "paper", "paper_link", *ACCURACIES, *(f"{m}_{s}" for m in ACCURACIES for s in ("mean", "std")),
    *(f"{m}_ci95" for m in ACCURACIES), "n_ex", "n_seeds", "tied", "epochs", "val_pgd_acc", "val_clean_acc",
    "hyperparameters", "flags", "flag_reasons", "search_cost", "training_cost", "reported", "tuning", "overfit_gap",
)
"""Keys of the ``otarena`` object. ``ranked_by`` is the table's ranking metric (``aa_acc``, ``pgd_acc``
or ``certified_acc``) and ``rank`` the row's rank in it; ``tied`` its statistically tied group in that table
(:func:`_tied`) or null. Accuracies are fractions in [0, 1]; ``<m>_ci95`` is a
``[low, high]`` 95% Wilson interval or null; ``<m>_mean``/``_std`` are null unless ``n_seeds >= 2``;
``hyperparameters`` and ``flag_reasons`` map names to text as logged; ``search_cost`` has
``trials``, ``trial_epochs`` and ``device_hours``; ``training_cost`` this trial's own training, with
``device_hours``, ``epoch_device_s`` and ``images_per_s`` (nulls where it was not logged); ``reported`` is the
matching published claim
(:meth:`leaderboard.claims.Claim.as_dict`) or null; ``tuning`` is the paper-default trial's test numbers beside
this tuned one's (``default_clean_acc``, ``default_aa_acc``, ``default_pgd_acc``, ``gain`` in the ranking
attack's accuracy, ``default_epochs``, ``default_run_id``, the exact McNemar ``p_value`` or null) or null; ``overfit_gap`` is best minus last epoch's
validation PGD accuracy or null."""

_STR, _BOOL, _INT, _PCT, _PCT_OR_NULL, _STR_OR_NULL, _RATIO = (
    "a string", "a boolean", "an integer >= 1", "a percent string", "a percent string or null",
    "a string or null", "a number string")
_TYPES = {
    "link": _STR, "name": _STR, "authors": _STR, "additional_data": _BOOL, "number_forward_passes": _INT,
    "dataset": _STR, "venue": _STR, "architecture": _STR, "eps": _STR_OR_NULL, "clean_acc": _PCT,
    "reported": _PCT_OR_NULL, "autoattack_acc": _PCT, "external": _PCT, "unreliable": _BOOL, "footnote": _STR,
    "corruptions_acc": _PCT, "corruptions_acc_3d": _PCT, "corruptions_mce": _RATIO, "corruptions_mce_3d": _RATIO,
}
_NORMS = {"linf": "Linf", "l2": "L2"}
NO_AUTOATTACK_FOLDER = "no-autoattack"
"""The sub-folder of ``<dataset>/<norm>/`` for entries without AutoAttack, which RobustBench never reads."""
_log = logging.getLogger(__name__)


def write_model_info(tables: list[Table], folder: str | Path) -> list[Path]:
    """Write one RobustBench ``model_info`` JSON per leaderboard row.

    Args:
        tables: From :func:`leaderboard.schema.tabulate`.
        folder: The ``model_info`` root; files go to ``<folder>/<dataset>/<norm>/<entry>.json``.

    Returns:
        The files written, in table and rank order. A row without a finite test clean accuracy or
        ranking accuracy (RobustBench requires both) is left out, with a logged warning.
    """
    folder = Path(folder)
    written: list[Path] = []
    taken: set[str] = set()
    for t in tables:
        for rank, row in enumerate(t.rows, 1):
            if _finite(row.clean_acc) is None or _finite(getattr(row, t.ranking)) is None:
                _log.warning("run %s has no finite test/clean_acc and test/%s: left out of model_info",
                             row.run_id, t.ranking)
                continue
            rel = _entry_path(row, taken)
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(model_info(row, rank, t.ranking), indent=2, ensure_ascii=False, allow_nan=False)
            path.write_text(text + "\n", encoding="utf-8")
            written.append(path)
    _remove_stale(folder, set(written))
    return written


def model_info(row: Row, rank: int = 1, ranking: str | None = None) -> dict:
    """The ``model_info`` dict of one leaderboard row (``rank`` within its table, ranked by ``ranking``:
    the row's own :attr:`~leaderboard.schema.Row.ranking` by default). Without AutoAttack it has no
    ``autoattack_acc`` (see the module's "Rows without AutoAttack")."""
    claim = claims.reported(row.dataset, row.norm, row.eps, row.method, row.arch)
    info = {
        "link": _http_link(row.paper_link),
        "name": html.escape(printable(row.paper_title or row.paper or row.method)),
        "authors": html.escape(printable(row.paper_authors or "")),
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": _slug(row.dataset),  # as its folder is named
        "venue": html.escape(printable(row.paper_venue or "")),
        "architecture": html.escape(printable(row.arch)),
        "eps": eps(row.eps),
        "clean_acc": pct(row.clean_acc),
        "reported": None if claim is None else f"{claim.value:.2f}",
    }
    if row.aa_acc is not None:
        info["autoattack_acc"] = pct(row.aa_acc)
    if _external(row):
        info["external"] = pct(row.pgd_acc)
    info["footnote"] = _footnote(row, claim)
    info["unreliable"] = bool(row.warnings)
    info[OTARENA_KEY] = _otarena(row, rank, claim, ranking or row.ranking)
    return info


def validate_model_info(d: object) -> list[str]:
    """Problems that keep ``d`` from being a RobustBench ``model_info`` entry; empty when it is one.

    Checks that the :data:`REQUIRED_FIELDS` and one of :data:`ROBUST_ACC_FIELDS` are present (an
    otarena entry ranked without AutoAttack, ``otarena.ranked_by`` ``"pgd_acc"``, may lack them: it
    lives where RobustBench's tooling never reads, see the module's "Rows without AutoAttack"), that
    no key is foreign (only :data:`MODEL_INFO_FIELDS` and ``otarena``), and each field's type as the
    stored files have it: accuracies as percent strings in [0, 100], ``eps`` a string (or null, for
    corruptions), ``additional_data`` and ``unreliable`` booleans, ``number_forward_passes`` an
    integer >= 1. An ``otarena`` value must be an object with a ``run_id``.
    """
    if not isinstance(d, dict):
        return [f"not a JSON object but {type(d).__name__}"]
    problems = [f"missing field {k!r}" for k in REQUIRED_FIELDS if k not in d]
    ours = d.get(OTARENA_KEY)
    without_aa = isinstance(ours, dict) and ours.get("ranked_by") == "pgd_acc" and "autoattack_acc" not in d
    if not without_aa and not any(k in d for k in ROBUST_ACC_FIELDS):
        problems.append(f"no robust accuracy: needs one of {', '.join(ROBUST_ACC_FIELDS)}")
    if "external" in d and "autoattack_acc" not in d:
        problems.append("'external' without 'autoattack_acc'")
    for key, value in d.items():
        if key == OTARENA_KEY:
            if not isinstance(value, dict) or not isinstance(value.get("run_id"), str):
                problems.append(f"{OTARENA_KEY!r} is not an object with a 'run_id' string")
        elif key not in _TYPES:
            problems.append(f"unexpected field {key!r}")
        elif not _has_type(value, _TYPES[key]):
            problems.append(f"field {key!r} is not {_TYPES[key]}: {value!r}")
    return problems


def entry_name(row: Row, run_chars: int = 8) -> str:
    """``otarena_<method>_<arch>_<first run_chars of the run id>``, in ``[A-Za-z0-9_-]``."""
    return "_".join(["otarena", _slug(row.method), _slug(row.arch), _slug(row.run_id)[:run_chars] or "x"])


def _entry_path(row: Row, taken: set[str]) -> Path:
    """``<dataset>/<norm>/<entry>.json`` (``<norm>/no-autoattack/`` without AutoAttack), unique among
    ``taken`` (compared case-insensitively)."""
    folder = Path(_slug(row.dataset), _NORMS.get(row.norm.lower()) or _slug(row.norm))
    if row.aa_acc is None:
        folder /= NO_AUTOATTACK_FOLDER
    candidates = [entry_name(row), entry_name(row, run_chars=64)]
    candidates += [f"{candidates[-1]}-{k}" for k in range(2, 2 + len(taken) + 1)]
    for name in candidates:
        rel = folder / f"{name}.json"
        if rel.as_posix().lower() not in taken:
            taken.add(rel.as_posix().lower())
            return rel
    raise AssertionError("unreachable: more candidates than taken names")


def _slug(text: str, limit: int = 40) -> str:
    """File-name-safe text: runs of other characters become ``-``; never empty, ``.`` or ``..``."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:limit].strip("-") or "x"


def _remove_stale(folder: Path, keep: set[Path]) -> None:
    """Delete the otarena entries of an earlier build that this build did not write."""
    for path in [*folder.glob("*/*/otarena_*.json"), *folder.glob(f"*/*/{NO_AUTOATTACK_FOLDER}/otarena_*.json")]:
        if path in keep or not path.is_file():
            continue
        try:
            ours = isinstance(json.loads(path.read_text(encoding="utf-8")).get(OTARENA_KEY), dict)
        except (ValueError, OSError, AttributeError, RecursionError):
            ours = False
        if ours:
            path.unlink()


def _external(row: Row) -> bool:
    """Whether PGD found a lower robust accuracy than AutoAttack on the same test images."""
    return (row.aa_acc is not None and row.pgd_acc is not None and math.isfinite(row.pgd_acc)
            and row.pgd_acc < row.aa_acc)


def _http_link(link: str | None) -> str:
    """The paper link when it is http(s) (RobustBench puts it in an ``href`` unescaped), else ``""``."""
    link = printable(link or "").strip()
    return html.escape(link) if re.match(r"https?://[^\s\"'<>]+$", link, re.IGNORECASE) else ""


def _footnote(row: Row, claim: claims.Claim | None = None) -> str:
    """How the entry was made, as RobustBench footnotes do; HTML, with the user text escaped."""
    search = "best trial" if row.trials is None else (
        "the only trial" if row.trials == 1 else f"best of {count(row.trials)} trials")
    parts = [f"otarena: {search} of a hyperparameter search, chosen by validation PGD accuracy"]
    n_ex = f" on {count(row.n_ex)} test images" if row.n_ex is not None else ""
    if row.aa_acc is None:  # the PGD table's entry: say what ranks it, and that it is no RobustBench number
        ci = f" (95% CI {pct(row.pgd_ci[0])}–{pct(row.pgd_ci[1])}%)" if row.pgd_ci else ""
        parts.append(f"no AutoAttack: PGD accuracy {pct(row.pgd_acc)}%{n_ex}{ci}, an upper bound on robust "
                     "accuracy, ranked only against other entries without AutoAttack")
    else:
        ci = f" (95% CI {pct(row.aa_ci[0])}–{pct(row.aa_ci[1])}%)" if row.aa_ci else ""
        parts.append(f"AutoAttack{n_ex}{ci}")
    if row.n_seeds >= 2:
        spread = [f"{label} {pct(mean)} ± {pct(getattr(row, f'{m}_std'))}%"
                  for label, m in (("clean", "clean_acc"),
                                   ("AutoAttack", "aa_acc") if row.aa_acc is not None else ("PGD", "pgd_acc"))
                  if (mean := getattr(row, f"{m}_mean")) is not None]
        parts.append(f"over {row.n_seeds} training seeds" + (": " + ", ".join(spread) if spread else ""))
    if _external(row):
        parts.append(f"external: PGD accuracy, {pct(row.aa_acc - row.pgd_acc)} points below AutoAttack")
    if row.flags:
        reasons = dict(row.flag_reasons)
        parts.append("flags: " + "; ".join(
            html.escape(printable(f)) + (f" ({html.escape(printable(reasons[f]))})" if reasons.get(f) else "")
            for f in [*row.warnings, *row.notes]))
    if claim is not None:
        where = ", ".join(filter(None, (claim.table, claim.row, claim.column)))
        parts.append(f"reported: {claim.value:g}% ({html.escape(claim.metric.describe(how=True))}) in "
                     f"{html.escape(claim.citation)}, {html.escape(where)}")
    return "; ".join(parts) + "."


def _tied(row: Row) -> dict | None:
    """``otarena.tied``: ``group`` (a letter), ``ranks`` (``1–3``), the exact McNemar ``p_next`` against the next
    compared row down and ``p_next_holm`` (Holm-adjusted), or ``not_compared`` with the reason; null when the
    build compared nothing (no per-point outcomes in the store)."""
    s = row.standing
    if s is None:
        return None
    if s.group is None:
        return {"group": None, "ranks": None, "p_next": None, "p_next_holm": None, "not_compared": s.reason}
    return {"group": s.letter, "ranks": s.ranks, "p_next": _finite(s.p_next), "p_next_holm": _finite(s.p_next_holm),
            "not_compared": None}


def _tuning(row: Row, n: int | None) -> dict | None:
    """What tuning bought (``otarena.tuning``): the paper-default trial's test numbers and the gain over them."""
    if row.tuning is None:
        return None
    _, default, tuned = row.tuning
    return {"default_clean_acc": fraction(row.default_clean_acc, n), "default_aa_acc": fraction(row.default_aa_acc, n),
            "default_pgd_acc": fraction(row.default_pgd_acc, n), "gain": fraction(tuned - default, n),
            "default_epochs": _int(row.default_epochs), "default_run_id": row.default_run_id or None,
            "p_value": _finite(row.default_p)}


def _otarena(row: Row, rank: int, claim: claims.Claim | None = None, ranking: str = "aa_acc") -> dict:
    """The ``otarena`` object (:data:`OTARENA_KEYS`); its test fractions at the precision ``n_ex`` supports."""
    multi = row.n_seeds >= 2
    n = _int(row.n_ex)
    seeds_n = n * row.n_seeds if isinstance(n, int) else None  # a mean over seeds counts over them all

    def acc(x: float | None, over: int | None = n) -> float | None:
        return fraction(x, over)

    extra = {
        "run_id": row.run_id, "run_name": printable(row.run_name), "experiment_id": row.experiment_id,
        "experiment": printable(row.experiment_name), "rank": rank, "ranked_by": ranking,
        "method": printable(row.method),
        "arch": printable(row.arch), "dataset": printable(row.dataset), "norm": printable(row.norm),
        "eps": _finite(row.eps), "paper": printable(row.paper) if row.paper else None,
        "paper_link": printable(row.paper_link) if row.paper_link else None,
        **{m: acc(getattr(row, m)) for m in ACCURACIES},
        **{f"{m}_{s}": acc(getattr(row, f"{m}_{s}"), seeds_n) if multi else None
           for m in ACCURACIES for s in ("mean", "std")},
        **{f"{m}_ci95": _interval(getattr(row, f"{m.removesuffix('_acc')}_ci"), n) for m in ACCURACIES},
        "n_ex": n, "n_seeds": row.n_seeds, "tied": _tied(row), "epochs": _int(row.epochs),
        "val_pgd_acc": acc(row.val_pgd_acc, None), "val_clean_acc": acc(row.val_clean_acc, None),
        "hyperparameters": {printable(k): printable(v) for k, v in row.hparams},
        "flags": [printable(f) for f in row.flags],
        "flag_reasons": {printable(f): printable(t) for f, t in row.flag_reasons},
        "search_cost": {"trials": _int(row.trials), "trial_epochs": _int(row.trial_epochs),
                        "device_hours": fraction(row.device_hours)},  # to 1e-6 h: a clock's digits, not noise
        "training_cost": {"device_hours": fraction(row.train_device_hours),
                          "epoch_device_s": fraction(row.epoch_device_s), "images_per_s": fraction(row.images_per_s)},
        "reported": None if claim is None else claim.as_dict(),
        "tuning": _tuning(row, n),
        "overfit_gap": fraction(row.overfit_gap),
    }
    assert tuple(extra) == OTARENA_KEYS  # one list of keys, documented once
    return extra


def _has_type(value: object, kind: str) -> bool:
    if kind == _BOOL:
        return isinstance(value, bool)
    if kind == _INT:
        return isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if kind == _STR or (kind == _STR_OR_NULL and value is not None):
        return isinstance(value, str)
    if kind in (_PCT_OR_NULL, _STR_OR_NULL) and value is None:
        return True
    if not isinstance(value, str):
        return False
    try:
        number = float(value)
    except ValueError:
        return False
    return math.isfinite(number) and (kind == _RATIO or 0 <= number <= 100)


def _finite(x: float | None) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    return None if x is None or not math.isfinite(x) else float(x)


def _int(x: float | None) -> int | float | None:
    """A count logged as a float metric (``500.0``) as the integer it is."""
    x = _finite(x)
    return int(x) if x is not None and x.is_integer() else x


def _interval(ci: tuple[float, float] | None, n: int | float | None = None) -> list[float] | None:
    return None if ci is None or not all(map(math.isfinite, ci)) else [fraction(ci[0], n), fraction(ci[1], n)]


FRACTION_DECIMALS = 6
"""The most decimals a fraction keeps: 1e-6 is below any test set's resolution (1 / n_ex) and above
float32's rounding error (about 3e-8 near 1), which it removes."""


def fraction(x: float | None, n: int | float | None = None) -> float | None:
    """A fraction with the decimals that ``n`` images support: one more than ``n`` has digits, so that
    every count over ``n`` keeps its own value (at most :data:`FRACTION_DECIMALS`; that many when ``n``
    is unknown): 132 of 200 -> ``0.66``, 39 of 40 -> ``0.975``, 1 of 3 -> ``0.33``, and float32's
    ``0.9700000286102295`` -> ``0.97``. ``None`` for a missing or non-finite value."""
    x = _finite(x)
    if x is None:
        return None
    decimals = FRACTION_DECIMALS
    if n is not None and math.isfinite(n) and n >= 1:
        decimals = min(FRACTION_DECIMALS, len(str(int(n))) + 1)
    return round(x, decimals) + 0.0  # + 0.0: never -0.0
