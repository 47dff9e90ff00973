# SPDX-License-Identifier: Apache-2.0
"""Bad input gets a one-line error and exit code 2 before any work starts (no Ray, no MLflow run)."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from otarena.search.cli import main

GOOD = {
    "name": "cli-test",
    "dataset": "digits",
    "arch": "small_cnn",
    "threat_model": {"norm": "Linf", "eps": 0.2},
    "methods": ["pgd_at", "trades"],
    "budget": {"trials": 2, "max_epochs": 2, "grace_epochs": 1},
}


def _write(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(config if isinstance(config, str) else yaml.safe_dump(config))
    return str(path)


def _with(**changes):
    config = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return config


BAD_CONFIGS = {
    "unknown method": (_with(methods=["pgd_att"]), "did you mean 'pgd_at'"),
    "unknown dataset": (_with(dataset="cifar11"), "unknown dataset 'cifar11'"),
    "unknown arch": (_with(arch="resnet1000"), "unknown arch"),
    "hyperparameter outside its valid domain": (
        _with(space={"trades": {"trades_beta": {"low": -1.0, "high": 3.0}}}), "valid domain"),
    "fixed value outside its domain": (_with(train={"lr": -0.1}), "lr=-0.1"),
    "unknown hyperparameter": (_with(train={"weight_decy": 0.1}), "did you mean 'weight_decay'"),
    "hyperparameter by its old name": (
        _with(methods=["ot_mdr_pgd"], space={"ot_mdr_pgd": {"weight_noise_std": 0.0}}), "did you mean 'ot_mdr_noise_std'"),
    "hyperparameter in the wrong case": (
        _with(methods=["langevin"], space={"langevin": {"langevin_K": 1}}), "did you mean 'langevin_k'"),
    "wrong type": (_with(train={"optimizer": "rmsprop"}), "optimizer"),
    "eps zero": (_with(threat_model={"norm": "Linf", "eps": 0}), "eps must be in (0, 1]"),
    "eps in integer pixels": (_with(threat_model={"norm": "Linf", "eps": 8}), "eps must be in (0, 1]"),
    "unknown norm": (_with(threat_model={"norm": "L3", "eps": 0.1}), "threat_model.norm"),
    "missing data dir": (_with(dataset="cifar10", data_dir="/nonexistent/data"), "does not exist"),
    "data dir without the dataset": (_with(dataset="fashion_mnist", data_dir="."), "not found in"),
    "zero cpus": (_with(resources={"cpu": 0}), "cpu per trial must be > 0"),
    "more cpus than the machine": (_with(resources={"cpu": 4096}), "this machine has"),
    "negative gpus": (_with(resources={"gpu": -1}), "gpu per trial must be >= 0"),
    "more gpus than the machine": (_with(resources={"gpu": 64}), "GPUs"),
    "fractional gpus above one": (_with(resources={"gpu": 1.5}), "whole number"),
    "unknown top-level key": (_with(budgte={"trials": 3}), "unknown key"),
    "grace above budget": (_with(budget={"trials": 2, "max_epochs": 2, "grace_epochs": 5}), "grace_epochs"),
    "unknown scheduler": (_with(budget={"trials": 2, "max_epochs": 2, "grace_epochs": 1, "scheduler": "hyperband"}),
                          "budget.scheduler"),
    "malformed yaml": ("name: [unclosed\nmethods: {", "malformed YAML"),
    "empty file": ("", "the config file is empty"),
    "a list, not a mapping": ("- pgd_at\n- trades\n", "a config must be a YAML mapping"),
    "negative wasserstein radius": (
        _with(methods=["armor_trades"], space={"armor_trades": {"armor_radius": {"low": -0.1, "high": 0.5}}}),
        "leaves the valid domain"),
    "negative langevin sigma": (
        _with(methods=["langevin"], space={"langevin": {"langevin_sigma": {"low": -0.1, "high": 0.1}}}),
        "leaves the valid domain"),
    "alpha-divergence with alpha <= 1": (
        _with(methods=["armor_trades"], space={"armor_trades": {"armor_alpha": 1.0}}), "armor_alpha=1.0"),
    "got theta <= 0": (_with(methods=["got_trades_lm"], space={"got_trades_lm": {"got_theta": 0.0}}), "got_theta=0.0"),
    "wrong type of a section": (_with(budget="lots"), "budget"),
    "storage path not writable": (_with(storage_path="/etc/hostname/ray_results"), "not writable"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_search_rejects_bad_config_with_one_line_and_exit_2(case, tmp_path, capsys):
    import ray

    ray_was_running = ray.is_initialized()
    config, expected = BAD_CONFIGS[case]
    path = _write(tmp_path, config)
    code = main(["search", path, "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("otarena: error: ")
    assert expected in lines[0], lines[0]
    # Rejected before any work: no MLflow store was created and Ray was not started.
    assert not (tmp_path / "mlflow.db").exists()
    assert ray.is_initialized() == ray_was_running


def test_unreachable_tracking_server(tmp_path, capsys):
    from processes import free_port

    path = _write(tmp_path, GOOD)
    assert main(["search", path, "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "unreachable" in err


def test_missing_config_file(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_unreachable_tracking_folder(tmp_path, capsys):
    path = _write(tmp_path, GOOD)
    assert main(["search", path, "--tracking-uri", "sqlite:////nonexistent/dir/mlflow.db"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_train_rejects_an_empty_config_with_one_line(tmp_path, capsys):
    path = _write(tmp_path, "")
    assert main(["train", path, "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the config file is empty" in err
    assert not (tmp_path / "runs").exists()


def test_train_rejects_unknown_method(capsys):
    assert main(["train", "--method", "tradez"]) == 2
    assert "did you mean 'trades'" in capsys.readouterr().err


def test_train_rejects_bad_eps(capsys):
    assert main(["train", "--method", "pgd_at", "--eps", "2"]) == 2
    assert "eps must be in (0, 1]" in capsys.readouterr().err


def test_console_script_exit_code(tmp_path):
    """The installed ``otarena`` command itself exits 2 with one line on stderr."""
    path = _write(tmp_path, _with(methods=["nope"]))
    exe = os.path.join(os.path.dirname(sys.executable), "otarena")
    proc = subprocess.run([exe, "search", path], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "unknown method 'nope'" in proc.stderr
    assert not (tmp_path / "mlflow.db").exists()


def test_methods_lists_every_method_with_its_space(capsys):
    from otarena import methods

    assert main(["methods", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert set(listing) == set(methods.REGISTRY)
    assert "trades_beta" in listing["trades"]["search_space"]
    assert "mart_beta" in listing["mart"]["search_space"]
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name in methods.REGISTRY:
        assert f"{name}:" in text


def test_train_runs_one_configuration_without_ray(tmp_path, capsys):
    import ray

    ray_was_running = ray.is_initialized()
    code = main(["train", "--method", "pgd_at", "--epochs", "1", "--set", "optimizer=adam", "--set", "lr=2e-3",
                 "--set", "batch_size=64", "--set", "val_n_ex=64", "--out", str(tmp_path), "--test"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "epoch 1/1" in out and "test: clean_acc" in out
    assert (tmp_path / "pgd_at.pt").exists()
    assert ray.is_initialized() == ray_was_running


def test_train_from_a_config_keeps_its_defaults(tmp_path, capsys):
    config = _with(space={"common": {"lr": {"low": 1e-3, "high": 1e-2, "default": 3e-3}},
                          "trades": {"trades_beta": 2.0}, "pgd_at": {"lr": 0.5}},
                   train={"optimizer": "adam", "batch_size": 128, "val_n_ex": 32, "attack_steps": 1})
    path = _write(tmp_path, config)
    assert main(["train", path, "--method", "trades", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "lr=0.003" in out and "trades_beta=2.0" in out and "optimizer=adam" in out


class _Payload:
    """Unpickling this runs code: exactly what weights_only loading must refuse."""

    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def _evaluate_fails(argv, capsys, expected):
    assert main(["evaluate", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err, err


def test_evaluate_rejects_bad_input_before_any_work(tmp_path, capsys):
    import torch

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    _evaluate_fails([], capsys, "give a RUN_ID or --checkpoint")
    _evaluate_fails(["--checkpoint", str(tmp_path / "none.pt"), "--arch", "small_cnn", "--dataset", "digits"],
                    capsys, "not found")
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    _evaluate_fails(["--checkpoint", str(weights), "--dataset", "digits"], capsys, "needs --arch and --dataset")
    _evaluate_fails(["--checkpoint", str(weights), "--arch", "nope", "--dataset", "digits", "--no-mlflow"],
                    capsys, "unknown arch")
    _evaluate_fails(["--checkpoint", str(weights), "--arch", "small_cnn", "--dataset", "digits", "--eps", "8",
                     "--no-mlflow"], capsys, "eps must be in (0, 1]")
    _evaluate_fails(["--checkpoint", str(weights), "--arch", "small_cnn", "--dataset", "cifar10", "--no-mlflow"],
                    capsys, "needs --data-dir")
    _evaluate_fails(["not-a-run", "--tracking-uri", uri], capsys, "no MLflow store")
    from otarena.search.tracking import Tracker

    Tracker(uri, "exists")
    capsys.readouterr()
    _evaluate_fails(["not-a-run", "--tracking-uri", uri], capsys, "no MLflow run 'not-a-run'")
    assert not (tmp_path / "evaluations").exists()


def test_evaluate_refuses_a_pickle_payload(tmp_path, capsys):
    import torch

    path = tmp_path / "evil.pt"
    torch.save({"state": _Payload()}, path)
    _evaluate_fails(["--checkpoint", str(path), "--arch", "small_cnn", "--dataset", "digits", "--no-mlflow"],
                    capsys, "cannot load")


def test_evaluate_a_checkpoint_into_mlflow(tmp_path, capsys):
    import torch
    from mlflow import MlflowClient

    from otarena import methods

    torch.manual_seed(0)
    info = methods.data.INFO["digits"]
    net = methods.nets.build("small_cnn", in_channels=1, num_classes=10, mean=info.mean, std=info.std)
    weights = tmp_path / "net.pt"
    torch.save(net.state_dict(), weights)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    report = tmp_path / "out" / "net.json"
    assert main(["evaluate", "--checkpoint", str(weights), "--arch", "small_cnn", "--dataset", "digits",
                 "--eps", "0.2", "--n-ex", "16", "--pgd-steps", "2", "--no-autoattack", "--tracking-uri", uri,
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "test: clean" in out and "flag small-sample" in out
    numbers = json.loads(report.read_text())
    assert numbers["n_ex"] == 16 and "aa_acc" not in numbers and numbers["checkpoint"] == str(weights)
    client = MlflowClient(uri)
    run, = client.search_runs([client.get_experiment_by_name("evaluations").experiment_id])
    assert run.data.tags["otarena.role"] == "evaluation" and run.data.tags["otarena.arch"] == "small_cnn"
    assert run.data.metrics["test/clean_acc"] == pytest.approx(numbers["clean_acc"])
    assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")] == ["checkpoint/model.pt"]
