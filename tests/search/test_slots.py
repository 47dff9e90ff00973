# SPDX-License-Identifier: Apache-2.0
"""The fair share of a campaign's trial slots (search/slots.py): the water-filling rule on hand-made
sequences of slot requests, then the same sequence through the real Campaign actor and the limiter."""
from __future__ import annotations

from ray.tune.search import ConcurrencyLimiter, Searcher

from otarena.search import slots
from otarena.search.slots import fair_shares


def test_water_filling_gives_equal_levels_and_passes_on_what_a_search_does_not_need():
    assert fair_shares(8, {"a": 16, "b": 16}) == {"a": 4, "b": 4}
    # a wants 1: the other two split the 7 it leaves, the odd slot to the earlier search.
    assert fair_shares(8, {"a": 1, "b": 16, "c": 16}) == {"a": 1, "b": 4, "c": 3}
    # Everyone satisfied: slots stay free rather than go to a search that cannot use them.
    assert fair_shares(16, {"a": 2, "b": 3}) == {"a": 2, "b": 3}
    # Fewer slots than searches: one each in the campaign's order; the rest wait for a slot to free.
    assert fair_shares(2, {"a": 5, "b": 5, "c": 5}) == {"a": 1, "b": 1, "c": 0}
    # A finished search (demand 0) holds nothing; no search, no share.
    assert fair_shares(4, {"a": 0, "b": 9}) == {"a": 0, "b": 4}
    assert fair_shares(4, {}) == {}


def test_a_campaign_redivides_the_slots_as_searches_shrink_and_finish():
    # 8 slots, three searches of a campaign; each step: (search, its demand now) -> every share after it.
    demands = {"erm": 16, "pgd_at": 16, "trades": 16}
    sequence = [
        (None, None, {"erm": 3, "pgd_at": 3, "trades": 2}),
        ("erm", 2, {"erm": 2, "pgd_at": 3, "trades": 3}),       # ERM's last two trials: its tail frees slots
        ("pgd_at", 10, {"erm": 2, "pgd_at": 3, "trades": 3}),
        ("erm", 0, {"erm": 0, "pgd_at": 4, "trades": 4}),       # ERM done: its slots go to the others
        ("trades", 1, {"erm": 0, "pgd_at": 7, "trades": 1}),
        ("trades", 0, {"erm": 0, "pgd_at": 8, "trades": 0}),
    ]
    for search, demand, expected in sequence:
        if search is not None:
            demands[search] = demand
        shares = fair_shares(8, demands)
        assert shares == expected, (search, demand)
        assert sum(shares.values()) <= 8


class Counting(Searcher):
    """A searcher that always has a suggestion: the limiter alone decides when to stop."""

    def __init__(self):
        super().__init__(metric="score", mode="max")

    def suggest(self, trial_id):
        return {"x": 1}

    def on_trial_complete(self, trial_id, result=None, error=False):
        pass


def test_the_limiter_asks_the_campaign_actor_for_its_share(ray_local):
    campaign = slots.Campaign.remote()
    for name in ("a", "b"):
        ray_local.get(campaign.register.remote("pool", 4, name, 3))
    assert ray_local.get(campaign.shares.remote("pool")) == {"a": 2, "b": 2}
    connection = slots.connect(campaign, "pool", "a")
    try:
        connection.REFRESH_S = 0.0
        limiter = slots.limiter(Counting(), 4, trials=3)
        assert isinstance(limiter, slots.FairShareLimiter)
        started = [limiter.suggest(f"t{i}") for i in range(3)]
        assert started == [{"x": 1}, {"x": 1}, None]   # its share is 2 while b wants 2 as well
        ray_local.get(campaign.finished.remote("pool", "b"))
        assert limiter.suggest("t3") == {"x": 1}       # b done: a's third trial gets b's slot
        limiter.on_trial_complete("t0", {"score": 1.0})
        assert limiter.suggest("t4") is None           # its budget of 3 is all suggested
        assert ray_local.get(campaign.shares.remote("pool")) == {"a": 2}   # live trials t1, t3 only
        connection.finished()
        assert ray_local.get(campaign.shares.remote("pool")) == {}
    finally:
        slots.disconnect()
    # More searches than slots: the one whose share is 0 still gets one trial (it waits in Ray's queue), never none.
    ray_local.get(campaign.register.remote("one", 1, "a", 3))
    ray_local.get(campaign.register.remote("one", 1, "b", 3))
    assert ray_local.get(campaign.shares.remote("one")) == {"a": 1, "b": 0}
    slots.connect(campaign, "one", "b")
    try:
        limiter = slots.limiter(Counting(), 1, trials=3)
        assert [limiter.suggest("u0"), limiter.suggest("u1")] == [{"x": 1}, None]
    finally:
        slots.disconnect()
    # Outside a campaign: Ray's own ConcurrencyLimiter, as in a sequential campaign.
    assert type(slots.limiter(Counting(), 4, trials=3)) is ConcurrencyLimiter
