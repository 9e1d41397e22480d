"""Intensity transforms: CT HU window presets, z-score normalisation inside a mask, and a NaN/Inf guard."""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRanged, Transform

from monai_peft.errors import ConfigError, InputDataError

__all__ = [
    "HU_WINDOWS",
    "CheckFinite",
    "CheckFinited",
    "HUWindow",
    "HUWindowd",
    "MaskedNormalizeIntensity",
    "MaskedNormalizeIntensityd",
    "above_minimum",
    "hu_window_range",
]

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


def _where(img: Any, finite: torch.Tensor) -> str:
    """`` in '<file>'`` for a loaded volume; for stacked modalities the file(s) and channel(s) with bad voxels."""
    meta = getattr(img, "meta", None) or {}
    files = meta.get("channel_files")
    if isinstance(files, (list, tuple)) and len(files) == finite.shape[0] and finite.ndim > 1:
        bad = [(c, int((~finite[c]).sum())) for c in range(finite.shape[0])]
        parts = [f"'{files[c]}' (channel {c}): {n}" for c, n in bad if n]
        return " in " + ", ".join(parts)
    source = meta.get("filename_or_obj")
    return f" in '{source}'" if source else ""


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
        detail += _where(img, finite)
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


def above_minimum(img: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Foreground = voxels strictly above their channel's minimum: ``(C, *spatial)`` -> bool of the same shape.

    On skull-stripped, z-scored MR (BraTS ``*_subtrMeanDivStd``) the background is one constant value, the
    channel minimum (e.g. -3.16 on FLAIR), so this is the brain; on raw MR with a zero background it is ``x > 0``.
    Usable as ``select_fn`` of ``monai.transforms.CropForegroundd``.
    """
    if isinstance(img, torch.Tensor):
        flat = img.reshape(img.shape[0], -1)
        low = flat.amin(dim=1).reshape(-1, *([1] * (img.ndim - 1)))
        return img > low
    arr = np.asarray(img)
    low = arr.reshape(arr.shape[0], -1).min(axis=1).reshape(-1, *([1] * (arr.ndim - 1)))
    return arr > low


Threshold = float | Literal["min"] | None


class MaskedNormalizeIntensity(Transform):
    """Z-score each channel over the voxels inside a mask: ``y_c = (x_c - mu_c) / sigma_c``.

    ``mu_c`` and ``sigma_c`` (population std) are computed over ``{v : m_c(v)}`` only, where the mask
    ``m_c`` is a brain / foreground mask (e.g. BraTS ``brainmask.nii.gz``), a threshold on the channel, or both
    (their intersection). Unlike ``NormalizeIntensity(nonzero=True)`` this is right when the background is not 0
    (z-scored BraTS has a background of about -3.6). Voxels outside the mask are set to ``outside`` (default 0,
    the mean of the normalised brain), or get the same linear map when ``outside=None``. A channel with
    ``sigma_c = 0`` inside the mask is only centred (as MONAI's ``NormalizeIntensity``).

    Args:
        threshold: ``None`` (use the mask only), a number (voxels ``> threshold`` in the channel), or ``"min"``
            (voxels above the channel's minimum, see :func:`above_minimum`).
        outside: value for voxels outside the mask, or ``None`` to map them like the inside.
        channel_wise: statistics per channel (default); ``False`` pools the mask voxels of all channels.
        name: what to call the input in error messages.

    Shapes: ``img`` ``(C, *spatial)``; ``mask`` ``(1, *spatial)`` (shared by all channels) or ``(C, *spatial)``;
    mask voxels ``> 0`` are inside. Returns float32 ``(C, *spatial)`` (a ``MetaTensor`` keeps its meta and
    applied operations, so :class:`monai.transforms.Invertd` still works after it).
    """

    def __init__(
        self, threshold: Threshold = None, outside: float | None = 0.0, channel_wise: bool = True, name: str = "image"
    ) -> None:
        if isinstance(threshold, str) and threshold != "min":
            raise ConfigError(f"threshold must be a number, 'min' or None, got '{threshold}'.")
        self.threshold = threshold
        self.outside = outside
        self.channel_wise = channel_wise
        self.name = name

    def _inside(self, x: torch.Tensor, mask: Any) -> torch.Tensor:
        inside = torch.ones_like(x, dtype=torch.bool)
        if mask is None and self.threshold is None:
            raise ConfigError(
                "MaskedNormalizeIntensity needs a mask or a threshold: pass mask= (e.g. a brain mask) or "
                "threshold=<value> / threshold='min'."
            )
        if mask is not None:
            m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
            m = m.as_tensor() if isinstance(m, MetaTensor) else m
            if tuple(m.shape[1:]) != tuple(x.shape[1:]):
                raise InputDataError(
                    f"mask spatial shape {tuple(m.shape[1:])} differs from the {self.name} {tuple(x.shape[1:])}: "
                    "the mask must be on the image grid (load it with the image, or resample it with nearest)."
                )
            if m.shape[0] not in (1, x.shape[0]):
                raise InputDataError(
                    f"mask has {m.shape[0]} channels but the {self.name} has {x.shape[0]}: give one mask (1 channel) "
                    "or one per channel."
                )
            inside = inside & (m.to(x.device) > 0)
        if self.threshold == "min":
            inside = inside & above_minimum(x)
        elif self.threshold is not None:
            inside = inside & (x > float(self.threshold))
        return inside

    def __call__(self, img: torch.Tensor | np.ndarray, mask: torch.Tensor | np.ndarray | None = None) -> Any:
        t = img if isinstance(img, torch.Tensor) else torch.as_tensor(np.asarray(img))
        x = (t.as_tensor() if isinstance(t, MetaTensor) else t).to(torch.float32)
        inside = self._inside(x, mask)
        out = torch.empty_like(x)
        groups = range(x.shape[0]) if self.channel_wise else [slice(None)]
        for c in groups:
            sel = inside[c]
            values = x[c][sel].double()
            if values.numel() == 0:
                which = f"channel {c}" if self.channel_wise else "any channel"
                source = getattr(img, "meta", {}).get("filename_or_obj") if hasattr(img, "meta") else None
                raise InputDataError(
                    f"'{self.name}'{f' ({source})' if source else ''} has no voxel inside the mask in {which}: "
                    "the mask is empty or does not overlap the image (wrong mask file, or a threshold above every "
                    "value)."
                )
            mu = float(values.mean())
            sigma = float(values.std(unbiased=False))
            out[c] = (x[c] - mu) / (sigma if sigma > 0 else 1.0)
            if self.outside is not None:
                out[c] = torch.where(sel, out[c], torch.full_like(out[c], float(self.outside)))
        if isinstance(img, MetaTensor):
            return MetaTensor(out, meta=dict(img.meta), applied_operations=list(img.applied_operations))
        return out if isinstance(img, torch.Tensor) else out.numpy()


class MaskedNormalizeIntensityd(MapTransform):
    """Dictionary version of :class:`MaskedNormalizeIntensity`: the mask comes from ``mask_key`` and/or a threshold.

    When both the image and the mask are ``MetaTensor`` s their grids are checked first (shape, spacing,
    directions, origin), so a mask of another case or another resolution is refused instead of applied.

    Example::

        MaskedNormalizeIntensityd("image", mask_key="mask")({"image": flair_t1c, "mask": brainmask})
        MaskedNormalizeIntensityd("image", threshold="min")({"image": flair_t1c})  # above the background value
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str | None = None,
        threshold: Threshold = None,
        outside: float | None = 0.0,
        channel_wise: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if mask_key is None and threshold is None:
            raise ConfigError("MaskedNormalizeIntensityd needs mask_key= or threshold= (a number or 'min').")
        self.mask_key = mask_key
        self.threshold = threshold
        self.outside = outside
        self.channel_wise = channel_wise

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai_peft.transforms.geometry import check_geometry

        d = dict(data)
        mask = None
        if self.mask_key is not None:
            if self.mask_key not in d:
                raise InputDataError(
                    f"MaskedNormalizeIntensityd: '{self.mask_key}' is not in the data; add the mask file under that "
                    "key (also at inference), or normalise with a threshold instead."
                )
            mask = d[self.mask_key]
        for key in self.key_iterator(d):
            if isinstance(mask, MetaTensor) and isinstance(d[key], MetaTensor):
                check_geometry(d[key], mask, match_orientation=False, names=(str(key), str(self.mask_key)))
            tf = MaskedNormalizeIntensity(self.threshold, self.outside, self.channel_wise, name=str(key))
            d[key] = tf(d[key], mask)
        return d
