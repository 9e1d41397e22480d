"""Geometry check, NaN/Inf guard and HU windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.transforms import (
    HU_WINDOWS,
    CheckFinite,
    CheckFinited,
    CheckGeometry,
    CheckGeometryd,
    HUWindow,
    HUWindowd,
    hu_window_range,
)
from monai_peft.transforms.intensity import MaskedNormalizeIntensity, MaskedNormalizeIntensityd


def _img(shape=(4, 5, 6), spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0)):
    aff = torch.eye(4, dtype=torch.float64)
    aff[0, 0], aff[1, 1], aff[2, 2] = spacing
    aff[:3, 3] = torch.tensor(origin, dtype=torch.float64)
    return MetaTensor(torch.zeros((1, *shape)), affine=aff)


def test_geometry_check_passes_and_reports_each_difference():
    image = _img()
    CheckGeometryd(("image", "label"))({"image": image, "label": _img()})
    CheckGeometryd(("image", "label"), allow_missing_keys=True)({"image": image})
    with pytest.raises(InputDataError, match=r"spatial shape \(4, 5, 7\) vs \(4, 5, 6\)") as err:
        CheckGeometryd(("image", "label"))({"image": image, "label": _img(shape=(4, 5, 7))})
    assert "label geometry does not match image" in str(err.value) and "ResampleToMatchd" in str(err.value)
    with pytest.raises(InputDataError, match=r"spacing \[1.0, 1.0, 3.0\] mm vs \[1.0, 1.0, 2.0\] mm"):
        CheckGeometryd(("image", "label"))({"image": image, "label": _img(spacing=(1, 1, 3))})
    with pytest.raises(InputDataError, match=r"origin .*\(off by up to 0.500 mm\)"):
        CheckGeometryd(("image", "label"))({"image": image, "label": _img(origin=(0.0, 0.5, 0.0))})
    CheckGeometryd(("image", "label"), atol=0.6)({"image": image, "label": _img(origin=(0.0, 0.5, 0.0))})


def test_geometry_check_with_flipped_axes():
    image = _img()
    flipped = MetaTensor(torch.zeros((1, 4, 5, 6)), affine=image.affine.clone())
    flipped.affine[1, 1] = -1.0
    flipped.affine[1, 3] = 4.0  # same voxels, y axis reversed
    with pytest.raises(InputDataError, match="match_orientation=True"):
        CheckGeometry()(flipped, image)
    CheckGeometry(match_orientation=True)(flipped, image)
    with pytest.raises(InputDataError, match="without the affine|needs the affine"):
        CheckGeometryd(("image", "label"))({"image": image, "label": torch.zeros(1, 4, 5, 6)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_check_finite_raises_with_key_and_counts(dtype):
    t = torch.zeros((1, 3, 3), dtype=dtype)
    t[0, 0, 0] = float("nan")
    t[0, 1, 1] = float("inf")
    t[0, 2, 2] = float("-inf")
    with pytest.raises(InputDataError) as err:
        CheckFinited("ct")({"ct": t})
    msg = str(err.value)
    assert "'ct'" in msg and "3 non-finite voxel(s) out of 9" in msg and "1 NaN, 1 +Inf, 1 -Inf" in msg
    assert "replace=" in msg


def test_check_finite_replace_and_passthrough():
    t = MetaTensor(torch.tensor([[1.0, float("nan"), float("inf"), float("-inf")]]), affine=torch.eye(4) * 2)
    out = CheckFinited("image", replace=0.0, posinf=9.0)({"image": t})["image"]
    assert out.tolist() == [[1.0, 0.0, 9.0, 0.0]]
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, t.affine)
    ints = torch.arange(4)
    assert CheckFinite()(ints) is ints
    arr = np.array([np.nan, 1.0])
    np.testing.assert_array_equal(CheckFinite(replace=-1.0)(arr), [-1.0, 1.0])


def test_hu_windows():
    assert hu_window_range("abdomen") == (-160.0, 240.0)
    assert hu_window_range("lung") == (-1350.0, 150.0)
    assert hu_window_range((50, 100)) == (0.0, 100.0)
    assert set(HU_WINDOWS) >= {"abdomen", "lung", "brain", "bone"}
    hu = torch.tensor([[-1000.0, -160.0, 40.0, 240.0, 3000.0]])
    np.testing.assert_allclose(HUWindow("abdomen")(hu).numpy(), [[0.0, 0.0, 0.5, 1.0, 1.0]])
    out = HUWindowd("image", window="brain", b_min=-1.0, b_max=1.0)({"image": torch.tensor([[0.0, 40.0, 80.0]])})
    np.testing.assert_allclose(out["image"].numpy(), [[-1.0, 0.0, 1.0]])
    with pytest.raises(ConfigError, match="unknown HU window 'liverr'"):
        HUWindow("liverr")
    with pytest.raises(ConfigError, match="width"):
        hu_window_range((0, 0))


def _brain_like(shape=(2, 6, 5, 4), background=-3.62, seed=0):
    """Two channels on a non-cubic grid: a z-scored 'brain' block, a constant non-zero background."""
    rng = np.random.default_rng(seed)
    img = np.full(shape, background, np.float32)
    mask = np.zeros((1, *shape[1:]), bool)
    mask[0, 1:5, 1:4, 1:3] = True
    img[0][mask[0]] = np.clip(rng.normal(2.0, 3.0, int(mask.sum())), -2.5, None)  # brain above the background
    img[1][mask[0]] = np.clip(rng.normal(-1.0, 0.5, int(mask.sum())), -2.5, None)
    aff = torch.diag(torch.tensor([0.8, 1.2, 3.0, 1.0], dtype=torch.float64))
    return MetaTensor(torch.from_numpy(img), affine=aff), MetaTensor(
        torch.from_numpy(mask.astype(np.float32)), affine=aff
    )


def test_masked_normalisation_uses_only_mask_voxels_per_channel():
    img, mask = _brain_like()
    out = MaskedNormalizeIntensityd("image", mask_key="mask")({"image": img, "mask": mask})["image"]
    m = mask[0].numpy() > 0
    for c in range(2):
        x = img[c].numpy()[m].astype(np.float64)
        np.testing.assert_allclose(out[c].numpy()[m], (x - x.mean()) / x.std(), atol=1e-5)
        assert float(np.abs(out[c].numpy()[~m]).max()) == 0.0
    assert isinstance(out, MetaTensor) and torch.equal(out.affine, img.affine) and out.dtype == torch.float32
    # MONAI's nonzero=True would take the -3.62 background into the statistics
    kept = MaskedNormalizeIntensity(outside=None)(img, mask)
    x0 = img[0].numpy()[m].astype(np.float64)
    np.testing.assert_allclose(kept[0].numpy()[~m], (-3.62 - x0.mean()) / x0.std(), atol=1e-5)
    # one mask per channel, and a threshold instead of a mask
    per = torch.cat([mask, torch.zeros_like(mask)], 0)
    per[1, 0, 0, 0] = 1.0
    per[1, 1, 1, 1] = 1.0
    out2 = MaskedNormalizeIntensity()(img, per)
    np.testing.assert_allclose(out2[0].numpy(), out[0].numpy(), atol=1e-6)
    v = img[1].numpy()[per[1].numpy() > 0].astype(np.float64)
    np.testing.assert_allclose(out2[1].numpy()[per[1].numpy() > 0], (v - v.mean()) / v.std(), atol=1e-5)
    thr = MaskedNormalizeIntensityd("image", threshold="min")({"image": img})["image"]
    np.testing.assert_allclose(thr.numpy(), out.numpy(), atol=1e-5)
    thr2 = MaskedNormalizeIntensity(threshold=-3.0)(img)
    np.testing.assert_allclose(thr2.numpy(), out.numpy(), atol=1e-5)


def test_masked_normalisation_errors():
    img, mask = _brain_like()
    with pytest.raises(InputDataError, match="'mask' is not in the data"):
        MaskedNormalizeIntensityd("image", mask_key="mask")({"image": img})
    with pytest.raises(InputDataError, match="no voxel inside the mask"):
        MaskedNormalizeIntensity()(img, torch.zeros_like(mask))
    with pytest.raises(InputDataError, match=r"mask spatial shape \(6, 5, 3\)"):
        MaskedNormalizeIntensity()(img, mask[..., :3])
    with pytest.raises(InputDataError, match="3 channels"):
        MaskedNormalizeIntensity()(img, torch.cat([mask] * 3, 0))
    with pytest.raises(ConfigError, match="a mask or a threshold"):
        MaskedNormalizeIntensity()(img)
    moved = MetaTensor(mask.as_tensor(), affine=mask.affine.clone())
    moved.affine[0, 3] = 5.0
    with pytest.raises(InputDataError, match="origin"):
        MaskedNormalizeIntensityd("image", mask_key="mask")({"image": img, "mask": moved})
    constant = img.clone()
    constant[1] = 7.0
    out = MaskedNormalizeIntensity()(constant, mask)  # std 0: only centred (as MONAI's NormalizeIntensity)
    assert float(out[1].abs().max()) == 0.0


def test_check_finite_names_the_file_and_the_channel_file():
    t = MetaTensor(torch.zeros((2, 3, 3, 3)), meta={"filename_or_obj": "/d/seg.nii.gz"})
    t.meta["channel_files"] = ["/d/flair.nii.gz", "/d/t1c.nii.gz"]
    t[1, 0, 0, 0] = float("nan")
    t[1, 0, 0, 1] = float("nan")
    with pytest.raises(InputDataError, match=r"'label' has 2 non-finite voxel\(s\).*'/d/t1c.nii.gz' \(channel 1\)"):
        CheckFinited("label")({"label": t})
    single = MetaTensor(torch.tensor([[float("inf"), 0.0]]), meta={"filename_or_obj": "/d/seg.nii.gz"})
    with pytest.raises(InputDataError, match=r"in '/d/seg.nii.gz'"):
        CheckFinite("label")(single)
