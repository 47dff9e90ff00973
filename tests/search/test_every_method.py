# SPDX-License-Identifier: Apache-2.0
"""Every registered method trains through `otarena train` and searches through `otarena search`."""
import pytest
import yaml
from mlflow import MlflowClient

from otarena import methods
from otarena.search.cli import main


def _setting(name):
    cls = methods.get(name)
    arch = cls.archs[0] if cls.archs else "small_cnn"
    norm = cls.norm or "Linf"
    return arch, norm, (0.5 if norm == "L2" else 0.2)


@pytest.mark.parametrize("name", sorted(methods.REGISTRY))
def test_one_epoch_through_otarena_train(name, tmp_path, capsys):
    arch, norm, eps = _setting(name)
    code = main(["train", "--method", name, "--arch", arch, "--norm", norm, "--eps", str(eps), "--epochs", "1",
                 "--set", "optimizer=adam", "--set", "lr=2e-3", "--set", "batch_size=64", "--set", "attack_steps=2",
                 "--set", "val_n_ex=32", "--set", "val_pgd_steps=2", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epoch 1/1" in out and (tmp_path / f"{name}.pt").exists()


def _groups():
    """One method per method file (variants share their code), grouped by (arch, norm)."""
    per_file = {}
    for name, cls in methods.REGISTRY.items():
        per_file.setdefault(cls.__module__, name)
    groups = {}
    for name in sorted(per_file.values()):
        groups.setdefault(_setting(name), []).append(name)
    return groups


@pytest.mark.parametrize("setting", sorted(_groups()), ids=lambda s: f"{s[0]}-{s[1]}")
def test_short_search_through_otarena_search(setting, tmp_path, ray_local, capsys):
    arch, norm, eps = setting
    names = _groups()[setting]
    config = {"name": f"every-{arch}", "dataset": "digits", "arch": arch,
              "threat_model": {"norm": norm, "eps": eps}, "methods": names,
              "train": {"optimizer": "adam", "lr": 2e-3, "batch_size": 128, "attack_steps": 1, "val_n_ex": 32,
                        "val_pgd_steps": 1},
              "budget": {"trials": 1, "max_epochs": 1, "grace_epochs": 1},
              "final_eval": {"top_k": 1, "autoattack": None, "n_ex": 32, "pgd_steps": 2},
              "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "storage_path": str(tmp_path / "ray")}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["search", str(path), "--no-leaderboard"]) == 0, capsys.readouterr().err
    client = MlflowClient(config["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name(config["name"]).experiment_id])
    trials = [r for r in runs if r.data.tags.get("otarena.role") == "trial"]
    assert sorted(r.data.tags["otarena.method"] for r in trials) == sorted(names)
    for run in trials:
        assert run.data.tags["otarena.outcome"] == "completed", run.data.tags
        assert run.data.tags["otarena.evaluated"] == "true"
        assert 0 <= run.data.metrics["test/clean_acc"] <= 1
