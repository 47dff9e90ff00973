# SPDX-License-Identifier: Apache-2.0
"""A fair share of the cluster's trial slots for the searches of a campaign that run at once (docs/cluster.md).

Every method search of a concurrent campaign is its own Tuner in its own Ray task (search/run.py). Left
alone, the first Tuner to start would fill every slot and the others would wait for its trials. Here the
slots are divided among the searches still running by water-filling (:func:`fair_shares`): each gets an
equal level, a search that wants fewer than the level keeps only what it wants, and the rest is divided
among the others; as searches finish, the level rises and their slots go to the searches still running.

Three pieces:

- :func:`fair_shares`, the rule, pure;
- :class:`Campaign`, a small Ray actor the driver starts: it holds each search's demand and answers its
  share; it also relays the searches' log lines to the driver (which starts Ray with
  ``log_to_driver=False``) and carries the driver's Ctrl-C to every search;
- :class:`FairShareLimiter`, Ray's ``ConcurrencyLimiter`` whose limit is the search's current share: its
  ``suggest`` returns ``None`` while the search holds its share, as the ConcurrencyLimiter's does when full.

A search never loses a running trial to another: when its share drops below what it holds, it starts no
new trial until its running ones finish. A search with trials left always holds one, at least: with more
searches than slots, those beyond the slots wait with one trial each in Ray's queue.
"""
from __future__ import annotations

import time
from typing import Optional

import ray
from ray.tune.search import ConcurrencyLimiter


def fair_shares(slots: int, demands: dict[str, int]) -> dict[str, int]:
    """Water-filling: divide ``slots`` among the searches by ``demands`` (slots each could use now).

    Each round gives every search still wanting more an equal level of what is left; a search wanting
    less than the level takes only its demand, and what it leaves goes round again. When fewer slots are
    left than searches want one, they go one each in the order of ``demands`` (the campaign's order), so
    that the shares never add up to more than ``slots``.
    """
    shares = {key: 0 for key in demands}
    wanting = [key for key, demand in demands.items() if demand > 0]
    left = max(int(slots), 0)
    while left > 0 and wanting:
        level = left // len(wanting)
        if level == 0:
            for key in wanting[:left]:
                shares[key] += 1
            break
        for key in list(wanting):
            given = min(level, demands[key] - shares[key])
            shares[key] += given
            left -= given
            if shares[key] >= demands[key]:
                wanting.remove(key)
    return shares


@ray.remote(num_cpus=0)
class Campaign:
    """The campaign's shared state: slot pools and demands, the searches' log lines, the stop request.

    A pool is the slots of one trial shape (its CPUs and GPUs per trial): searches of configs with the
    same shape share one. The driver registers every search with its whole trial budget as demand before
    any starts, so that the first Tuner up does not take every slot.
    """

    def __init__(self):
        self.sizes: dict[str, int] = {}
        self.demands: dict[str, dict[str, int]] = {}
        self.log_lines: list[str] = []
        self.stop_requested = False

    def register(self, pool: str, slots: int, search: str, demand: int) -> None:
        self.sizes[pool] = max(self.sizes.get(pool, 0), int(slots))
        self.demands.setdefault(pool, {})[search] = int(demand)

    def share(self, pool: str, search: str, demand: int) -> int:
        """``search``'s share of ``pool`` now that it can use ``demand`` slots."""
        demands = self.demands.setdefault(pool, {})
        demands[search] = int(demand)
        return fair_shares(self.sizes.get(pool, 1), demands)[search]

    def finished(self, pool: str, search: str) -> None:
        self.demands.get(pool, {}).pop(search, None)

    def shares(self, pool: str) -> dict[str, int]:
        return fair_shares(self.sizes.get(pool, 1), self.demands.get(pool, {}))

    def say(self, line: str) -> None:
        self.log_lines.append(line)

    def lines(self) -> list[str]:
        lines, self.log_lines = self.log_lines, []
        return lines

    def stop(self) -> None:
        self.stop_requested = True

    def stopping(self) -> bool:
        return self.stop_requested


class Connection:
    """A search task's link to the campaign: its pool and name, and a cached share (one actor call
    per ``REFRESH_S`` at most: Tune asks the searcher at every step of its loop)."""

    REFRESH_S = 0.2

    def __init__(self, campaign, pool: str, search: str):
        self.campaign, self.pool, self.search = campaign, pool, search
        self.asked: Optional[tuple[int, float, int]] = None   # (demand, when, share)
        self.stopped = False
        """Set when the driver got a Ctrl-C: the search suggests no further trial while Tune stops."""

    def share(self, demand: int) -> int:
        now = time.monotonic()
        if self.asked is None or self.asked[0] != demand or now - self.asked[1] > self.REFRESH_S:
            self.asked = (demand, now, ray.get(self.campaign.share.remote(self.pool, self.search, demand)))
        return self.asked[2]

    def finished(self) -> None:
        ray.get(self.campaign.finished.remote(self.pool, self.search))


CONNECTION: Optional[Connection] = None
"""Set in a search task (``connect``); the limiter, unpickled with a restored Tuner, finds it here."""


def connect(campaign, pool: str, search: str) -> Connection:
    global CONNECTION
    CONNECTION = Connection(campaign, pool, search)
    return CONNECTION


def disconnect() -> None:
    global CONNECTION
    CONNECTION = None


class FairShareLimiter(ConcurrencyLimiter):
    """A ConcurrencyLimiter whose limit is the search's fair share of the campaign's slots.

    Its demand is what it could run now: its live trials plus the trials of its budget not yet suggested.
    Outside a concurrent campaign (no ``CONNECTION``, e.g. a search started concurrently and resumed with
    ``--sequential``) its limit is the whole ``max_concurrent`` again. It holds no actor handle: Tune pickles the searcher into
    the experiment, and a restored one reconnects through ``CONNECTION``.
    """

    def __init__(self, searcher, max_concurrent: int, trials: int):
        super().__init__(searcher, max_concurrent)
        self.slots, self.trials, self.suggested = max_concurrent, trials, 0

    def suggest(self, trial_id: str) -> Optional[dict]:
        if CONNECTION is None:
            self.max_concurrent = self.slots
        elif CONNECTION.stopped and self.live_trials:
            return None
        else:
            demand = len(self.live_trials) + max(self.trials - self.suggested, 0)
            # Never none at all: with no trial pending or running, Tune's controller waits for a suggestion in
            # a loop of its own (up to 10 minutes) that a Ctrl-C does not end. A search whose share is 0 gets
            # one trial, which waits in Ray's queue for a slot like any pending trial.
            self.max_concurrent = max(CONNECTION.share(demand), 1 if demand else 0)
        suggestion = super().suggest(trial_id)
        if suggestion is not None and trial_id in self.live_trials:
            self.suggested += 1
        return suggestion


def limiter(searcher, max_concurrent: int, trials: int) -> ConcurrencyLimiter:
    """The searcher's limiter: its fair share inside a concurrent campaign, else ``max_concurrent``."""
    if CONNECTION is None:
        return ConcurrencyLimiter(searcher, max_concurrent)
    return FairShareLimiter(searcher, max_concurrent, trials)
