# SPDX-License-Identifier: Apache-2.0
"""``otarena evaluate`` and ``train`` as a new user meets them (issue #14, items 3, 9, 10 and 15):
threads that fit the machine, progress on stderr, one-line errors for files that are not the
weights asked for, and defaults that learn on digits."""
from __future__ import annotations

import re

import pytest
import torch
import yaml

from otarena import methods
from otarena.search.cli import DATASET_TRAIN, _cifar_recipe_note, _train_config, build_parser, main

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[2] / "configs"


def _net(in_channels=1, arch="small_cnn"):
    torch.manual_seed(0)
    return methods.nets.build(arch, in_channels=in_channels, num_classes=10, mean=(0.5,) * in_channels,
                              std=(0.5,) * in_channels)


def _one_line_error(argv, capsys) -> str:
    assert main(["evaluate", *argv, "--no-mlflow"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_a_text_file_is_not_a_state_dict_and_no_unsafe_advice(tmp_path, capsys):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    err = _one_line_error(["--checkpoint", str(text), "--arch", "small_cnn", "--dataset", "digits"], capsys)
    assert "not a state dict" in err and "torch.save" in err and "weights_only" not in err


def test_a_pickled_model_is_not_a_state_dict_and_no_unsafe_advice(tmp_path, capsys):
    path = tmp_path / "model.pt"
    torch.save(_net(), path)   # the whole module, not its state_dict()
    err = _one_line_error(["--checkpoint", str(path), "--arch", "small_cnn", "--dataset", "digits"], capsys)
    assert "not a state dict" in err and "state_dict()" in err and "weights_only" not in err


def test_wrong_architecture_names_the_one_the_weights_fit(tmp_path, capsys):
    path = tmp_path / "net.pt"
    torch.save(_net().state_dict(), path)
    err = _one_line_error(["--checkpoint", str(path), "--arch", "preact_resnet18", "--dataset", "digits"], capsys)
    assert "do not fit preact_resnet18 for digits" in err and "they fit small_cnn for 1-channel 10-class" in err
    assert len(err) < 300


def test_weights_for_another_input_shape_name_it(tmp_path, capsys):
    path = tmp_path / "rgb.pt"
    torch.save(_net(in_channels=3).state_dict(), path)
    err = _one_line_error(["--checkpoint", str(path), "--arch", "small_cnn", "--dataset", "digits"], capsys)
    assert "they fit small_cnn for 3-channel 10-class inputs (cifar10, svhn)" in err


@pytest.mark.parametrize("content, expected", [
    ({"w": torch.zeros(1)}, "they fit no registered architecture (small_cnn, preact_resnet18"),
    ({"epochs": 3}, "not a state dict"),
])
def test_weights_of_nothing_registered(tmp_path, capsys, content, expected):
    path = tmp_path / "other.pt"
    torch.save(content, path)
    assert expected in _one_line_error(["--checkpoint", str(path), "--arch", "small_cnn", "--dataset", "digits"],
                                       capsys)


def test_evaluate_progress_goes_to_stderr_unless_quiet_and_threads_are_set(tmp_path, capsys, restore_threads):
    path = tmp_path / "net.pt"
    torch.save(_net().state_dict(), path)
    argv = ["evaluate", "--checkpoint", str(path), "--arch", "small_cnn", "--dataset", "digits", "--n-ex", "8",
            "--pgd-steps", "1", "--no-autoattack", "--no-sweep", "--no-mlflow", "--report", str(tmp_path / "r.json")]
    assert main([*argv, "--threads", "2"]) == 0
    assert torch.get_num_threads() == 2
    out, err = capsys.readouterr()
    assert "clean done in" in err and "clean done" not in out and "test: clean" in out
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "test: clean" in out and torch.get_num_threads() == 1


@pytest.mark.parametrize("command", ["train", "evaluate"])
@pytest.mark.parametrize("threads", ["0", "two", "-1"])
def test_threads_must_be_a_positive_count(command, threads, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--threads", threads])
    assert exit_.value.code == 2 and "threads >= 1" in capsys.readouterr().err


def test_train_defaults_for_digits_are_the_demos():
    demo = yaml.safe_load((CONFIGS / "demo.yaml").read_text())
    assert DATASET_TRAIN["digits"] == {**{k: demo["train"][k] for k in DATASET_TRAIN["digits"] if k != "lr"},
                                       "lr": demo["space"]["common"]["lr"]["default"]}


def test_train_says_when_a_dataset_gets_the_cifar_defaults():
    args = build_parser().parse_args(["train", "--method", "pgd_at", "--dataset", "mnist"])   # bundled: no data dir
    cfg, hparams = _train_config(args)
    assert "mnist" not in DATASET_TRAIN
    note = _cifar_recipe_note(cfg.dataset, hparams)
    assert note.startswith("note: mnist") and "CIFAR-10 defaults apply (optimizer=sgd, lr=0.05, batch_size=128" in note


def test_plain_train_learns_on_digits_in_one_epoch(tmp_path, capsys, restore_threads):
    assert main(["train", "--method", "trades", "--epochs", "1", "--threads", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "optimizer=adam" in out and "(1 CPU threads)" in out
    clean, pgd = map(float, re.search(r"val clean ([\d.]+)%  val pgd ([\d.]+)%", out).groups())
    assert clean > 60 and pgd > 20   # chance is about 10%: the CIFAR recipe ended at 12.5% on both
