"""Intensity transforms: CT HU window presets and a NaN/Inf guard."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRanged, Transform

from monai_peft.errors import ConfigError, InputDataError

__all__ = ["HU_WINDOWS", "CheckFinite", "CheckFinited", "HUWindow", "HUWindowd", "hu_window_range"]

logger = logging.getLogger(__name__)

#: CT display windows as ``(center, width)`` in Hounsfield units (common radiology presets).
HU_WINDOWS: dict[str, tuple[float, float]] = {
    "abdomen": (40.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "lung": (-600.0, 1500.0),
    "brain": (40.0, 80.0),
    "bone": (400.0, 1800.0),
}


def hu_window_range(window: str | tuple[float, float]) -> tuple[float, float]:
    """``(low, high)`` HU of a named preset (see :data:`HU_WINDOWS`) or of a ``(center, width)`` pair."""
    if isinstance(window, str):
        if window not in HU_WINDOWS:
            raise ConfigError(
                f"unknown HU window '{window}'; use one of {sorted(HU_WINDOWS)} or a (center, width) pair."
            )
        center, width = HU_WINDOWS[window]
    else:
        center, width = (float(v) for v in window)
    if width <= 0:
        raise ConfigError(f"HU window width must be > 0, got {width}.")
    return center - width / 2.0, center + width / 2.0


class HUWindow(ScaleIntensityRange):
    """Clip a CT image to an HU window and map it linearly to ``[b_min, b_max]`` (default ``[0, 1]``).

    Args:
        window: preset name (``"abdomen"``, ``"liver"``, ``"mediastinum"``, ``"lung"``, ``"brain"``, ``"bone"``) or a
            ``(center, width)`` pair in HU.
        b_min, b_max: output range.
        clip: clip values outside the window (default ``True``).

    Shape: any ``(C, *spatial)``; values must be HU (``load_dicom_series`` applies the rescale).
    """

    def __init__(
        self, window: str | tuple[float, float] = "abdomen", b_min: float = 0.0, b_max: float = 1.0, clip: bool = True
    ) -> None:
        low, high = hu_window_range(window)
        super().__init__(a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=clip, dtype=np.float32)
        self.window = window


class HUWindowd(ScaleIntensityRanged):
    """Dictionary version of :class:`HUWindow`."""

    def __init__(
        self,
        keys: KeysCollection,
        window: str | tuple[float, float] = "abdomen",
        b_min: float = 0.0,
        b_max: float = 1.0,
        clip: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        low, high = hu_window_range(window)
        super().__init__(
            keys, a_min=low, a_max=high, b_min=b_min, b_max=b_max, clip=clip, dtype=np.float32,
            allow_missing_keys=allow_missing_keys,
        )  # fmt: skip
        self.window = window


class CheckFinite(Transform):
    """Raise when an image holds NaN or +/-Inf voxels, or replace them.

    Args:
        name: what to call the input in the message (the dictionary version passes the key).
        replace: ``None`` (default) raises :class:`~monai_peft.errors.InputDataError`; a number replaces every
            non-finite voxel with it (logged as a warning).
        posinf, neginf: replacement for +Inf / -Inf when different from ``replace``.

    Shape: any; returns the input (or the repaired copy) unchanged in shape and type.
    """

    def __init__(
        self,
        name: str = "image",
        replace: float | None = None,
        posinf: float | None = None,
        neginf: float | None = None,
    ) -> None:
        self.name = name
        self.replace = replace
        self.posinf = posinf
        self.neginf = neginf

    def __call__(self, img: Any) -> Any:
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        if not (t.is_floating_point() or t.is_complex()):
            return img
        finite = torch.isfinite(t)
        if bool(finite.all()):
            return img
        n_nan = int(torch.isnan(t).sum())
        n_pos = int(torch.isposinf(t).sum())
        n_neg = int(torch.isneginf(t).sum())
        total = n_nan + n_pos + n_neg
        detail = f"{total} non-finite voxel(s) out of {t.numel()} ({n_nan} NaN, {n_pos} +Inf, {n_neg} -Inf)"
        if self.replace is None and self.posinf is None and self.neginf is None:
            raise InputDataError(
                f"'{self.name}' has {detail}. The file is corrupt or a previous step divided by zero; fix the data, "
                "or pass replace=<value> to CheckFinite(d) to substitute them."
            )
        fill = 0.0 if self.replace is None else float(self.replace)
        logger.warning("'%s': replaced %s with %s", self.name, detail, fill)
        pos = fill if self.posinf is None else float(self.posinf)
        neg = fill if self.neginf is None else float(self.neginf)
        fixed = torch.nan_to_num(t, nan=fill, posinf=pos, neginf=neg)
        if isinstance(img, torch.Tensor):
            return fixed
        return fixed.numpy()


class CheckFinited(MapTransform):
    """Dictionary version of :class:`CheckFinite`; the error names the key and the count of bad voxels.

    Example::

        CheckFinited(keys="image")({"image": t})                # raises InputDataError on NaN/Inf
        CheckFinited(keys="image", replace=0.0)({"image": t})   # replaces them instead
    """

    def __init__(
        self,
        keys: KeysCollection,
        replace: float | None = None,
        posinf: float | None = None,
        neginf: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.replace = replace
        self.posinf = posinf
        self.neginf = neginf

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = CheckFinite(str(key), self.replace, self.posinf, self.neginf)(d[key])
        return d
