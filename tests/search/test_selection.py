# SPDX-License-Identifier: Apache-2.0
"""Model selection never sees the test split (docs/architecture.md, Selection rules).

The validation split is carved from the training files and never overlaps the test split
(tests/methods/test_data.py checks every dataset's splits image by image). Here: training loads no
test data, and both places that choose a trial, the search's top-k and the leaderboard's
representative row, raise if they touch a test metric.
"""
from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from otarena import methods
from otarena.leaderboard.schema import Row, selection_key, tabulate
from otarena.methods.common import data as data_lib
from otarena.search.run import top_k


class ReadTestMetric(AssertionError):
    pass


class ValidationOnly(dict):
    """Trial metrics whose test entries explode when read."""

    def _guard(self, key):
        if str(key).startswith("test/"):
            raise ReadTestMetric(f"selection read {key}")

    def __getitem__(self, key):
        self._guard(key)
        return super().__getitem__(key)

    def get(self, key, default=None):
        self._guard(key)
        return super().get(key, default)


def _result(trial_id, val_pgd, val_clean, test_aa):
    metrics = ValidationOnly({"trial_id": trial_id, "val/best_pgd_acc": val_pgd, "val/best_clean_acc": val_clean,
                              "test/aa_acc": test_aa, "test/pgd_acc": test_aa})
    return SimpleNamespace(metrics=metrics, error=None, checkpoint=object())


def test_top_k_reads_validation_metrics_only():
    results = [_result("a", 0.40, 0.90, test_aa=0.99), _result("b", 0.50, 0.80, test_aa=0.10),
               _result("c", 0.50, 0.85, test_aa=0.20)]
    chosen = top_k(results, 2)
    # By validation PGD, ties by validation clean; the test numbers would have picked "a".
    assert [r.metrics["trial_id"] for r in chosen] == ["c", "b"]


class GuardedRow(Row):
    """A leaderboard row whose test fields explode when read."""

    def __getattribute__(self, name):
        if name in ("aa_acc", "pgd_acc", "clean_acc", "certified_acc", "aa_acc_mean", "aa_ci") \
                and object.__getattribute__(self, "_guarded"):
            raise ReadTestMetric(f"selection read {name}")
        return object.__getattribute__(self, name)


def _row(run_id, val_pgd, aa):
    row = GuardedRow(run_id=run_id, experiment_id="1", dataset="digits", norm="Linf", eps=0.2, method="trades",
                     arch="small_cnn", aa_acc=aa, clean_acc=0.9, pgd_acc=aa, val_pgd_acc=val_pgd, val_clean_acc=0.9)
    object.__setattr__(row, "_guarded", True)
    return row


def test_leaderboard_selection_reads_validation_metrics_only():
    best_on_val, best_on_test = _row("r1", 0.6, 0.30), _row("r2", 0.5, 0.55)
    assert min([best_on_test, best_on_val], key=selection_key) is best_on_val
    for row in (best_on_val, best_on_test):
        object.__setattr__(row, "_guarded", False)
    table, = tabulate([best_on_test, best_on_val])
    assert [r.run_id for r in table.rows] == ["r1"]
    assert dataclasses.is_dataclass(table.rows[0])


def test_training_never_loads_the_test_split(monkeypatch):
    loaded = []
    real_load = data_lib.load

    def spy(name, split, **kwargs):
        loaded.append(split)
        return real_load(name, split, **kwargs)

    monkeypatch.setattr(data_lib, "load", spy)
    run = methods.build_run("pgd_at", {"epochs": 1, "batch_size": 64, "val_n_ex": 32, "val_pgd_steps": 1,
                                       "attack_steps": 1},
                            dataset="digits", arch="small_cnn", threat=methods.ThreatModel("Linf", 0.2), device="cpu")
    methods.fit(run)
    assert sorted(set(loaded)) == ["train", "val"]
    assert run.val.split == "val" and run.train.split == "train"


def test_guard_catches_a_test_read():
    with pytest.raises(ReadTestMetric):
        _result("a", 0.1, 0.1, 0.1).metrics.get("test/aa_acc")
