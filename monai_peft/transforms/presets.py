"""Ready-made MONAI ``Compose`` pipelines of dictionary transforms (keys ``image`` / ``label``).

* :func:`cxr_classification_transforms` - chest X-ray (DICOM / PNG / JPEG) for 2D classification backbones;
* :func:`ct_transforms` - CT from NIfTI / NRRD / DICOM series (+ NIfTI / NRRD / DICOM SEG labels);
* :func:`mr_transforms` - MR volumes with z-score or percentile normalisation.

Normalisation must match the statistics the backbone was pre-trained with; :data:`NORMALIZATION_PRESETS` holds
the usual ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from monai.transforms import (
    Compose,
    EnsureTyped,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RepeatChanneld,
    Resized,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from monai_peft.errors import ConfigError, MonaiPeftError
from monai_peft.transforms.cxr import LoadChestXrayd, Scaling
from monai_peft.transforms.geometry import CheckGeometryd
from monai_peft.transforms.intensity import CheckFinited, HUWindowd
from monai_peft.transforms.volume_io import LoadVolumed

__all__ = [
    "NORMALIZATION_PRESETS",
    "PresetCompose",
    "ct_transforms",
    "cxr_classification_transforms",
    "mr_transforms",
    "normalization_stats",
]

#: ``name -> (mean, std)`` per channel, for images scaled to ``[0, 1]``.
NORMALIZATION_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    # torchvision / timm ImageNet statistics (RGB)
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # MRM (masked record modelling) chest X-ray pre-training
    "mrm": ((0.4978,), (0.2449,)),
    # chest X-ray MAE pre-training
    "cxr_mae": ((0.4785,), (0.2834,)),
    # MedMNIST reference code: Normalize(mean=[.5], std=[.5]), i.e. [0, 1] -> [-1, 1]
    "medmnist": ((0.5,), (0.5,)),
    "half": ((0.5,), (0.5,)),
    # no normalisation (keep [0, 1])
    "none": ((0.0,), (1.0,)),
}


class PresetCompose(Compose):
    """``monai.transforms.Compose`` that lets monai_peft's own errors through unwrapped.

    MONAI wraps any exception raised inside a transform into ``RuntimeError("applying transform ...")``. The presets
    use this subclass so that a bad input surfaces as the specific :class:`~monai_peft.errors.DicomError`,
    :class:`~monai_peft.errors.InputDataError` or :class:`~monai_peft.errors.MissingDependencyError` with its
    message; other exceptions keep MONAI's behaviour.
    """

    def __call__(self, input_, start=0, end=None, threading=False, lazy=None):  # type: ignore[override]
        try:
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)
        except RuntimeError as exc:
            cause = exc.__cause__
            while isinstance(cause, RuntimeError) and not isinstance(cause, MonaiPeftError) and cause.__cause__:
                cause = cause.__cause__
            if isinstance(cause, MonaiPeftError):
                cause.__suppress_context__ = True
                raise cause  # noqa: B904 - the wrapper carries no information beyond the cause
            raise


def normalization_stats(
    norm: str | None = "imagenet",
    channels: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel ``(mean, std)`` for ``channels`` channels from a preset name or explicit values.

    Single-value presets are repeated over channels; a 3-value preset (``imagenet``) with ``channels != 3`` is an
    error (the backbone expects RGB statistics: use ``channels=3`` or pass ``mean``/``std``).
    """
    if mean is not None or std is not None:
        if mean is None or std is None:
            raise ConfigError("give both mean and std, or neither (and a preset name in norm).")
        m, s = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    else:
        key = "none" if norm is None else norm
        if key not in NORMALIZATION_PRESETS:
            raise ConfigError(
                f"unknown normalisation preset '{norm}'; use one of {sorted(NORMALIZATION_PRESETS)} or pass mean/std."
            )
        m, s = NORMALIZATION_PRESETS[key]
    if len(m) != len(s):
        raise ConfigError(f"mean has {len(m)} values but std has {len(s)}.")
    if any(v <= 0 for v in s):
        raise ConfigError(f"std values must be > 0, got {s}.")
    if len(m) == 1:
        return m * channels, s * channels
    if len(m) != channels:
        raise ConfigError(
            f"normalisation '{norm}' has {len(m)} channel values but the pipeline makes {channels} channel(s); "
            f"use channels={len(m)} or pass mean/std with {channels} value(s)."
        )
    return m, s


def cxr_classification_transforms(
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    spatial_size: int | tuple[int, int] = 224,
    channels: int = 3,
    norm: str | None = "imagenet",
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    keep_aspect: bool = False,
    augment: bool = False,
    voi_lut: bool = True,
    scaling: Scaling = "auto",
) -> Compose:
    """Chest X-ray classification pipeline: path -> ``(channels, H, W)`` normalised float32 tensor.

    Steps: :class:`LoadChestXrayd` (DICOM modality + VOI LUT, MONOCHROME1 inversion, or PNG/JPEG; ``[0, 1]``)
    -> :class:`CheckFinited` -> resize to ``spatial_size`` (or longest side + zero pad if ``keep_aspect``)
    -> optional mild augmentation (rotation +/-10 deg, scale +/-10 %; no flips: laterality matters)
    -> grayscale repeated to ``channels`` -> ``(x - mean) / std``.

    Args:
        image_key, label_key: dictionary keys (the label, if present, becomes a tensor).
        spatial_size: output ``H, W`` (int for square).
        channels: 3 for ImageNet-style backbones, 1 for grayscale models.
        norm: preset in :data:`NORMALIZATION_PRESETS` (``imagenet``, ``mrm``, ``cxr_mae``, ``medmnist``/``half``,
            ``none``); ignored when ``mean``/``std`` are given.
        keep_aspect: keep the aspect ratio (pad with zeros) instead of stretching.
        augment: add random affine augmentation (training only).
        voi_lut, scaling: see :func:`~monai_peft.transforms.read_chest_xray`.

    Example::

        tf = cxr_classification_transforms(norm="mrm", channels=3)
        sample = tf({"image": "cxr.dcm", "label": 1})  # sample["image"]: (3, 224, 224)
    """
    size = (spatial_size, spatial_size) if isinstance(spatial_size, int) else tuple(spatial_size)
    m, s = normalization_stats(norm, channels, mean, std)
    steps: list = [LoadChestXrayd(image_key, voi_lut=voi_lut, scaling=scaling), CheckFinited(image_key)]
    if keep_aspect:
        steps += [  # longest side to the smaller target side, then zero-pad to the target
            Resized(image_key, spatial_size=min(size), size_mode="longest", mode="bilinear", anti_aliasing=True),
            SpatialPadd(image_key, spatial_size=size),
        ]
    else:
        steps.append(Resized(image_key, spatial_size=size, mode="bilinear", anti_aliasing=True))
    if augment:
        steps.append(
            RandAffined(
                image_key, prob=0.5, rotate_range=np.deg2rad(10.0), scale_range=(0.1, 0.1), padding_mode="zeros"
            )
        )
    if channels > 1:
        steps.append(RepeatChanneld(image_key, repeats=channels))
    steps.append(NormalizeIntensityd(image_key, subtrahend=m, divisor=s, channel_wise=True))
    steps.append(EnsureTyped(image_key, dtype=np.float32))
    if label_key is not None:
        steps.append(EnsureTyped(label_key, allow_missing_keys=True, track_meta=False))
    return PresetCompose(steps)


def _volume_front(
    image_key: str,
    label_key: str | None,
    series_uid: str | None,
    nan_replace: float | None,
    check_geometry: bool,
    axcodes: str | None,
    pixdim: Sequence[float] | None,
) -> list:
    keys = [image_key] + ([label_key] if label_key else [])
    steps: list = [
        LoadVolumed(keys, reference_key=image_key, series_uid=series_uid, allow_missing_keys=True),
        CheckFinited(image_key, replace=nan_replace),
    ]
    if check_geometry and label_key:
        steps.append(CheckGeometryd(keys, match_orientation=axcodes is not None, allow_missing_keys=True))
    if axcodes is not None:
        steps.append(Orientationd(keys, axcodes=axcodes, labels=None, allow_missing_keys=True))
    if pixdim is not None:
        modes = ("bilinear", "nearest")[: len(keys)]
        steps.append(Spacingd(keys, pixdim=tuple(pixdim), mode=modes, allow_missing_keys=True))
    return steps


def ct_transforms(
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    window: str | tuple[float, float] | None = "abdomen",
    pixdim: Sequence[float] | None = (1.5, 1.5, 2.0),
    axcodes: str | None = "RAS",
    series_uid: str | None = None,
    check_geometry: bool = True,
    nan_replace: float | None = None,
) -> Compose:
    """CT pipeline: NIfTI / NRRD / DICOM series (+ label) -> oriented, resampled, windowed ``(1, X, Y, Z)``.

    Steps: :class:`LoadVolumed` (labels may be NIfTI, NRRD or DICOM SEG aligned to the image series)
    -> :class:`CheckFinited` -> :class:`CheckGeometryd` (label on the image grid, up to axis order)
    -> ``Orientationd(axcodes)`` -> ``Spacingd(pixdim)`` (bilinear image, **nearest** label)
    -> :class:`HUWindowd` (``window`` preset or ``(center, width)``; ``None`` keeps HU).

    Args:
        image_key, label_key: dictionary keys; the label is optional at run time.
        window: HU window preset (``abdomen``, ``liver``, ``mediastinum``, ``lung``, ``brain``, ``bone``).
        pixdim: output voxel size in mm (``None``: keep).
        axcodes: output orientation (``None``: keep).
        series_uid: SeriesInstanceUID for folders with several series.
        check_geometry: fail early when the label is not on the image grid.
        nan_replace: ``None`` raises on NaN/Inf voxels, a number replaces them.
    """
    steps = _volume_front(image_key, label_key, series_uid, nan_replace, check_geometry, axcodes, pixdim)
    if window is not None:
        steps.append(HUWindowd(image_key, window=window))
    keys = [image_key] + ([label_key] if label_key else [])
    steps.append(EnsureTyped(keys, dtype=np.float32, allow_missing_keys=True))
    return PresetCompose(steps)


def mr_transforms(
    *,
    image_key: str = "image",
    label_key: str | None = "label",
    norm: Literal["zscore", "percentile"] | None = "zscore",
    pixdim: Sequence[float] | None = None,
    axcodes: str | None = "RAS",
    nonzero: bool = True,
    lower: float = 0.5,
    upper: float = 99.5,
    series_uid: str | None = None,
    check_geometry: bool = True,
    nan_replace: float | None = None,
) -> Compose:
    """MR pipeline: load (+ label), check, orient, optionally resample, then normalise intensities.

    Args:
        norm: ``"zscore"`` - ``(x - mean) / std`` per channel over non-zero voxels (``nonzero``; the brain /
            body, not the air); ``"percentile"`` - map the ``lower``..``upper`` percentiles to ``[0, 1]`` and
            clip; ``None`` - keep intensities.
        other arguments: as in :func:`ct_transforms`.
    """
    steps = _volume_front(image_key, label_key, series_uid, nan_replace, check_geometry, axcodes, pixdim)
    if norm == "zscore":
        steps.append(NormalizeIntensityd(image_key, nonzero=nonzero, channel_wise=True))
    elif norm == "percentile":
        steps.append(
            ScaleIntensityRangePercentilesd(
                image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        )
    elif norm is not None:
        raise ConfigError(f"unknown MR normalisation '{norm}'; use 'zscore', 'percentile' or None.")
    keys = [image_key] + ([label_key] if label_key else [])
    steps.append(EnsureTyped(keys, dtype=np.float32, allow_missing_keys=True))
    return PresetCompose(steps)
