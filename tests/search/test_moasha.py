# SPDX-License-Identifier: Apache-2.0
"""MO-ASHA's rung rule and the multi-objective selection on hand-made results with known fronts
(search/moasha.py, search/objectives.py); the config's one-line errors for objectives, constraints and rules."""
from __future__ import annotations

import math
import pickle
from types import SimpleNamespace

import pytest
from ray.tune.schedulers import TrialScheduler

from otarena.search import config as config_lib
from otarena.search.moasha import MOASHAScheduler, promote
from otarena.search.objectives import (Selection, crowding_distance, dominates, non_dominated_fronts, pareto_front,
                                       sort_key)
from otarena.search.run import choose, pareto_set

# Two maximized objectives (robust, clean). Front 1: a, b, c; front 2: d (beaten by b only); front 3: e
# (beaten by b and d); front 4: f (beaten by everything).
POINTS = {"a": (0.9, 0.1), "b": (0.5, 0.5), "c": (0.1, 0.9), "d": (0.4, 0.4), "e": (0.2, 0.2), "f": (0.05, 0.05)}


def test_dominance_and_fronts():
    assert dominates((0.5, 0.5), (0.4, 0.5)) and not dominates((0.5, 0.5), (0.5, 0.5))
    assert not dominates((0.9, 0.1), (0.1, 0.9)) and not dominates((0.1, 0.9), (0.9, 0.1))
    assert dominates((0.1, 0.1), (float("nan"), 0.1))   # a trial that never scored loses
    names = list(POINTS)
    fronts = non_dominated_fronts(list(POINTS.values()))
    assert [[names[i] for i in front] for front in fronts] == [["a", "b", "c"], ["d"], ["e"], ["f"]]
    assert [names[i] for i in pareto_front(list(POINTS.values()))] == ["a", "b", "c"]
    assert pareto_front([(0.3, 0.3), (0.3, 0.3)]) == [0, 1]   # equal points are both kept


def test_crowding_distance_prefers_the_isolated_point():
    # One front of four: the two ends are infinitely far; of the inner two, the one with the wider gap
    # between its neighbours (1.7 against 1.1, summed over the two objectives) comes first.
    points = [(1.0, 0.0), (0.9, 0.2), (0.5, 0.6), (0.0, 1.0)]
    distance = crowding_distance(points, [0, 1, 2, 3])
    assert distance[0] == distance[3] == math.inf
    assert distance[1] == pytest.approx(0.5 + 0.6) and distance[2] == pytest.approx(0.9 + 0.8)
    order = sorted(range(4), key=lambda i: sort_key(points)[i])
    assert order[2:] == [2, 1]


def test_rung_rule_on_known_fronts():
    recorded = [POINTS[k] for k in "abcef"]
    # d is on the second front: four results ahead of it out of six, not in the top third.
    assert not promote(recorded, POINTS["d"], reduction_factor=3)
    # A point dominating everything is first.
    assert promote(recorded, (0.95, 0.95), reduction_factor=3)
    # The first result at a rung always goes on, as in ASHA.
    assert promote([], (0.0, 0.0), reduction_factor=3)
    # On the first front, ties broken by crowding: b sits between the two ends a and c.
    assert not promote([POINTS["a"], POINTS["c"]], POINTS["b"], reduction_factor=3)
    assert promote([POINTS["a"]], POINTS["c"], reduction_factor=2)   # two ends: neither is ahead
    # Equal results never stop each other.
    assert promote([(0.5, 0.5)], (0.5, 0.5), reduction_factor=2)
    # One objective: the rank among the recorded values, as ASHA (top half with reduction factor 2).
    assert promote([(0.3,), (0.6,)], (0.5,), reduction_factor=2)
    assert not promote([(0.3,), (0.6,), (0.7,)], (0.5,), reduction_factor=2)


def _trial(trial_id):
    return SimpleNamespace(trial_id=trial_id)


def _result(epoch, robust, clean):
    return {"training_iteration": epoch, "val/pgd_acc": robust, "val/clean_acc": clean}


def test_scheduler_stops_at_rungs_and_its_records_survive_a_restore(tmp_path):
    """Tune restores a scheduler from tuner.pkl, pickled before the first trial: the rung records come back
    from the state file the scheduler keeps in the experiment folder."""
    state = str(tmp_path / "experiment" / "moasha-rungs.json")
    scheduler = MOASHAScheduler(metrics=["val/pgd_acc", "val/clean_acc"], max_t=4, grace_period=1,
                                reduction_factor=2, state_path=state)
    as_built = pickle.dumps(scheduler)   # what tuner.pkl holds
    assert list(scheduler.rungs) == [1, 2]
    decide = scheduler.on_trial_result
    assert decide(None, _trial("a"), _result(1, *POINTS["a"])) == TrialScheduler.CONTINUE
    assert decide(None, _trial("c"), _result(1, *POINTS["c"])) == TrialScheduler.CONTINUE
    assert decide(None, _trial("d"), _result(1, *POINTS["d"])) == TrialScheduler.STOP
    assert decide(None, _trial("a"), _result(2, *POINTS["a"])) == TrialScheduler.CONTINUE
    assert decide(None, _trial("a"), _result(3, *POINTS["a"])) == TrialScheduler.CONTINUE   # between rungs
    assert decide(None, _trial("a"), _result(4, *POINTS["a"])) == TrialScheduler.STOP       # max_t reached

    restored = pickle.loads(as_built)
    restored.on_trial_add(None, _trial("c"))
    assert restored.rungs == {1: {"a": list(POINTS["a"]), "c": list(POINTS["c"]), "d": list(POINTS["d"])},
                              2: {"a": list(POINTS["a"])}}
    # It goes on deciding against the records of the earlier driver: e is behind a, c and d at epoch 1.
    assert restored.on_trial_result(None, _trial("e"), _result(1, *POINTS["e"])) == TrialScheduler.STOP
    again = pickle.loads(as_built)
    again.on_trial_add(None, _trial("x"))
    assert set(again.rungs[1]) == {"a", "c", "d", "e"}


def _trial_result(trial_id, robust, clean, epochs=2):
    return SimpleNamespace(error=None, checkpoint=object(), metrics={
        "trial_id": trial_id, "val/best_pgd_acc": robust, "val/best_clean_acc": clean, "training_iteration": epochs})


def _cfg(**extra):
    final_eval = extra.pop("final_eval", {})
    return config_lib.SearchConfig.model_validate({
        "name": "mo", "threat_model": {"eps": 0.2}, "methods": ["trades"],
        "objectives": ["val/pgd_acc", "val/clean_acc"], "budget": {"max_epochs": 2, "grace_epochs": 1},
        "final_eval": final_eval, **extra})


def test_pareto_set_and_the_selection_rules():
    results = [_trial_result(k, *v) for k, v in POINTS.items()] + [_trial_result("pruned", 0.3, 0.95, epochs=1)]
    # Completed trials only: the pruned trial (not dominated by any) stays out of the Pareto set.
    assert [r.metrics["trial_id"] for r in pareto_set(_cfg(), results)] == ["a", "b", "c"]
    chosen, rule = choose(results, _cfg(final_eval={"top_k": "pareto"}))
    assert [r.metrics["trial_id"] for r in chosen] == ["a", "b", "c"]
    assert rule == "the Pareto set of val/pgd_acc, val/clean_acc; first: highest val/pgd_acc"
    # A named point on the set: the most robust trial with clean accuracy >= 0.45.
    chosen, rule = choose(results, _cfg(final_eval={"select": "max val/pgd_acc where val/clean_acc >= 0.45"}))
    assert [r.metrics["trial_id"] for r in chosen] == ["b"] and rule == "highest val/pgd_acc with val/clean_acc >= 0.45"
    # The config's constraints are the default rule's conditions, and bound the Pareto set.
    cfg = _cfg(constraints=["val/clean_acc >= 0.45"], final_eval={"top_k": "pareto"})
    assert [r.metrics["trial_id"] for r in pareto_set(cfg, results)] == ["b", "c"]
    # A rule no trial meets picks the closest and says so.
    chosen, rule = choose(results, _cfg(final_eval={"select": "max val/pgd_acc where val/clean_acc >= 0.999"}))
    assert [r.metrics["trial_id"] for r in chosen] == ["pruned"]
    assert rule.endswith("no trial met it: the closest to it")
    # Single objective: unchanged, validation PGD accuracy, ties by clean accuracy.
    single = config_lib.SearchConfig.model_validate({"name": "so", "threat_model": {"eps": 0.2}, "methods": ["trades"],
                                                     "final_eval": {"top_k": 2}})
    chosen, rule = choose([_trial_result("x", 0.5, 0.8), _trial_result("y", 0.5, 0.9), _trial_result("z", 0.4, 1)],
                          single)
    assert [r.metrics["trial_id"] for r in chosen] == ["y", "x"] and rule == "highest val/pgd_acc"
    assert Selection.parse(None, ["val/pgd_acc"]).tiebreak == ("val/clean_acc",)


@pytest.mark.parametrize("extra, message", [
    ({"objectives": ["val/aa_acc"]}, "objectives: 'val/aa_acc' is not a validation metric a trial reports"),
    ({"objectives": ["val/pgd_acc", "val/pgd_acc"]}, "objectives: an objective is listed twice"),
    ({"constraints": ["val/clean_acc > 0.8"]}, "constraints: expected '<metric> >= <number>'"),
    ({"final_eval": {"top_k": "all"}}, "final_eval.top_k: expected a whole number >= 1 or 'pareto', got 'all'"),
    ({"final_eval": {"select": "best robust"}}, "final_eval.select: expected 'max <metric>'"),
    ({"budget": {"sampler": "nsga"}}, "budget.sampler: Input should be 'tpe' or 'nsga2'"),
])
def test_config_errors_are_one_line(extra, message):
    raw = {"name": "x", "threat_model": {"eps": 0.2}, "methods": ["trades"], **extra}
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.parse(raw)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_samplers_and_the_constraints_they_read():
    """budget.sampler picks TPE (multi-objective by itself on a two-direction study) or NSGA-II; the searcher sets
    the config's constraints on each finished trial from its last result (Optuna's constraint values, <= 0: met),
    where both samplers read them."""
    import optuna

    from otarena.search import spaces
    from otarena.search.objectives import Condition
    from otarena.search.run import PrunedAwareOptunaSearch

    space = _cfg().spaces()["trades"]
    assert isinstance(spaces.sampler(space, seed=0, method="trades", trials=8), spaces.StartupAwayFromDefault)
    nsga = spaces.sampler(space, seed=0, method="trades", trials=8, kind="nsga2")
    assert isinstance(nsga, optuna.samplers.NSGAIISampler) and nsga._population_size == 4
    searcher = PrunedAwareOptunaSearch(space=spaces.DefineByRun(space), metric=["val/pgd_acc", "val/clean_acc"],
                                       mode=["max", "max"], sampler=nsga, max_epochs=2,
                                       constraints=[Condition.parse("val/clean_acc >= 0.8")])
    for trial_id, clean in (("a", 0.9), ("b", 0.5), ("c", None)):
        searcher.suggest(trial_id)
        searcher.on_trial_complete(trial_id, {"training_iteration": 2, "val/pgd_acc": 0.3, "val/clean_acc": clean})
    trials = searcher._ot_study.get_trials()
    # Met by 0.1, missed by 0.3, and a trial that reported no clean accuracy misses it by a whole range.
    assert [t.constraints for t in trials] == [{"val/clean_acc >= 0.8": pytest.approx(-0.1)},
                                               {"val/clean_acc >= 0.8": pytest.approx(0.3)},
                                               {"val/clean_acc >= 0.8": 1.0}]


def test_the_example_trade_off_config():
    """configs/digits-trade-off.yaml, the README's multi-objective example, is valid and says what it runs."""
    from pathlib import Path

    from otarena.search.run import search_algorithm

    cfg = config_lib.load(str(Path(__file__).resolve().parents[2] / "configs" / "digits-trade-off.yaml"))
    assert cfg.objectives == ["val/pgd_acc", "val/clean_acc"] and cfg.final_eval.top_k == "pareto"
    assert cfg.selection().describe() == "highest val/pgd_acc with val/clean_acc >= 0.9"
    assert search_algorithm(cfg) == {"search.algorithm": "optuna-tpe-mo", "search.scheduler": "mo-asha",
                                     "search.metric": "val/pgd_acc", "search.objectives": "val/pgd_acc,val/clean_acc"}
    nsga = cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"sampler": "nsga2", "scheduler": "fifo"})})
    params = search_algorithm(nsga)
    assert params["search.algorithm"] == "optuna-nsga2" and params["search.scheduler"] == "fifo"
