"""Chest X-ray loading (DICOM, PNG, JPEG) and the CXR classification preset."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from monai_peft.errors import ConfigError, DicomError, InputDataError
from monai_peft.transforms import (
    NORMALIZATION_PRESETS,
    LoadChestXrayd,
    cxr_classification_transforms,
    normalization_stats,
    read_chest_xray,
)
from tests.transforms.dicom_factory import make_image, save

GRADIENT = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (15, 1))  # (15, 25): non-square, values along columns


def test_png_8bit_is_row_major_and_scaled_by_255(tmp_path):
    Image.fromarray(GRADIENT).save(tmp_path / "a.png")
    img = read_chest_xray(tmp_path / "a.png")
    assert img.shape == (1, 15, 25)  # (C, H, W), not MONAI PIL's (C, W, H)
    np.testing.assert_allclose(img[0].numpy(), GRADIENT / 255.0, atol=1e-6)
    assert img.meta["scaling"] == "range"


def test_png_16bit_uses_minmax_and_rgb_becomes_gray(tmp_path):
    raw = (np.arange(20, dtype=np.uint16).reshape(4, 5) * 100 + 1000).astype(np.uint16)
    Image.fromarray(raw).save(tmp_path / "b.png")
    img = read_chest_xray(tmp_path / "b.png")
    np.testing.assert_allclose(img[0].numpy(), (raw - 1000) / 1900.0, atol=1e-6)
    rgb = np.stack([GRADIENT] * 3, axis=-1)
    Image.fromarray(rgb).save(tmp_path / "c.jpg", quality=100)
    gray = read_chest_xray(tmp_path / "c.jpg")
    assert gray.shape == (1, 15, 25)
    np.testing.assert_allclose(gray[0].numpy(), GRADIENT / 255.0, atol=0.03)  # JPEG is lossy


def test_errors(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        read_chest_xray(tmp_path / "missing.png")
    (tmp_path / "x.png").write_bytes(b"not a png")
    with pytest.raises(InputDataError, match="not a readable image"):
        read_chest_xray(tmp_path / "x.png")
    (tmp_path / "x.dcm").write_bytes(b"not dicom either" * 20)
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_chest_xray(tmp_path / "x.dcm")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(InputDataError, match="neither DICOM"):
        read_chest_xray(tmp_path / "x.txt")


def test_normalization_presets():
    assert NORMALIZATION_PRESETS["mrm"] == ((0.4978,), (0.2449,))
    assert NORMALIZATION_PRESETS["cxr_mae"] == ((0.4785,), (0.2834,))
    assert normalization_stats("medmnist", 3) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert normalization_stats("imagenet", 3)[0] == (0.485, 0.456, 0.406)
    assert normalization_stats(None, 1) == ((0.0,), (1.0,))
    assert normalization_stats(mean=[0.1], std=[0.2], channels=2) == ((0.1, 0.1), (0.2, 0.2))
    with pytest.raises(ConfigError, match="3 channel values but the pipeline makes 1"):
        normalization_stats("imagenet", 1)
    with pytest.raises(ConfigError, match="unknown normalisation preset 'foo'"):
        normalization_stats("foo", 3)
    with pytest.raises(ConfigError, match="both mean and std"):
        normalization_stats(mean=[0.5], channels=1)


@pytest.mark.parametrize("norm", ["imagenet", "mrm", "cxr_mae", "half"])
def test_cxr_pipeline_from_monochrome1_dicom(tmp_path, norm):
    stored = np.full((40, 30), 1000, dtype=np.uint16)
    stored[:, 15:] = 3000
    path = save(make_image(stored, photometric="MONOCHROME1", window=(2000.0, 4000.0)), tmp_path / "cxr.dcm")
    out = cxr_classification_transforms(norm=norm, spatial_size=32)({"image": str(path), "label": 1})
    img = out["image"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert isinstance(out["label"], torch.Tensor) and int(out["label"]) == 1
    mean, std = normalization_stats(norm, 3)
    unit = img * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    # MONOCHROME1: the stored-low half is displayed bright after inversion
    assert float(unit[:, :, :8].mean()) > 0.7 and float(unit[:, :, -8:].mean()) < 0.3
    assert torch.allclose(unit[0], unit[1]) and torch.allclose(unit[1], unit[2])  # gray repeated


def test_cxr_pipeline_png_keep_aspect_one_channel_and_augment(tmp_path):
    Image.fromarray(np.full((20, 40), 255, np.uint8)).save(tmp_path / "w.png")
    tf = cxr_classification_transforms(channels=1, norm="none", spatial_size=16, keep_aspect=True, label_key=None)
    img = tf({"image": tmp_path / "w.png"})["image"]
    assert img.shape == (1, 16, 16)
    assert float(img[0, 8, 8]) == pytest.approx(1.0, abs=1e-3) and float(img[0, 0, 8]) == 0.0  # padded rows top/bottom
    aug = cxr_classification_transforms(augment=True, spatial_size=16, norm="half")
    aug.set_random_state(0)
    assert aug({"image": tmp_path / "w.png"})["image"].shape == (3, 16, 16)


def test_load_chest_xrayd_key_handling(tmp_path):
    Image.fromarray(GRADIENT).save(tmp_path / "a.png")
    d = LoadChestXrayd(("image", "other"), allow_missing_keys=True)({"image": tmp_path / "a.png"})
    assert d["image"].shape == (1, 15, 25) and "other" not in d


def test_mixed_dicom_and_png_batch_collates(tmp_path):
    from monai.data import DataLoader, Dataset

    Image.fromarray(GRADIENT).save(tmp_path / "a.png")
    save(make_image(np.full((10, 12), 500, np.uint16), photometric="MONOCHROME1"), tmp_path / "b.dcm")
    data = [{"image": tmp_path / "a.png", "label": 0}, {"image": tmp_path / "b.dcm", "label": 1}]
    tf = cxr_classification_transforms(spatial_size=8, norm="mrm")
    batch = next(iter(DataLoader(Dataset(data, transform=tf), batch_size=2)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].tolist() == [0, 1]
