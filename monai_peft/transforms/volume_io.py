"""One loader for 3D images and labels whatever their format: NIfTI, NRRD, DICOM series folder or DICOM SEG.

``LoadVolume("ct/")``, ``LoadVolume("ct.nii.gz")``, ``LoadVolume("liver.nrrd")`` and
``LoadVolume("liver_seg.dcm", reference=ct)`` all return a channel-first ``(1, X, Y, Z)`` ``MetaTensor`` with a
RAS affine, so image and label can be checked against each other (:class:`CheckGeometryd`) and then go through
the same MONAI spatial transforms.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_io import PathLike, is_dicom_file, read_dicom_file
from monai_peft.transforms.dicom_seg import SEG_SOP_CLASS_UIDS, read_dicom_seg
from monai_peft.transforms.dicom_series import DicomSeries, load_dicom_series

__all__ = ["LoadVolume", "LoadVolumed", "load_volume", "volume_format"]

_NIFTI = (".nii", ".nii.gz")
_NRRD = (".nrrd", ".nhdr")


def volume_format(path: PathLike) -> str:
    """``"dicom_series"``, ``"dicom_seg"``, ``"dicom"`` (single file), ``"nifti"``, ``"nrrd"`` or ``"other"``."""
    p = Path(path)
    if p.is_dir():
        return "dicom_series"
    name = p.name.lower()
    if name.endswith(_NIFTI):
        return "nifti"
    if name.endswith(_NRRD):
        return "nrrd"
    if p.is_file() and is_dicom_file(p):
        header = read_dicom_file(p, stop_before_pixels=True)
        return "dicom_seg" if str(header.get("SOPClassUID", "")) in SEG_SOP_CLASS_UIDS else "dicom"
    return "other"


def _reference_source(reference: Any) -> tuple[Any, str | None]:
    """(series source, series uid) from a loaded image, a folder path or a DicomSeries."""
    if reference is None or isinstance(reference, DicomSeries):
        return reference, None
    if isinstance(reference, MetaTensor):
        folder = reference.meta.get("filename_or_obj")
        uid = reference.meta.get("series_instance_uid") or None
        if not folder or not Path(str(folder)).exists():
            raise InputDataError(
                "the reference image has no source path in its meta ('filename_or_obj'); load it with "
                "LoadVolume / load_dicom_series so a DICOM SEG can be aligned to it."
            )
        return str(folder), uid
    if isinstance(reference, (str, os.PathLike)):
        return reference, None
    return reference, None  # list of files / datasets


def _has_pynrrd() -> bool:
    """pynrrd gives MONAI's fast NrrdReader; without it NRRD goes through ITKReader (itk-io)."""
    return importlib.util.find_spec("nrrd") is not None


def _precheck(path: Path, kind: str) -> None:
    """Read the header of NIfTI / NRRD files so that a broken file fails fast with a clear message (MONAI's
    LoadImage would otherwise try every other reader first)."""
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            _ = img.dataobj.shape  # header parsed
        elif kind == "nrrd" and _has_pynrrd():
            import nrrd

            nrrd.read_header(str(path))
    except Exception as exc:  # nibabel / pynrrd raise many types for corrupt files
        raise InputDataError(
            f"'{path}' could not be read as a {kind} file ({type(exc).__name__}: {exc}). Check that it is complete "
            "(re-copy it) and really in that format."
        ) from exc


def load_volume(
    path: PathLike,
    *,
    reference: Any = None,
    series_uid: str | None = None,
    dtype: Any = np.float32,
) -> MetaTensor:
    """Load a 3D image or label to a ``(1, X, Y, Z)`` ``MetaTensor`` with a RAS affine.

    Args:
        path: NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``), a DICOM series folder, a single DICOM slice,
            a DICOM SEG file, or any format MONAI's ``LoadImage`` reads (``.mha`` ...).
        reference: for a DICOM SEG, the source series to align to: the loaded image ``MetaTensor`` (from this
            function), its folder, or a :class:`DicomSeries`. Without it the SEG's own geometry is used.
        series_uid: SeriesInstanceUID to use in a folder that holds several series.
        dtype: output dtype.

    Raises:
        InputDataError: the path does not exist or cannot be read by any reader.
        DicomError / MissingDependencyError: see :func:`load_dicom_series` and :func:`read_dicom_seg`.
    """
    p = Path(path)
    if not p.exists():
        raise InputDataError(f"'{p}' does not exist. Check the path (real data lives outside the repository).")
    kind = volume_format(p)
    if kind == "dicom_series":
        return load_dicom_series(p, series_uid, dtype=dtype)
    if kind == "dicom_seg":
        source, ref_uid = _reference_source(reference)
        return read_dicom_seg(p, source, series_uid=series_uid or ref_uid, dtype=dtype)
    if kind == "dicom":
        return load_dicom_series([p], series_uid, dtype=dtype)
    _precheck(p, kind)
    reader = {"nifti": "NibabelReader", "nrrd": "NrrdReader" if _has_pynrrd() else "ITKReader"}.get(kind)
    loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=dtype)
    try:
        img = loader(str(p))
    except (RuntimeError, OSError, ValueError) as exc:
        raise InputDataError(
            f"'{p}' could not be read as a {kind if kind != 'other' else 'medical image'} file ({exc}). Check that "
            "it is complete and in a supported format (NIfTI, NRRD, DICOM, MetaImage)."
        ) from exc
    if img.ndim != 4:
        raise InputDataError(
            f"'{p}' loads to shape {tuple(img.shape)}, not a single-channel 3D volume (1, X, Y, Z). 2D images go "
            "through LoadChestXray / read_dicom_image; 4D series must be split first."
        )
    img.meta["original_channel_dim"] = 0
    return img


class LoadVolume(Transform):
    """Array transform version of :func:`load_volume`: ``LoadVolume()(path, reference=None)``."""

    def __init__(self, series_uid: str | None = None, dtype: Any = np.float32) -> None:
        self.series_uid = series_uid
        self.dtype = dtype

    def __call__(self, path: PathLike, reference: Any = None) -> MetaTensor:
        return load_volume(path, reference=reference, series_uid=self.series_uid, dtype=self.dtype)


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume`.

    Args:
        keys: keys holding paths, e.g. ``("image", "label")``; loaded in this order.
        reference_key: key of the image a DICOM SEG label is aligned to (loaded first if it is in ``keys``).
        series_uid: SeriesInstanceUID for folders with several series; a data item's ``series_uid`` entry wins.
        dtype: output dtype, one for all keys or one per key.
        allow_missing_keys: skip absent keys (e.g. no label at inference).

    Example::

        LoadVolumed(keys=("image", "label"), reference_key="image")(
            {"image": "ct_3slice/", "label": "liver_seg.dcm"})
    """

    def __init__(
        self,
        keys: KeysCollection,
        reference_key: str | None = "image",
        series_uid: str | None = None,
        dtype: Any | Sequence[Any] = np.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key
        self.series_uid = series_uid
        self.dtype = dtype if isinstance(dtype, (list, tuple)) else [dtype] * len(self.keys)
        if len(self.dtype) != len(self.keys):
            raise InputDataError(f"LoadVolumed: {len(self.dtype)} dtypes given for {len(self.keys)} keys.")

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        uid = d.get("series_uid", self.series_uid)
        for key, dtype in self.key_iterator(d, self.dtype):
            reference = None
            if self.reference_key is not None and key != self.reference_key:
                reference = d.get(self.reference_key)
            d[key] = load_volume(d[key], reference=reference, series_uid=uid, dtype=dtype)
        return d
