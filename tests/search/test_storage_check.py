# SPDX-License-Identifier: Apache-2.0
"""A storage folder that refuses files stops `otarena search` with one line, before anything is written."""
import pytest
import yaml

from otarena.search.cli import main

CONFIG = {"name": "storage", "dataset": "digits", "arch": "small_cnn", "threat_model": {"norm": "Linf", "eps": 0.2},
          "methods": ["pgd_at"], "budget": {"trials": 2, "max_epochs": 1, "grace_epochs": 1}}


@pytest.mark.parametrize("storage", ["/proc/ray_results", "/proc/self/ray_results", "/dev/null/ray_results"])
def test_an_unwritable_storage_path_exits_2_before_mlflow_or_ray(tmp_path, monkeypatch, capsys, storage):
    # /proc takes no files though access() says it is writable for root: only a real write can tell.
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}))
    monkeypatch.chdir(tmp_path)
    assert main(["search", str(config), "--storage", storage]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "not writable" in err and storage in err and out == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]   # no mlflow.db, no mlruns, no site


def test_a_writable_storage_path_leaves_no_probe_behind(tmp_path):
    from otarena.search.cli import _check_writable

    _check_writable(str(tmp_path / "ray" / "results"))
    assert list((tmp_path / "ray" / "results").iterdir()) == []
