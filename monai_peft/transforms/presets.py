"""Ready-made MONAI ``Compose`` pipelines of dictionary transforms (keys ``image`` / ``label``).

* :func:`cxr_classification_transforms` - chest X-ray (DICOM / PNG / JPEG) for 2D classification backbones;
* :func:`ct_transforms` - CT from NIfTI / NRRD / DICOM series (+ NIfTI / NRRD / DICOM SEG labels);
* :func:`mr_transforms` - MR volumes (one file, or several modalities as channels) with z-score (optionally inside
  a brain / foreground mask) or percentile normalisation, optional crop to the foreground and padding;
* :func:`invert_preset` - take a prediction made on the preset's grid back to the original image grid.

The volume presets keep every spatial step invertible (``Orientationd``, ``Spacingd``, ``CropForegroundd``,
``DivisiblePadd``) and the ``MetaTensor`` s keep their ``applied_operations``, so ``monai.transforms.Invertd``
(with ``transform=<the preset>``) undoes them.

Normalisation must match the statistics the backbone was pre-trained with; :data:`NORMALIZATION_PRESETS` holds
the usual ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    DivisiblePadd,
    EnsureTyped,
    Invertd,
    MapTransform,
    NormalizeIntensityd,
    Orientationd,
    RandAffined,
    RepeatChanneld,
    Resized,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)

from monai_peft.errors import ConfigError, InputDataError, MonaiPeftError
from monai_peft.transforms.cxr import LoadChestXrayd, Scaling
from monai_peft.transforms.geometry import CheckGeometryd
from monai_peft.transforms.intensity import CheckFinited, HUWindowd, MaskedNormalizeIntensityd, above_minimum
from monai_peft.transforms.volume_io import LoadVolumed

__all__ = [
    "NORMALIZATION_PRESETS",
    "PresetCompose",
    "ct_transforms",
    "cxr_classification_transforms",
    "invert_preset",
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
    extra_keys: Sequence[str] = (),
) -> list:
    """Load -> NaN/Inf checks -> geometry check -> orientation -> spacing, for the image, label and ``extra_keys``
    (masks: resampled with nearest like the label).

    Only the image may have NaN/Inf replaced (``nan_replace``); a label or mask with NaN/Inf is always refused
    (a replaced label value would be a silent wrong label)."""
    others = ([label_key] if label_key else []) + [k for k in extra_keys if k and k != label_key]
    keys = [image_key, *others]
    steps: list = [
        LoadVolumed(keys, reference_key=image_key, series_uid=series_uid, allow_missing_keys=True),
        CheckFinited(image_key, replace=nan_replace),
    ]
    if others:
        steps.append(CheckFinited(others, allow_missing_keys=True))
    if check_geometry and others:
        steps.append(CheckGeometryd(keys, match_orientation=axcodes is not None, allow_missing_keys=True))
    if axcodes is not None:
        steps.append(Orientationd(keys, axcodes=axcodes, labels=None, allow_missing_keys=True))
    if pixdim is not None:
        modes = ["bilinear"] + ["nearest"] * len(others)
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
        nan_replace: ``None`` raises on NaN/Inf image voxels, a number replaces them. NaN/Inf in the label are
            always refused (the error gives the count and the file).

    The spatial steps are invertible: :func:`invert_preset` (or ``monai.transforms.Invertd``) maps a prediction
    back to the original grid.
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
    norm_mask_key: str | None = None,
    norm_mask_threshold: float | Literal["min"] | None = None,
    norm_outside: float | None = 0.0,
    crop_foreground: bool = False,
    crop_margin: int | Sequence[int] = 0,
    divisible_k: int | Sequence[int] | None = None,
) -> Compose:
    """MR pipeline: load (+ label, + mask), check, orient, optionally resample and crop, normalise, optionally pad.

    The image may be several co-registered modalities, one file each (``{"image": [flair, t1c, t2]}``): they
    become the channels of one ``(C, X, Y, Z)`` image, after a check that every file is on the first one's grid.

    Steps: :class:`LoadVolumed` -> :class:`CheckFinited` (image; label and mask always refuse NaN/Inf)
    -> :class:`CheckGeometryd` -> ``Orientationd(axcodes)`` -> ``Spacingd(pixdim)`` (bilinear image, nearest
    label and mask) -> ``CropForegroundd`` (``crop_foreground``) -> normalisation -> ``DivisiblePadd``
    (``divisible_k``, zero padding after normalisation) -> float32. Every spatial step is invertible
    (:func:`invert_preset`).

    Args:
        norm: ``"zscore"`` - ``(x - mean) / std`` per channel, over non-zero voxels (``nonzero``) or, when
            ``norm_mask_key`` / ``norm_mask_threshold`` is given, over the voxels inside that mask
            (:class:`MaskedNormalizeIntensityd`); ``"percentile"`` - map the ``lower``..``upper`` percentiles to
            ``[0, 1]`` and clip; ``None`` - keep intensities.
        norm_mask_key: key of a brain / foreground mask file (e.g. BraTS ``brainmask.nii.gz``), loaded, checked,
            oriented and resampled (nearest) with the image; the z-score statistics come from its voxels > 0.
            Needed on z-scored data such as BraTS, whose background is about -3.6, not 0.
        norm_mask_threshold: instead of (or with) a mask file, voxels ``> threshold`` per channel, or ``"min"``:
            voxels above the channel minimum (the constant background of skull-stripped data).
        norm_outside: value of the voxels outside the mask after masked normalisation (``None``: same linear map).
        crop_foreground: crop to the bounding box of the mask (``norm_mask_key``) or of the voxels above each
            channel's minimum, plus ``crop_margin`` voxels.
        divisible_k: zero-pad the spatial size to a multiple of ``k`` (e.g. 32 for a 5-level U-Net / SwinUNETR).
        other arguments: as in :func:`ct_transforms`.
    """
    masked = norm_mask_key is not None or norm_mask_threshold is not None
    if masked and norm != "zscore":
        raise ConfigError(
            f"norm_mask_key / norm_mask_threshold apply to norm='zscore' (z-score inside the mask), not norm={norm!r}."
        )
    if norm_mask_key is not None and norm_mask_key in (image_key, label_key):
        raise ConfigError(f"norm_mask_key '{norm_mask_key}' must differ from the image and label keys.")
    extra = [norm_mask_key] if norm_mask_key else []
    steps = _volume_front(image_key, label_key, series_uid, nan_replace, check_geometry, axcodes, pixdim, extra)
    keys = [image_key] + ([label_key] if label_key else []) + extra
    if crop_foreground:
        source = norm_mask_key or image_key
        select = _positive if norm_mask_key else above_minimum
        steps.append(
            CropForegroundd(
                keys, source_key=source, select_fn=select, margin=crop_margin, allow_smaller=True,
                allow_missing_keys=True,
            )
        )  # fmt: skip
    if norm == "zscore" and masked:
        steps.append(
            MaskedNormalizeIntensityd(
                image_key, mask_key=norm_mask_key, threshold=norm_mask_threshold, outside=norm_outside
            )
        )
    elif norm == "zscore":
        if nonzero:
            steps.append(WarnConstantBackgroundd(image_key))
        steps.append(NormalizeIntensityd(image_key, nonzero=nonzero, channel_wise=True))
    elif norm == "percentile":
        steps.append(
            ScaleIntensityRangePercentilesd(
                image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True, channel_wise=True
            )
        )
    elif norm is not None:
        raise ConfigError(f"unknown MR normalisation '{norm}'; use 'zscore', 'percentile' or None.")
    if divisible_k is not None:
        steps.append(DivisiblePadd(keys, k=divisible_k, mode="constant", allow_missing_keys=True))
    steps.append(EnsureTyped(keys, dtype=np.float32, allow_missing_keys=True))
    return PresetCompose(steps)


class WarnConstantBackgroundd(MapTransform):
    """Warn when ``nonzero=True`` z-scoring would include a constant non-zero background.

    Skull-stripped, z-scored MR (BraTS ``*_subtrMeanDivStd``) has its background at one negative value
    (about -3.6), not 0, so ``NormalizeIntensityd(nonzero=True)`` normalises over the whole volume. When more than
    ``fraction`` of a channel's voxels equal its minimum and that minimum is not 0, this warns and names the fix
    (``norm_mask_key=`` or ``norm_mask_threshold="min"``). The data pass through unchanged.
    """

    def __init__(self, keys: Any, fraction: float = 0.2, allow_missing_keys: bool = True) -> None:
        super().__init__(keys, allow_missing_keys)
        self.fraction = fraction

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            flat = torch.as_tensor(img).reshape(img.shape[0], -1)
            low = flat.amin(dim=1, keepdim=True)
            share = (flat == low).float().mean(dim=1)
            for c in range(flat.shape[0]):
                if float(low[c]) != 0.0 and float(share[c]) > self.fraction:
                    source = getattr(img, "meta", {}).get("filename_or_obj", "")
                    warnings.warn(
                        f"'{key}' channel {c} ({source}): {100 * float(share[c]):.0f} % of the voxels equal the "
                        f"minimum {float(low[c]):.3g}, a constant non-zero background, so nonzero=True z-scores "
                        "over the whole volume. Use mr_transforms(norm_mask_key=<brain mask key>) or "
                        "norm_mask_threshold='min' to normalise inside the brain.",
                        stacklevel=2,
                    )
        return d


def _positive(x: Any) -> Any:
    """Mask voxels > 0 (``select_fn`` of the foreground crop on a mask key)."""
    return x > 0


def invert_preset(
    preset: Compose,
    data: Mapping[Hashable, Any],
    keys: str | Sequence[str] = "pred",
    *,
    orig_key: str = "image",
    nearest_interp: bool | Sequence[bool] = True,
    device: str | None = None,
) -> dict[Hashable, Any]:
    """Map predictions made on the preset's grid back to the original image grid (a checked ``Invertd``).

    ``data`` is the preset's output dictionary with the prediction(s) added under ``keys`` (e.g. a
    ``(K, X', Y', Z')`` probability map or a ``(1, X', Y', Z')`` label from sliding-window inference on
    ``data[orig_key]``). Each spatial step of the preset (``Orientationd``, ``Spacingd``, ``CropForegroundd``,
    ``DivisiblePadd``) is undone in reverse order, from ``data[orig_key].applied_operations``; the result has the
    shape and affine of the image as loaded (``(K, X, Y, Z)``).

    Args:
        preset: the ``Compose`` that made ``data`` (e.g. ``mr_transforms(...)``); the same object or an identical one.
        data: the preset's output plus the prediction(s).
        keys: prediction key(s) to invert, in place.
        orig_key: the key the preset transformed whose grid the predictions share.
        nearest_interp: resample with nearest neighbour (labels; default) or the preset's modes (probabilities).
        device: optional device for the inverted tensors.

    Returns:
        A new dict in which ``keys`` hold the inverted ``MetaTensor`` s.

    Raises:
        InputDataError: ``orig_key`` is absent or lost its transform record, or a prediction is not on its grid.
    """
    key_list = [keys] if isinstance(keys, str) else list(keys)
    ref = data.get(orig_key)
    if not isinstance(ref, MetaTensor):
        raise InputDataError(
            f"invert_preset needs data['{orig_key}'] as the MetaTensor the preset produced (it holds the applied "
            "operations to undo); keep that key in the dict and do not convert it to a plain tensor / numpy."
        )
    for k in key_list:
        if k not in data:
            raise InputDataError(f"invert_preset: prediction key '{k}' is not in the data.")
        pred = data[k]
        if tuple(pred.shape[1:]) != tuple(ref.shape[1:]):
            raise InputDataError(
                f"prediction '{k}' has spatial shape {tuple(pred.shape[1:])} but '{orig_key}' after the preset has "
                f"{tuple(ref.shape[1:])}: predict on the preset's output grid (sliding-window inference keeps it), "
                "then invert."
            )
    inverter = Invertd(
        key_list, transform=preset, orig_keys=orig_key, nearest_interp=nearest_interp, device=device, to_tensor=True
    )
    return inverter(dict(data))
