# SPDX-License-Identifier: Apache-2.0
"""Dependency-free search-space declarations.

Each method declares its searchable hyperparameters next to its code as plain data (``Float``,
``Int``, ``Choice``). ``search/spaces.py`` translates them to Optuna distributions; nothing here
knows about Ray or Optuna, so ``methods/`` stays importable without them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from fractions import Fraction
from typing import Any, Union


@dataclass(frozen=True)
class _Range:
    """A numeric hyperparameter on ``[low, high]`` (log-uniform when ``log``)."""

    low: Any
    high: Any
    default: Any
    log: bool = False
    valid: tuple = (-math.inf, math.inf)
    """The values the method is defined for; a config may widen the search range up to here."""

    def __post_init__(self):
        if not self.low <= self.default <= self.high:
            raise ValueError(f"need low <= default <= high, got {self.low}, {self.default}, {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0, got {self.low}")

    def accepts(self, value: Any) -> bool:
        raise NotImplementedError

    def contains(self, value: Any) -> bool:
        return self.accepts(value) and self.low <= value <= self.high

    def is_valid(self, value: Any) -> bool:
        return self.accepts(value) and self.valid[0] <= value <= self.valid[1]

    def describe(self) -> str:
        scale = ", log" if self.log else ""
        return f"{type(self).__name__.lower()} [{self.low:g}, {self.high:g}{scale}] default {self.default:g}"


@dataclass(frozen=True)
class Float(_Range):
    """A real-valued hyperparameter."""

    def accepts(self, value: Any) -> bool:
        return _is_number(value)

    @staticmethod
    def coerce(value: Any) -> Any:
        """YAML reads ``1e-3`` and ``8/255`` as strings; accept them, and ints, as floats."""
        value = as_number(value)
        return float(value) if _is_number(value) else value


@dataclass(frozen=True)
class Int(_Range):
    """An integer hyperparameter."""

    def accepts(self, value: Any) -> bool:
        return _is_int(value)

    @staticmethod
    def coerce(value: Any) -> Any:
        return int(value) if isinstance(value, float) and value.is_integer() else value


@dataclass(frozen=True)
class Choice:
    """A categorical hyperparameter."""

    options: tuple
    default: Any = None

    def __post_init__(self):
        object.__setattr__(self, "options", tuple(self.options))
        if self.default is None:
            object.__setattr__(self, "default", self.options[0])
        if self.default not in self.options:
            raise ValueError(f"default {self.default!r} not among {self.options}")

    def contains(self, value: Any) -> bool:
        return value in self.options

    @staticmethod
    def coerce(value: Any) -> Any:
        return value

    def is_valid(self, value: Any) -> bool:
        return value in self.options

    def describe(self) -> str:
        return f"choice {list(self.options)} default {self.default!r}"


Domain = Union[Float, Int, Choice]


def as_number(value: Any) -> Any:
    """A number written as text, the float it means: ``"1e-3"`` (YAML 1.1 reads it as a string) or a
    fraction ``"8/255"`` (the README's way to write a radius; exactly the float ``8 / 255``). Anything
    else comes back unchanged, for the caller's type check to name."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    try:
        numerator, slash, denominator = text.partition("/")
        if not slash:
            return float(text)
        # Fractions are exact: the quotient is rounded once, as the division 8 / 255 is.
        return float(Fraction(numerator.strip()) / Fraction(denominator.strip()))
    except (ValueError, ZeroDivisionError):
        return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Fixed:
    """A hyperparameter pinned to one value by a config (not searched)."""

    value: Any
    default: Any = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "default", self.value)

    def contains(self, value: Any) -> bool:
        return value == self.value

    def describe(self) -> str:
        return f"fixed {self.value!r}"


RANGE_KEYS = ("low", "high", "log", "options", "default")
"""The keys of a range override (``narrow``)."""


def _kind(domain: Domain) -> str:
    return "a whole number" if isinstance(domain, Int) else "a number"


def _check_value(name: str, domain: Domain, value: Any) -> None:
    """A fixed value: the wrong type and a value the method is not defined for get different words."""
    if isinstance(domain, Choice):
        if not domain.is_valid(value):
            raise ValueError(f"{name}={value!r} is not one of {list(domain.options)}")
        return
    if not domain.accepts(value):
        raise ValueError(f"{name}: expected {_kind(domain)}, got {value!r}")
    if not domain.is_valid(value):
        low, high = domain.valid
        raise ValueError(f"{name}={value!r} is outside its valid domain [{low:g}, {high:g}]")


def _list_message(name: str, domain: Domain, values) -> str:
    """A YAML list where one value or a range mapping is expected: what to write instead."""
    if isinstance(domain, Choice):
        return (f"{name}: a list {list(values)!r} is not a value; to search among options write "
                f"{{options: {list(values)}}}, to fix it write one of {list(domain.options)}")
    bounds = (f"{{low: {values[0]}, high: {values[1]}}}" if len(values) == 2
              else "{low: L, high: H}")
    return (f"{name}: a list {list(values)!r} is not a range; to search it write {bounds} "
            f"(add log: true for a log scale), to fix it write one number")


def narrow(name: str, domain: Domain, override: Any) -> Domain | Fixed:
    """Apply a config override to a declared domain; raise ``ValueError`` on an invalid one.

    ``override`` is either a plain value (pins the parameter) or a mapping with any of
    ``low``, ``high``, ``log``, ``options``, ``default``. A range may be narrowed, or widened up
    to the method's ``valid`` domain (the declared range is the paper's advice, not a law).
    """
    if isinstance(override, (list, tuple)):
        raise ValueError(_list_message(name, domain, override))
    if not isinstance(override, dict):
        override = domain.coerce(override)
        _check_value(name, domain, override)
        return Fixed(override)
    unknown = set(override) - set(RANGE_KEYS)
    if unknown:
        raise ValueError(f"{name}: unknown range keys {sorted(unknown)} (use {', '.join(RANGE_KEYS)})")
    if isinstance(domain, Choice):
        options = tuple(override.get("options", domain.options))
        bad = [o for o in options if not domain.is_valid(o)]
        if bad or not options:
            raise ValueError(f"{name}: options {bad or options} are not among {list(domain.options)}")
        default = override.get("default", domain.default if domain.default in options else options[0])
        return Choice(options, default)
    low = domain.coerce(override.get("low", domain.low))
    high = domain.coerce(override.get("high", domain.high))
    for key, bound in (("low", low), ("high", high)):
        if not domain.accepts(bound):
            raise ValueError(f"{name}.{key}: expected {_kind(domain)}, got {bound!r}")
        if not domain.is_valid(bound):
            raise ValueError(f"{name}: range [{low}, {high}] leaves the valid domain {list(domain.valid)}")
    if low > high:
        raise ValueError(f"{name}: low {low} > high {high}")
    default = domain.coerce(override.get("default", min(max(domain.default, low), high)))
    try:
        return replace(domain, low=low, high=high, default=default, log=override.get("log", domain.log))
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None
