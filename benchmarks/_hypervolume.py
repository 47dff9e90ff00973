# SPDX-License-Identifier: Apache-2.0
"""The hypervolume of a set of (clean, robust) accuracy pairs: how much of the trade-off plane a search covers."""
from __future__ import annotations

from typing import Iterable, Sequence


def hypervolume(points: Iterable[Sequence[float]]) -> float:
    """The area that ``points`` dominate above the reference point (0, 0), both coordinates maximized: exact in 2-D.

    Swept by the first coordinate, highest first: a point that raises the best second coordinate seen so far adds
    the strip between the two, as wide as its own first coordinate (every point seen before is at least as wide).
    Coordinates below the reference count as on it.
    """
    area, top = 0.0, 0.0
    for x, y in sorted(((max(0.0, x), max(0.0, y)) for x, y in points), key=lambda p: (-p[0], -p[1])):
        if y > top:
            area += x * (y - top)
            top = y
    return area
