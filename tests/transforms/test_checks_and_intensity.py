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
