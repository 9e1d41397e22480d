"""Study data sources: MedMNIST npz, an image folder and a CSV (real PneumoniaMNIST images saved as PNG / npy)."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from monai_peft.errors import InputDataError
from monai_peft.study.data import load_splits
from monai_peft.study.schema import DatasetSpec
from tests.study.helpers import tiny_npz


def _real(tmp_path):
    with np.load(tiny_npz(tmp_path, 8, 4, 4), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _write_folder(tmp_path, arrays):
    root = tmp_path / "folder"
    for split in ("train", "val", "test"):
        for i, (img, lab) in enumerate(zip(arrays[f"{split}_images"], arrays[f"{split}_labels"][:, 0], strict=True)):
            cls = root / split / ("normal" if lab == 0 else "pneumonia")
            cls.mkdir(parents=True, exist_ok=True)
            big = Image.fromarray(img).resize((30, 20))  # non-square files: resized to the study's size on load
            if i == 0:
                np.save(cls / f"{i}.npy", np.asarray(big))
            else:
                big.save(cls / f"{i}.png")
    return root


def test_medmnist_npz_and_rgb(tmp_path):
    path = tiny_npz(tmp_path, 8, 4, 4)
    data = load_splits(DatasetSpec(kind="medmnist", path=str(path)), 28)
    assert data.classes == ("0", "1") and data.channels == 1 and data.access_log == []
    assert data.counts() == {"train": {0: 4, 1: 4}, "val": {0: 2, 1: 2}, "test": {0: 2, 1: 2}}
    rgb = load_splits(DatasetSpec(kind="medmnist", path=str(path), channels=3), 28)
    train = rgb.train()
    assert train.images.shape == (8, 28, 28, 3) and rgb.channels == 3
    assert np.array_equal(train.images[..., 1], data.train().images)


def test_image_folder(tmp_path):
    arrays = _real(tmp_path)
    data = load_splits(DatasetSpec(kind="folder", path=str(_write_folder(tmp_path, arrays))), 24)
    assert data.classes == ("normal", "pneumonia")
    train = data.train()
    assert train.images.shape == (8, 24, 24) and train.images.dtype == np.uint8
    assert sorted(train.labels.tolist()) == sorted(arrays["train_labels"][:, 0].tolist())
    # class folders in name order, files in index order: the first 4 images are the normal ones, by index
    normal = np.flatnonzero(arrays["train_labels"][:, 0] == 0)
    for pos, i in enumerate(normal):
        expected = np.asarray(
            Image.fromarray(arrays["train_images"][i]).resize((30, 20)).resize((24, 24), Image.BILINEAR)
        )
        assert np.array_equal(train.images[pos], expected)  # .png and .npy files read alike
    assert (train.labels[:4] == 0).all()


def test_csv(tmp_path):
    arrays = _real(tmp_path)
    folder = _write_folder(tmp_path, arrays)
    table = tmp_path / "labels.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "diagnosis", "split"])
        for p in sorted(folder.rglob("*.*")):
            w.writerow(
                [p.relative_to(tmp_path).as_posix(), p.parent.name, {"val": "validation"}.get(p.parts[-3], p.parts[-3])]
            )
    spec = DatasetSpec(kind="csv", path=str(table), image_column="file", label_column="diagnosis", channels=3)
    data = load_splits(spec, 16)
    assert data.classes == ("normal", "pneumonia") and data.train().images.shape == (8, 16, 16, 3)
    assert len(data.val()) == 4
    with pytest.raises(InputDataError, match=r"lacks column\(s\) \['image', 'label'\]"):
        load_splits(DatasetSpec(kind="csv", path=str(table)), 16)


def test_missing_class_in_a_split(tmp_path):
    arrays = _real(tmp_path)
    root = _write_folder(tmp_path, arrays)
    for p in (root / "test" / "normal").iterdir():
        p.unlink()
    with pytest.raises(InputDataError, match=r"the test split has no image of class\(es\) \['normal'\]"):
        load_splits(DatasetSpec(kind="folder", path=str(root)), 16)
