"""Voxel-to-world geometry helpers and the image/label geometry check.

Conventions (as in MONAI): arrays are channel-first ``(C, *spatial)``; ``MetaTensor.affine`` is a 4x4
matrix mapping voxel indices of the spatial axes to world millimetres in **RAS** (NIfTI convention).
DICOM uses LPS; :data:`LPS_TO_RAS` converts.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import nibabel.orientations as nio
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from monai_peft.errors import InputDataError

__all__ = [
    "LPS_TO_RAS",
    "CheckGeometry",
    "CheckGeometryd",
    "affine_spacing",
    "check_geometry",
    "geometry_of",
    "reorient_array",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _as_np_affine(affine: np.ndarray | torch.Tensor) -> np.ndarray:
    arr = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    return arr.astype(np.float64)


def affine_spacing(affine: np.ndarray | torch.Tensor, spatial_dims: int = 3) -> np.ndarray:
    """Voxel size in mm along each of the first ``spatial_dims`` array axes (column norms of the affine)."""
    aff = _as_np_affine(affine)
    return np.linalg.norm(aff[:3, :spatial_dims], axis=0)


def geometry_of(img: torch.Tensor | np.ndarray, affine: np.ndarray | torch.Tensor | None = None) -> tuple:
    """``(spatial_shape, affine)`` of a channel-first image; the affine comes from the MetaTensor if not given."""
    if affine is None:
        if not isinstance(img, MetaTensor):
            raise InputDataError(
                "geometry check needs the affine of the image: pass a MetaTensor (e.g. from LoadVolume / "
                "monai LoadImage) or give the affine explicitly."
            )
        affine = img.affine
    return tuple(int(s) for s in img.shape[1:]), _as_np_affine(affine)


def reorient_array(array: np.ndarray, affine: np.ndarray, target_affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flip/permute the spatial axes of ``array`` (spatial-only, no channel axis) so that its axis directions
    match ``target_affine``'s. Returns the new array and its affine. No interpolation happens."""
    src = nio.io_orientation(affine)
    dst = nio.io_orientation(target_affine)
    ornt = nio.ornt_transform(src, dst)
    new = nio.apply_orientation(array, ornt)
    new_affine = affine @ nio.inv_ornt_aff(ornt, array.shape)
    return np.ascontiguousarray(new), new_affine


def check_geometry(
    reference: torch.Tensor | np.ndarray,
    other: torch.Tensor | np.ndarray,
    *,
    atol: float = 1e-2,
    direction_atol: float = 1e-3,
    match_orientation: bool = False,
    names: tuple[str, str] = ("image", "label"),
    orientation_hint: str | None = None,
) -> None:
    """Raise :class:`InputDataError` when two channel-first images do not share the same voxel grid.

    Args:
        reference: ``(C, *spatial)`` MetaTensor, e.g. the image.
        other: ``(C', *spatial)`` MetaTensor, e.g. the label.
        atol: tolerance in mm for voxel spacing and for the world position of the first voxel.
        direction_atol: tolerance on the direction cosines (unitless).
        match_orientation: compare after flipping/permuting ``other``'s axes to ``reference``'s orientation
            (use when an ``Orientationd`` follows, e.g. a NIfTI label in LAS and a DICOM image in LPS).
        names: how to call the two inputs in the message.
        orientation_hint: what to do when the axis directions differ (appended to that part of the message).
            Default: suggest ``match_orientation=True`` (when it is off). Callers without that argument pass
            their own advice.

    Raises:
        InputDataError: shape, spacing, direction or origin differ beyond tolerance; the message lists each
            difference and what to do.
    """
    ref_shape, ref_aff = geometry_of(reference)
    oth_shape, oth_aff = geometry_of(other)
    if len(ref_shape) != len(oth_shape):
        raise InputDataError(
            f"{names[1]} has {len(oth_shape)} spatial dims {oth_shape}, {names[0]} has {len(ref_shape)} "
            f"{ref_shape}: they cannot be on the same grid. Check that the right files are paired."
        )
    nd = len(ref_shape)
    if match_orientation and nd == 3:
        dummy = np.zeros(oth_shape, dtype=np.uint8)
        moved, oth_aff = reorient_array(dummy, oth_aff, ref_aff)
        oth_shape = moved.shape
    problems = []
    if tuple(ref_shape) != tuple(oth_shape):
        problems.append(f"spatial shape {oth_shape} vs {ref_shape}")
    ref_sp, oth_sp = affine_spacing(ref_aff, nd), affine_spacing(oth_aff, nd)
    if not np.allclose(ref_sp, oth_sp, atol=atol, rtol=0):
        problems.append(f"spacing {np.round(oth_sp, 4).tolist()} mm vs {np.round(ref_sp, 4).tolist()} mm")
    ref_dir = ref_aff[:3, :nd] / np.where(ref_sp > 0, ref_sp, 1)
    oth_dir = oth_aff[:3, :nd] / np.where(oth_sp > 0, oth_sp, 1)
    if not np.allclose(ref_dir, oth_dir, atol=direction_atol, rtol=0):
        if orientation_hint is not None:
            hint = f" ({orientation_hint})" if orientation_hint else ""
        else:
            hint = "" if match_orientation else " (if only the axis order/flip differs, pass match_orientation=True)"
        problems.append(
            f"axis directions differ{hint}: {np.round(oth_dir, 3).tolist()} vs {np.round(ref_dir, 3).tolist()}"
        )
    shift = float(np.max(np.abs(ref_aff[:3, 3] - oth_aff[:3, 3])))
    if shift > atol:
        problems.append(
            f"origin {np.round(oth_aff[:3, 3], 3).tolist()} vs {np.round(ref_aff[:3, 3], 3).tolist()} "
            f"(off by up to {shift:.3f} mm)"
        )
    if problems:
        raise InputDataError(
            f"{names[1]} geometry does not match {names[0]}: "
            + "; ".join(problems)
            + f" (tolerance {atol} mm). The {names[1]} was probably made on another series or resampled: pair the "
            f"right files, or resample the {names[1]} onto the {names[0]} grid (monai.transforms.ResampleToMatchd, "
            "nearest mode for labels) before training."
        )


class CheckGeometry(Transform):
    """Check that ``img`` lies on the same voxel grid as ``reference`` (shape, spacing, directions, origin).

    Returns ``img`` unchanged; raises :class:`~monai_peft.errors.InputDataError` on mismatch.
    See :func:`check_geometry` for the arguments.
    """

    def __init__(self, atol: float = 1e-2, direction_atol: float = 1e-3, match_orientation: bool = False) -> None:
        self.atol = atol
        self.direction_atol = direction_atol
        self.match_orientation = match_orientation

    def __call__(self, img: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        check_geometry(
            reference,
            img,
            atol=self.atol,
            direction_atol=self.direction_atol,
            match_orientation=self.match_orientation,
            names=("reference", "image"),
        )
        return img


class CheckGeometryd(MapTransform):
    """Dictionary version of :class:`CheckGeometry`: every key must share the grid of ``reference_key``.

    Args:
        keys: keys to check, e.g. ``("image", "label")``.
        reference_key: key giving the reference grid; defaults to the first of ``keys``.
        atol, direction_atol, match_orientation: see :func:`check_geometry`.
        allow_missing_keys: skip keys that are absent (e.g. no label at inference).

    Example::

        CheckGeometryd(keys=("image", "label"))({"image": ct, "label": seg})  # raises if misaligned
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str | None = None,
        atol: float = 1e-2,
        direction_atol: float = 1e-3,
        match_orientation: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key if reference_key is not None else self.keys[0]
        self.atol = atol
        self.direction_atol = direction_atol
        self.match_orientation = match_orientation

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        if self.reference_key not in d:
            if self.allow_missing_keys:
                return d
            raise InputDataError(f"CheckGeometryd: reference key '{self.reference_key}' is not in the data.")
        for key in self.key_iterator(d):
            if key == self.reference_key:
                continue
            check_geometry(
                d[self.reference_key],
                d[key],
                atol=self.atol,
                direction_atol=self.direction_atol,
                match_orientation=self.match_orientation,
                names=(str(self.reference_key), str(key)),
            )
        return d
