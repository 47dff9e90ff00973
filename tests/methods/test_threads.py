# SPDX-License-Identifier: Apache-2.0
"""Torch's threads fit the cores this process may use (issue #14, item 3)."""
from __future__ import annotations

import os

import pytest
import torch

from otarena.methods.common import train
from otarena.methods.common.train import _cgroup_quota, set_threads, usable_cpus


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_usable_cpus_never_exceed_the_affinity():
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))


@pytest.mark.parametrize("files, quota", [
    ({"cpu.max": "150000 100000\n"}, 1.5),
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
    ({"cpu.max": "garbled"}, None),
])
def test_cgroup_quota_of_v1_and_v2(tmp_path, files, quota):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cgroup_quota(str(tmp_path)) == quota


def test_a_quota_caps_the_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(64)))
    monkeypatch.setattr(train, "_cgroup_quota", lambda: 1.5)
    assert usable_cpus() == 2  # a fraction of a core still runs a thread


def test_set_threads_defaults_to_the_usable_cores_at_most_torchs_own(restore_threads, monkeypatch):
    monkeypatch.setattr(train, "usable_cpus", lambda: 3)
    torch.set_num_threads(8)   # torch's default on a host with more cores than this process may use
    assert set_threads() == 3 == torch.get_num_threads()
    torch.set_num_threads(1)   # OMP_NUM_THREADS=1 is a cap the default keeps
    assert set_threads() == 1
    assert set_threads(2.0) == 2 == torch.get_num_threads()   # a trial's CPU reservation
    assert set_threads(0.5) == 1
