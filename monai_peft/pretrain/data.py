"""Unlabelled images for MAE pretraining: a MedMNIST-style npz (labels unused) or a folder of NIfTI volumes.

:func:`load_unlabelled` returns a float32 tensor ``(N, C, *spatial)`` with values in ``[0, 1]``, resized to the
requested ``image_size`` (``(H, W)`` for 2D, ``(D, H, W)`` for 3D; bilinear / trilinear):

* ``.npz``: the array ``key`` (default ``train_images``; MedMNIST keeps the labels in ``train_labels``, which are
  never read). ``uint8`` images ``(N, H, W)`` (grayscale), ``(N, H, W, 3)`` (RGB) or ``(N, D, H, W)`` (3D
  volumes, e.g. OrganMNIST3D) are scaled by ``1 / 255``; other dtypes are min-max scaled per image.
* a folder: every ``*.nii`` / ``*.nii.gz`` below it (or those matching ``pattern``, e.g. ``"**/Flair*.nii.gz"``),
  read with nibabel in its stored voxel order, one channel, each volume scaled to ``[0, 1]`` between its 0.5th and
  99.5th intensity percentiles (robust to outliers, z-scored or raw CT alike). 2D NIfTI images ``(H, W)`` or
  ``(H, W, 1)`` are read as 2D.

Every problem is a :class:`~monai_peft.errors.InputDataError` or :class:`~monai_peft.errors.ConfigError` that says
what was wrong and what to do (an empty npz, a missing key, a size whose dimensions do not match the data, a folder
without NIfTI files).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monai_peft.errors import ConfigError, InputDataError

__all__ = ["UnlabelledImages", "load_unlabelled"]

_NIFTI = (".nii", ".nii.gz")


@dataclass
class UnlabelledImages:
    """Images for pretraining.

    Attributes:
        images: float32 ``(N, C, *spatial)`` in ``[0, 1]``.
        source: where they came from (shown in the output JSON).
        native_size: spatial size of the first image before resizing.
    """

    images: torch.Tensor
    source: str
    native_size: tuple[int, ...]

    @property
    def spatial_dims(self) -> int:
        return self.images.ndim - 2

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])


def _scale(arr: np.ndarray) -> np.ndarray:
    """Per-image min-max scaling of a non-uint8 array to ``[0, 1]`` (constant images become 0)."""
    arr = arr.astype(np.float32)
    axes = tuple(range(1, arr.ndim))
    lo = arr.min(axis=axes, keepdims=True)
    hi = arr.max(axis=axes, keepdims=True)
    return np.where(hi > lo, (arr - lo) / np.maximum(hi - lo, 1e-12), 0.0).astype(np.float32)


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """``(N, C, *spatial)`` -> ``(N, C, *size)`` (bilinear 2D / trilinear 3D, no corner alignment)."""
    if tuple(x.shape[2:]) == size:
        return x
    mode = "bilinear" if len(size) == 2 else "trilinear"
    out = [F.interpolate(x[i : i + 256], size=size, mode=mode, align_corners=False) for i in range(0, len(x), 256)]
    return torch.cat(out).clamp_(0.0, 1.0)


def _check_size(size: Sequence[int] | None, spatial_dims: int, what: str) -> tuple[int, ...] | None:
    if size is None:
        return None
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        size = size * spatial_dims
    if len(size) != spatial_dims:
        raise ConfigError(
            f"image_size {list(size)} has {len(size)} dimensions but {what} is {spatial_dims}D; give "
            f"{spatial_dims} sizes ({'H W' if spatial_dims == 2 else 'D H W'}) or one size for all dimensions."
        )
    if any(s < 1 for s in size):
        raise ConfigError(f"image_size must be positive, got {list(size)}.")
    return size


def _from_npz(path: Path, key: str, image_size: Sequence[int] | None, spatial_dims: int | None) -> UnlabelledImages:
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise InputDataError(f"cannot read {path} as an npz file: {exc}") from exc
    with npz:
        if key not in npz.files:
            raise InputDataError(
                f"{path} has no array {key!r} (it holds {sorted(npz.files)}); pass the key of the image array "
                "(MedMNIST: train_images)."
            )
        arr = npz[key]
    if arr.shape[0] == 0 or arr.size == 0:
        raise InputDataError(f"{path}: array {key!r} holds no images (shape {arr.shape}); nothing to pretrain on.")
    if arr.ndim == 3:
        dims, channels_last = 2, False
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3) and spatial_dims != 3:
        dims, channels_last = 2, True
    elif arr.ndim == 4:
        dims, channels_last = 3, False
    elif arr.ndim == 5 and arr.shape[-1] in (1, 3):
        dims, channels_last = 3, True
    else:
        raise InputDataError(
            f"{path}: array {key!r} has shape {arr.shape}; expected (N, H, W), (N, H, W, 3) for 2D images or "
            "(N, D, H, W) for 3D volumes."
        )
    if spatial_dims is not None and spatial_dims != dims:
        raise ConfigError(f"{path}: array {key!r} of shape {arr.shape} holds {dims}D images, not {spatial_dims}D.")
    native = tuple(int(s) for s in (arr.shape[1:-1] if channels_last else arr.shape[1:]))
    size = _check_size(image_size, dims, f"the data ({key!r} of shape {arr.shape})") or native
    scaled = arr.astype(np.float32) / 255.0 if arr.dtype == np.uint8 else _scale(arr)
    x = torch.from_numpy(np.ascontiguousarray(scaled))
    x = torch.movedim(x, -1, 1) if channels_last else x[:, None]
    return UnlabelledImages(_resize(x.contiguous(), size), f"{path} [{key}]", native)


def _percentile_scale(vol: np.ndarray) -> np.ndarray:
    finite = vol[np.isfinite(vol)]
    if finite.size == 0:
        return np.zeros(vol.shape, np.float32)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        return np.zeros(vol.shape, np.float32)
    return np.clip((np.nan_to_num(vol, nan=lo) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def _from_folder(
    folder: Path, pattern: str | None, image_size: Sequence[int] | None, spatial_dims: int | None
) -> UnlabelledImages:
    import nibabel as nib

    if pattern:
        files = sorted(p for p in folder.glob(pattern) if p.is_file())
    else:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith(_NIFTI))
    if not files:
        what = f"matching {pattern!r}" if pattern else "(*.nii, *.nii.gz)"
        raise InputDataError(f"no NIfTI files {what} under {folder}; point to a folder of NIfTI volumes.")
    volumes: list[torch.Tensor] = []
    native: tuple[int, ...] = ()
    size: tuple[int, ...] | None = None
    dims = None
    for f in files:
        try:
            vol = np.asanyarray(nib.load(str(f)).dataobj, dtype=np.float32)
        except Exception as exc:
            raise InputDataError(f"cannot read {f} as NIfTI: {exc}") from exc
        vol = np.squeeze(vol) if vol.ndim > 3 else vol
        if vol.ndim == 3 and vol.shape[-1] == 1:
            vol = vol[..., 0]
        if vol.ndim not in (2, 3):
            raise InputDataError(f"{f} has shape {vol.shape}; expected a 2D image or a single-channel 3D volume.")
        if dims is None:
            dims, native = vol.ndim, tuple(int(s) for s in vol.shape)
            if spatial_dims is not None and spatial_dims != dims:
                raise ConfigError(f"{f} is a {dims}D image (shape {vol.shape}), not {spatial_dims}D.")
            size = _check_size(image_size, dims, f"the data ({f.name}, shape {vol.shape})") or native
        elif vol.ndim != dims:
            raise InputDataError(f"{f} is {vol.ndim}D but {files[0]} is {dims}D; keep one kind of image per folder.")
        x = torch.from_numpy(_percentile_scale(vol))[None, None]
        volumes.append(_resize(x, size))  # type: ignore[arg-type]
    return UnlabelledImages(torch.cat(volumes), f"{folder} ({len(files)} NIfTI files)", native)


def load_unlabelled(
    path: str | Path,
    *,
    image_size: Sequence[int] | int | None = None,
    key: str = "train_images",
    pattern: str | None = None,
    spatial_dims: int | None = None,
    in_channels: int | None = None,
) -> UnlabelledImages:
    """Read unlabelled images for pretraining (see the module docstring).

    Args:
        path: an ``.npz`` file or a folder of NIfTI files.
        image_size: output size (one int for all dimensions, ``(H, W)`` or ``(D, H, W)``); default: the first
            image's size.
        key: npz array with the images (labels are never read).
        pattern: folder only, a glob relative to ``path`` (default: every NIfTI file below it).
        spatial_dims: expected 2 or 3 (default: from the data); a mismatch is an error.
        in_channels: 1 or 3; grayscale is repeated to 3 channels, RGB converted to gray by luminance.

    Returns:
        :class:`UnlabelledImages` with ``images`` float32 ``(N, C, *image_size)`` in ``[0, 1]``.
    """
    path = Path(path)
    if isinstance(image_size, int):
        image_size = (image_size,)
    if spatial_dims not in (None, 2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    if path.is_dir():
        data = _from_folder(path, pattern, image_size, spatial_dims)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise InputDataError(f"{path} is neither an .npz file nor a folder of NIfTI volumes.")
        data = _from_npz(path, key, image_size, spatial_dims)
    else:
        raise InputDataError(f"pretraining data {path} does not exist; pass an .npz file or a folder of NIfTI files.")
    if in_channels is not None and in_channels != data.in_channels:
        if in_channels == 3 and data.in_channels == 1:
            data.images = data.images.repeat(1, 3, *([1] * data.spatial_dims))
        elif in_channels == 1 and data.in_channels == 3:
            w = torch.tensor([0.299, 0.587, 0.114]).reshape(1, 3, *([1] * data.spatial_dims))
            data.images = (data.images * w).sum(1, keepdim=True)
        else:
            raise ConfigError(f"in_channels must be 1 or 3 (the data has {data.in_channels}), got {in_channels}.")
    return data
