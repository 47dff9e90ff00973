# SPDX-License-Identifier: Apache-2.0
"""The source papers' published numbers, as data: the schema of ``claims/*.yaml`` and its loader.

Each file of the repository's ``claims/`` folder (installed as the package data of
``otarena.claims``) holds one paper's numbers. A :class:`Claim` is one published number: the
paper and where in it (table, row, column), the threat model (dataset, norm, eps), the network
and method, the training setting the paper states, the metric and how the paper measured it, and
the value as printed. A number the paper only gives relative to a baseline (ARMOR_D's "+1.9%
AutoAttack on CIFAR-10") is a claim with ``relative_to`` set: its value is the printed difference in
points.

A file::

    paper: {seed: 003_....txt, title: ..., citation: ..., link: ..., source: ...}
    shared: {...}        # optional: blocks the claims reuse through YAML anchors; not read otherwise
    note: ...            # optional: what the paper or its code publishes, when it is no number
    claims:
      - {table: Table 1, row: PGD-AT, column: AA, dataset: mnist, norm: linf, eps: 0.3, ...}

Names: ``method`` is otarena's method name where one implements the row (``pgd_at``,
``got_trades_lm``, ...), else the paper's own; ``arch`` is otarena's network name where it has the
paper's network, else null, and ``architecture`` is the network as the paper names it. ``eps`` is a
number in pixel units of [0, 1] images or a fraction (``8/255``); ``eps_printed`` keeps what the
paper prints when it differs (seed 003 prints ``8/225`` for 8/255).

:func:`read` and :func:`load` refuse a malformed row with one line naming the file, the row and the problem
(:class:`ClaimsError`). :func:`reported` finds the claim a leaderboard row reproduces, for
RobustBench's ``reported`` field (:mod:`leaderboard.robustbench`).

This module reads YAML only: the leaderboard layer imports it, so it never imports torch.
"""

from __future__ import annotations

import functools
import math
from importlib import resources
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

METRICS = ("clean", "fgsm", "pgd", "autoattack", "certified", "train_adversarial")
"""``train_adversarial``: accuracy on the training set under the training attack (seed 004)."""

ROBUST_PREFERENCE = ("autoattack", "pgd", "fgsm")
"""Which claim stands for a leaderboard row's robust accuracy: AutoAttack, else the closest robust
metric the paper printed (PGD with the most steps, then FGSM)."""

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$"


class ClaimsError(ValueError):
    """A claims file that cannot be read or that breaks the schema; the message is one line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _eps(value: object) -> object:
    """``8/255`` (a fraction, as papers write it) as a number; other values as given."""
    if isinstance(value, str) and "/" in value:
        top, _, bottom = value.partition("/")
        try:
            return float(top) / float(bottom)
        except (ValueError, ZeroDivisionError):
            raise ValueError(f"{value!r} is not a number or a fraction a/b") from None
    return value


class Training(_Strict):
    """The training setting the paper states; null where it states nothing."""

    epochs: Optional[int] = Field(None, ge=1)
    optimizer: Optional[str] = None
    lr: Optional[float] = Field(None, gt=0)
    momentum: Optional[float] = Field(None, ge=0)
    weight_decay: Optional[float] = Field(None, ge=0)
    batch_size: Optional[int] = Field(None, ge=1)
    attack: Optional[str] = None
    """The training attack as the paper names it (``PGD``, ``Langevin``, ``TRADES KL``)."""
    attack_steps: Optional[int] = Field(None, ge=1)
    attack_eps: Optional[float] = Field(None, gt=0)
    """The training radius when it differs from the claim's ``eps`` (seed 003's Table 6)."""
    attack_step_size: Optional[float] = Field(None, gt=0)
    hyperparameters: dict[str, Union[float, int, str, bool]] = {}
    """The method's own settings, under otarena's names where they exist (``got_beta``)."""
    notes: Optional[str] = None

    _fraction = field_validator("attack_eps", "attack_step_size", mode="before")(_eps)


class Metric(_Strict):
    """What the number measures, and how the paper measured it."""

    name: Literal[METRICS]
    steps: Optional[int] = Field(None, ge=1)
    """PGD iterations."""
    restarts: Optional[int] = Field(None, ge=1)
    step_size: Optional[float] = Field(None, gt=0)
    version: Optional[Literal["standard", "plus", "rand", "unknown"]] = None
    """AutoAttack's version (``unknown`` when the paper does not say)."""
    library: Optional[str] = None
    """The attack implementation, when the paper names it (``advertorch``)."""
    labels: Literal["true", "predicted"] = "true"
    """Whether the attack targets the true labels (otarena's protocol) or the model's predictions."""
    n_examples: Optional[int] = Field(None, ge=1)
    """Test points measured; null for the full test set."""

    _fraction = field_validator("step_size", mode="before")(_eps)

    @model_validator(mode="after")
    def _complete(self) -> "Metric":
        if self.name == "pgd" and self.steps is None:
            raise ValueError("a pgd metric needs its steps")
        if self.name == "autoattack" and self.version is None:
            raise ValueError("an autoattack metric needs its version (standard, plus, rand or unknown)")
        if self.name not in ("pgd", "train_adversarial") and (self.steps or self.restarts):
            raise ValueError(f"steps and restarts belong to pgd, not {self.name}")
        return self

    def describe(self, how: bool = False) -> str:
        """``PGD-40 (1 restart)``, ``AutoAttack standard``, ``clean``; with ``how``, the points and
        labels it was measured on when they are not otarena's (``AutoAttack standard, 1,000 points,
        predicted labels``)."""
        if self.name == "pgd":
            restarts = "" if self.restarts is None else f" ({self.restarts} restart{'s' * (self.restarts > 1)})"
            text = f"PGD-{self.steps}{restarts}"
        elif self.name == "autoattack":
            text = f"AutoAttack {self.version}"
        else:
            text = {"fgsm": "FGSM", "train_adversarial": "train adversarial"}.get(self.name, self.name)
        if how and self.n_examples is not None:
            text += f", {self.n_examples:,} points"
        if how and self.labels == "predicted":
            text += ", predicted labels"
        return text


class Paper(_Strict):
    seed: str = Field(pattern=r"^\d{3}_[0-9a-f]+\.txt$")
    """The seed file the numbers were read from (``003_45881f63c0658796.txt``)."""
    title: str
    citation: str
    link: Optional[str] = None
    source: str
    """Where the numbers were read: the paper's version, or the repository and file."""


class Claim(_Strict):
    """One published number."""

    paper: str
    """The paper's seed file name."""
    citation: str
    source: str
    table: str
    """``Table 1``, ``Abstract``, ..."""
    row: str
    """The row as printed (``GOT-TRADES-LM``)."""
    column: Optional[str] = None
    """The column as printed (``AA``, ``PGD 40``, ``0.4``)."""
    dataset: str = Field(pattern=_NAME)
    norm: Literal["linf", "l2"]
    eps: float = Field(gt=0, le=1)
    eps_printed: Optional[str] = None
    architecture: str
    arch: Optional[str] = Field(None, pattern=_NAME)
    method: str = Field(pattern=_NAME)
    training: Training = Training()
    metric: Metric
    protocol: tuple[str, ...] = ()
    """Departures from otarena's protocol the metric's fields do not say (free text)."""
    value: float
    """Percent as printed; with ``relative_to``, the printed difference in points."""
    relative_to: Optional[str] = None
    """The baseline a relative claim is measured against; null for an absolute number."""
    note: Optional[str] = None

    _fraction = field_validator("eps", mode="before")(_eps)

    @model_validator(mode="after")
    def _value_range(self) -> "Claim":
        if not math.isfinite(self.value):
            raise ValueError(f"value {self.value} is not a finite number")
        if self.relative_to is None and not 0 <= self.value <= 100:
            raise ValueError(f"value {self.value} is not a percent in [0, 100] (a relative claim needs relative_to)")
        return self

    @property
    def key(self) -> str:
        """``003:Table 1:PGD-AT:AA``: unique among the shipped claims."""
        return ":".join(filter(None, (self.paper[:3], self.table, self.row, self.column)))

    def departures(self) -> list[str]:
        """How the paper's measurement departs from otarena's protocol (true labels, the full test
        split, AutoAttack standard), in words; empty when it does not."""
        m = self.metric
        out = []
        if m.labels == "predicted":
            out.append("attacks on predicted labels instead of true labels")
        if m.n_examples is not None:
            out.append(f"{m.describe()} on {m.n_examples:,} test points")
        if m.name == "autoattack" and m.version != "standard":
            out.append(f"AutoAttack version {m.version}")
        if m.name == "train_adversarial":
            out.append("measured on the training set")
        if self.relative_to is not None:
            out.append(f"relative to {self.relative_to}")
        return out + list(self.protocol)

    def as_dict(self) -> dict:
        """JSON-ready, with the key and the departures."""
        return {"key": self.key, **self.model_dump(mode="json"), "departures": self.departures()}


class _File(_Strict):
    paper: Paper
    shared: dict = {}
    note: Optional[str] = None
    claims: list[dict]


def default_folder() -> Path:
    """The claims shipped with otarena (the repository's ``claims/``, package ``otarena.claims``)."""
    return Path(str(resources.files("otarena.claims")))


def files(folder: str | Path | None = None) -> list[Path]:
    """The claims files of ``folder`` (default: the shipped ones), sorted by name."""
    return sorted(Path(folder or default_folder()).glob("*.yaml"))


@dataclass(frozen=True)
class PaperClaims:
    """One claims file: its paper, its note and its claims in file order."""

    path: Path
    paper: Paper
    note: Optional[str]
    claims: tuple[Claim, ...]


def read(path: str | Path) -> PaperClaims:
    """One claims file; :class:`ClaimsError` (one line: file, row, problem) if any row is malformed."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise ClaimsError(f"{path}: {' '.join(str(err).split())}") from None
    try:
        head = _File.model_validate(raw)
    except ValidationError as err:
        raise ClaimsError(f"{path}: {_first_error(err)}") from None
    if not path.name.startswith(head.paper.seed[:3]):
        raise ClaimsError(f"{path}: the file name does not start with its paper's seed number {head.paper.seed[:3]}")
    paper = {"paper": head.paper.seed, "citation": head.paper.citation, "source": head.paper.source}
    claims, seen = [], {}
    for i, row in enumerate(head.claims, 1):
        where = _where(i, row)
        if not isinstance(row, dict):
            raise ClaimsError(f"{path}: {where}: not a mapping")
        clash = sorted(k for k in ("paper", "citation") if k in row)
        if clash:
            raise ClaimsError(f"{path}: {where}: {', '.join(clash)} come from the file's paper block")
        try:
            claim = Claim.model_validate({**paper, **row})
        except ValidationError as err:
            raise ClaimsError(f"{path}: {where}: {_first_error(err)}") from None
        if claim.key in seen:
            raise ClaimsError(f"{path}: {where}: the same table, row and column as claim {seen[claim.key]}")
        seen[claim.key] = i
        claims.append(claim)
    return PaperClaims(path, head.paper, head.note, tuple(claims))


def select(folder: str | Path | None = None, paper: str | None = None) -> list[Path]:
    """The claims files of ``folder`` (default: the shipped ones), or only ``paper``'s: a seed number
    (``003``), a seed file name or a file stem. :class:`ClaimsError` when none matches."""
    chosen = files(folder)
    if paper:
        chosen = [p for p in chosen if paper in (p.stem, p.name) or p.stem.startswith(paper)
                  or paper.startswith(p.stem[:3] + "_")]
        if not chosen:
            raise ClaimsError(f"no claims file for {paper!r}; the papers are "
                              f"{', '.join(p.stem for p in files(folder))}")
    return chosen


def load(folder: str | Path | None = None, paper: str | None = None) -> list[Claim]:
    """Every claim of ``folder`` (default: the shipped ones) or of one ``paper`` (:func:`select`)."""
    return [c for p in select(folder, paper) for c in read(p).claims]


@functools.lru_cache(maxsize=1)
def _shipped() -> tuple[Claim, ...]:
    return tuple(load())


def reported(dataset: str, norm: str, eps: float, method: str, arch: str,
             claims: tuple[Claim, ...] | list[Claim] | None = None) -> Claim | None:
    """The published number a leaderboard row stands beside, or None.

    A claim matches when dataset, norm, eps (to 1e-6), method and architecture are the row's, the
    paper trained at that eps, it is an absolute test-set number, and its metric is robust. Among the matches AutoAttack comes
    first, then PGD with the most steps, then FGSM (:data:`ROBUST_PREFERENCE`); ties keep file
    order.
    """
    pool = _shipped() if claims is None else claims
    matches = [c for c in pool
               if c.relative_to is None and c.metric.name in ROBUST_PREFERENCE and c.dataset == dataset
               and c.norm == norm.lower() and math.isclose(c.eps, eps, rel_tol=0, abs_tol=1e-6)
               and c.method == method and c.arch is not None and c.arch == arch
               # a model trained at another radius than the one attacked (seed 003's Table 6) is another model
               and (c.training.attack_eps is None or math.isclose(c.training.attack_eps, c.eps, abs_tol=1e-6))]
    if not matches:
        return None
    return min(matches, key=lambda c: (ROBUST_PREFERENCE.index(c.metric.name), -(c.metric.steps or 0)))


def _where(i: int, row: object) -> str:
    if not isinstance(row, dict):
        return f"claim {i}"
    label = " / ".join(str(row[k]) for k in ("table", "row", "column") if row.get(k) is not None)
    return f"claim {i}" + (f" ({label})" if label else "")


def _first_error(err: ValidationError) -> str:
    """Pydantic's first problem as ``field.sub: message``, on one line."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    return " ".join(f"{loc}: {message}".split()) if loc else " ".join(message.split())
