# SPDX-License-Identifier: Apache-2.0
"""What a real search left in its stored Optuna study, checked against its MLflow runs (search/studies.py)."""
from __future__ import annotations

import math
from collections import Counter

import optuna

STATE = {"completed": optuna.trial.TrialState.COMPLETE, "pruned": optuna.trial.TrialState.PRUNED}


def check_stored_study(parent, trials: list, param: str) -> Counter:
    """The parent run's study is the storage's only study of that name, nothing in it is left RUNNING, and each
    finished trial run is there in the state MLflow gives it (completed: COMPLETE, pruned: PRUNED), found by its
    searched ``param``; the study has a finished trial for each. Returns MLflow's outcomes counted."""
    storage, name = parent.data.tags["otarena.optuna_storage"], parent.data.tags["otarena.optuna_study"]
    assert storage.startswith("sqlite:////"), storage   # absolute: a resume from elsewhere opens the same file
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    assert names.count(name) == 1, names
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    assert study.metric_names == ["val/pgd_acc"]
    stored = study.get_trials(deepcopy=False)
    assert not [t.number for t in stored if t.state == optuna.trial.TrialState.RUNNING]
    outcomes = Counter()
    for run in trials:
        outcome = run.data.tags.get("otarena.outcome")
        if outcome not in STATE:
            continue
        outcomes[outcome] += 1
        value = float(run.data.params[param])
        matches = [t.state for t in stored if math.isclose(t.params.get(param, math.nan), value, rel_tol=1e-9)]
        # After a resume the sampler, restored as Ray saved it, draws again what the killed driver drew after that
        # save: such a trial of the killed driver is there too with the same params, FAIL or as it ended.
        assert STATE[outcome] in matches, (run.data.tags["otarena.trial_id"], outcome, matches)
    finished = Counter(t.state for t in stored)
    assert all(finished[STATE[outcome]] >= n for outcome, n in outcomes.items()), (finished, outcomes)
    return outcomes
