"""MedMNIST npz datasets: real file, synthetic fallback, safe loading, download path (no network)."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from monai_peft.data import (
    SYNTHETIC_NOTICE,
    MedMNISTDataset,
    class_counts,
    download_medmnist,
    load_medmnist_npz,
    make_synthetic_medmnist,
    medmnist_filename,
    per_class_fraction_indices,
    write_synthetic_medmnist,
)
from monai_peft.errors import DataDownloadError, InputDataError, MissingDependencyError
from tests.conftest import require_shared


def test_real_pneumoniamnist_splits_and_items():
    path = require_shared("medmnist/pneumoniamnist_28.npz")
    sizes = {}
    for split in ("train", "val", "test"):
        ds = MedMNISTDataset(path, split)
        sizes[split] = len(ds)
        assert ds.labels.shape == (len(ds), 1)
    assert sizes == {"train": 4708, "val": 524, "test": 624}
    train = MedMNISTDataset(path, "train")
    assert class_counts(train.labels) == {0: 1214, 1: 3494}
    assert train.num_classes == 2 and not train.multilabel and not train.is_synthetic
    item = train[0]
    images, labels = load_medmnist_npz(path, "train")
    assert item["image"].shape == (1, 28, 28) and item["image"].dtype == torch.float32
    torch.testing.assert_close(item["image"][0], torch.as_tensor(images[0] / 255.0, dtype=torch.float32))
    assert item["label"].dtype == torch.int64 and int(item["label"]) == int(labels[0, 0])
    batch = next(iter(DataLoader(train, batch_size=16)))
    assert batch["image"].shape == (16, 1, 28, 28) and batch["label"].shape == (16,)


def test_real_subset_with_fraction_sampling():
    train = MedMNISTDataset(require_shared("medmnist/pneumoniamnist_28.npz"), "train", as_rgb=True)
    idx = per_class_fraction_indices(train.labels, 0.01, seed=0)
    few = train.subset(idx)
    assert len(few) == len(idx) == 12 + 35  # round(1 % of 1214), round(1 % of 3494)
    assert class_counts(few.labels) == {0: 12, 1: 35}
    assert few[0]["index"] == int(idx[0]) and few[0]["image"].shape == (3, 28, 28)


def test_synthetic_fallback_is_labelled_and_shaped_like_medmnist(tmp_path):
    arrays = make_synthetic_medmnist(n_train=30, n_val=6, n_test=6, n_classes=3, seed=1)
    assert str(arrays["synthetic_notice"]) == SYNTHETIC_NOTICE and "SYNTHETIC" in SYNTHETIC_NOTICE
    assert arrays["train_images"].dtype == np.uint8 and arrays["train_images"].shape == (30, 28, 28)
    assert arrays["train_labels"].shape == (30, 1) and set(np.unique(arrays["train_labels"])) == {0, 1, 2}
    again = make_synthetic_medmnist(n_train=30, n_val=6, n_test=6, n_classes=3, seed=1)
    assert np.array_equal(arrays["train_images"], again["train_images"])
    path = write_synthetic_medmnist(tmp_path / "syn.npz", n_train=20, channels=3)
    ds = MedMNISTDataset(path, "train")
    assert ds[0]["image"].shape == (3, 28, 28) and len(ds) == 20
    syn = MedMNISTDataset.synthetic("val", n_val=8, multilabel=True, n_classes=4)
    assert syn.is_synthetic and syn.multilabel and syn[0]["label"].shape == (4,)
    assert syn[0]["label"].dtype == torch.float32


def test_3d_images_get_a_channel_axis():
    vol = np.zeros((5, 8, 28, 28), np.uint8)
    ds = MedMNISTDataset.from_arrays(vol, np.arange(5) % 2)
    assert ds[0]["image"].shape == (1, 8, 28, 28)


def test_bad_files(tmp_path):
    with pytest.raises(InputDataError, match="does not exist.*synthetic"):
        MedMNISTDataset(tmp_path / "nope.npz")
    np.savez(tmp_path / "keys.npz", train_images=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(InputDataError, match="no train_labels"):
        MedMNISTDataset(tmp_path / "keys.npz")
    np.savez(tmp_path / "len.npz", train_images=np.zeros((2, 28, 28), np.uint8), train_labels=np.zeros((3, 1)))
    with pytest.raises(InputDataError, match="2 images but 3 labels"):
        MedMNISTDataset(tmp_path / "len.npz")
    objects = np.empty(2, dtype=object)
    objects[:] = [np.zeros((28, 28)), np.zeros((28, 28))]
    np.savez(tmp_path / "pickled.npz", train_images=objects, train_labels=np.zeros((2, 1)))
    with pytest.raises(InputDataError, match="refusing to unpickle"):
        MedMNISTDataset(tmp_path / "pickled.npz")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(InputDataError, match="not a readable .npz"):
        MedMNISTDataset(tmp_path / "junk.npz")
    with pytest.raises(InputDataError, match="unknown split"):
        load_medmnist_npz(tmp_path / "keys.npz", "training")


def _fake_medmnist(monkeypatch, behaviour):
    """Install a stand-in ``medmnist`` module exposing INFO and one dataset class."""
    module = types.ModuleType("medmnist")
    module.INFO = {
        "pneumoniamnist": {
            "python_class": "PneumoniaMNIST",
            "url": "https://zenodo.example/pneumoniamnist.npz",
            "url_64": "https://zenodo.example/pneumoniamnist_64.npz",
        }
    }
    calls = []

    class PneumoniaMNIST:
        def __init__(self, split, download=False, root=None, size=None):
            calls.append({"split": split, "download": download, "root": root, "size": size})
            behaviour(root, size)

    module.PneumoniaMNIST = PneumoniaMNIST
    monkeypatch.setitem(sys.modules, "medmnist", module)
    return calls


def test_download_without_the_package(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "medmnist", None)  # import medmnist -> ImportError
    with pytest.raises(MissingDependencyError, match="pip install 'medmnist'"):
        download_medmnist("pneumoniamnist", root=tmp_path)
    with pytest.raises(MissingDependencyError):
        MedMNISTDataset(flag="pneumoniamnist", root=tmp_path, download=True)


def test_download_offline_gives_the_url(monkeypatch, tmp_path):
    def offline(root, size):
        raise RuntimeError("Something went wrong when downloading! <urlopen error [Errno -3] name resolution>")

    _fake_medmnist(monkeypatch, offline)
    with pytest.raises(DataDownloadError) as err:
        download_medmnist("pneumoniamnist", size=64, root=tmp_path)
    msg = str(err.value)
    assert "offline" in msg and "https://zenodo.example/pneumoniamnist_64.npz" in msg
    assert str(tmp_path / "pneumoniamnist_64.npz") in msg
    assert isinstance(err.value, OSError)
    with pytest.raises(InputDataError, match="unknown MedMNIST data set 'pneumonia'"):
        download_medmnist("pneumonia", root=tmp_path)


def test_download_success_and_dataset_by_flag(monkeypatch, tmp_path):
    def writes_file(root, size):
        write_synthetic_medmnist(f"{root}/{medmnist_filename('pneumoniamnist', size or 28)}", n_train=10)

    calls = _fake_medmnist(monkeypatch, writes_file)
    with pytest.raises(InputDataError, match="download=True"):
        MedMNISTDataset(flag="pneumoniamnist", root=tmp_path)
    ds = MedMNISTDataset(flag="pneumoniamnist", root=tmp_path, download=True)
    assert len(ds) == 10 and calls == [{"split": "train", "download": True, "root": str(tmp_path), "size": None}]
    assert download_medmnist("pneumoniamnist", root=tmp_path) == tmp_path / "pneumoniamnist.npz"
    assert len(calls) == 1  # already there: no second download
