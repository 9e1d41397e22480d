"""Images of the generation study, read at run time from the shared data folder (never copied).

* source (pretraining): axial FLAIR slices of BraTS cases (``<path>/*/Flair_subtrMeanDivStd.nii.gz``); a slice
  is kept when at least ``min_brain_fraction`` of its pixels lie in the case's ``brainmask.nii.gz``. Intensities
  are scaled robustly per volume: the 0.5th and 99.5th percentiles of the brain voxels map to 0 and 1 (clipped),
  pixels outside the brain are 0. Each slice is resized to ``image_size`` (area interpolation).
* target (adaptation and reference): a MedMNIST ``.npz``; ``train_images`` for adaptation (``n`` images per
  seed, drawn without replacement), ``test_images`` (or ``val_images``) as the reference set of the score.
  uint8 / 255, resized to ``image_size`` (bilinear).

Every function returns float32 tensors ``(N, 1, image_size, image_size)`` in ``[0, 1]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from monai_peft.errors import ConfigError
from monai_peft.study.generation_schema import SourceImagesSpec, TargetImagesSpec

__all__ = ["load_source_images", "load_target_split", "target_train_subset", "to_unit_range"]


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """``(N, 1, H, W)`` -> ``(N, 1, size, size)``."""
    if x.shape[-2:] == (size, size):
        return x
    if mode == "area":
        return F.interpolate(x, size=(size, size), mode="area")
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def load_source_images(spec: SourceImagesSpec, image_size: int) -> torch.Tensor:
    """BraTS FLAIR axial slices with brain, ``(N, 1, image_size, image_size)`` in [0, 1] (see module docstring).

    Raises:
        ConfigError: the folder holds no case with ``Flair_subtrMeanDivStd.nii.gz`` and ``brainmask.nii.gz``.
    """
    import nibabel as nib

    root = Path(spec.path)
    files = sorted(root.glob("*/Flair_subtrMeanDivStd.nii.gz"))
    if not files:
        raise ConfigError(
            f"source.path {root} holds no BraTS case (<case>/Flair_subtrMeanDivStd.nii.gz); point source.path at "
            "the BraTS folder (e.g. ../shared/data/brats) or set MONAI_PEFT_SHARED_DATA."
        )
    slices = []
    for f in files:
        mask_file = f.with_name("brainmask.nii.gz")
        if not mask_file.is_file():
            raise ConfigError(f"BraTS case {f.parent} has no brainmask.nii.gz (needed to pick brain slices).")
        vol = np.asarray(nib.load(str(f)).get_fdata(dtype=np.float32))
        mask = np.asarray(nib.load(str(mask_file)).get_fdata(dtype=np.float32)) > 0
        if vol.ndim != 3 or vol.shape != mask.shape:
            raise ConfigError(f"{f}: expected a 3D volume with a brain mask of the same shape, got {vol.shape}.")
        lo, hi = np.percentile(vol[mask], [0.5, 99.5])
        scaled = np.where(mask, np.clip((vol - lo) / max(hi - lo, 1e-6), 0.0, 1.0), 0.0).astype(np.float32)
        keep = mask.mean(axis=(0, 1)) >= spec.min_brain_fraction
        # axial slices (H, W) = (x, y) rotated to the radiological view
        slices.append(np.rot90(scaled[:, :, keep], k=1, axes=(0, 1)).transpose(2, 0, 1).copy())
    x = torch.from_numpy(np.concatenate(slices))[:, None]
    if len(x) == 0:
        raise ConfigError(f"no slice of {root} has a brain fraction >= {spec.min_brain_fraction}; lower it.")
    return _resize(x, image_size, "area").clamp(0, 1).contiguous()


def _npz(spec: TargetImagesSpec) -> np.lib.npyio.NpzFile:
    path = Path(spec.path)
    if not path.is_file():
        raise ConfigError(
            f"target.path {path} does not exist; point it at a MedMNIST .npz (e.g. "
            "../shared/data/medmnist/pneumoniamnist_28.npz) or set MONAI_PEFT_SHARED_DATA."
        )
    return np.load(path)


def load_target_split(spec: TargetImagesSpec, split: str, image_size: int) -> torch.Tensor:
    """``<split>_images`` of the MedMNIST file as ``(N, 1, image_size, image_size)`` in [0, 1]."""
    data = _npz(spec)
    key = f"{split}_images"
    if key not in data:
        raise ConfigError(f"{spec.path} has no {key!r}; keys: {sorted(data.files)}.")
    images = data[key]
    if images.ndim != 3:
        raise ConfigError(f"{spec.path}[{key}] must be grayscale 2D images (N, H, W), got shape {images.shape}.")
    x = torch.from_numpy(images.astype(np.float32) / 255.0)[:, None]
    return _resize(x, image_size, "bilinear").clamp(0, 1).contiguous()


def target_train_subset(train: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """``n`` images of ``train`` ``(N, 1, H, W)`` drawn without replacement with ``seed``."""
    if n > len(train):
        raise ConfigError(f"target.train_images={n} exceeds the {len(train)} training images of the target set.")
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n]
    return train[idx.sort().values]


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Model space ``[-1, 1]`` -> image space ``[0, 1]`` (clipped)."""
    return ((x + 1.0) / 2.0).clamp(0.0, 1.0)
