"""One loader for 3D images and labels whatever their format: NIfTI, NRRD, DICOM series folder or DICOM SEG.

``LoadVolume("ct/")``, ``LoadVolume("ct.nii.gz")``, ``LoadVolume("liver.nrrd")`` and
``LoadVolume("liver_seg.dcm", reference=ct)`` all return a channel-first ``(1, X, Y, Z)`` ``MetaTensor`` with a
RAS affine, so image and label can be checked against each other (:class:`CheckGeometryd`) and then go through
the same MONAI spatial transforms.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImage, MapTransform, Transform

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_io import PathLike, is_dicom_file, read_dicom_file
from monai_peft.transforms.dicom_seg import SEG_SOP_CLASS_UIDS, read_dicom_seg
from monai_peft.transforms.dicom_series import DicomSeries, load_dicom_series
from monai_peft.transforms.geometry import check_geometry

__all__ = ["LoadVolume", "LoadVolumed", "load_volume", "volume_format"]

#: what :func:`load_volume` accepts: one path, a sequence of paths (channels), or ``{modality: path}``.
VolumeSource = PathLike | Sequence[PathLike] | Mapping[str, PathLike]

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
        # a SEG is checked against the very series the image came from: its SeriesInstanceUID and the
        # SOPInstanceUIDs of its slices (meta written by load_dicom_series), not just the folder
        from monai_peft.errors import DicomError
        from monai_peft.transforms.dicom_series import find_dicom_series

        folder = reference.meta.get("filename_or_obj")
        uid = reference.meta.get("series_instance_uid") or None
        if not folder or not Path(str(folder)).exists():
            raise InputDataError(
                "the reference image has no source path in its meta ('filename_or_obj'); load it with "
                "LoadVolume / load_dicom_series so a DICOM SEG can be aligned to it."
            )
        if uid is None:
            raise DicomError(
                f"a DICOM SEG label is paired with '{folder}', which is not a DICOM series (its meta has no "
                "SeriesInstanceUID), so the series and instances the SEG references cannot be checked against it. "
                "Load the image from the DICOM series the SEG was made from, or use a NIfTI/NRRD label on the "
                "image grid."
            )
        series = find_dicom_series(str(folder), str(uid))
        sops = reference.meta.get("sop_instance_uids")
        if isinstance(sops, str) and sops and sops.split("\\") != series.sop_instance_uids:
            raise DicomError(
                f"the slices in '{folder}' (series {uid}) are not the ones the image was loaded from (their "
                "SOPInstanceUIDs differ): the folder changed since. Reload the image, then pair the SEG with it."
            )
        return series, str(uid)
    if isinstance(reference, (str, os.PathLike)):
        return reference, None
    return reference, None  # list of files / datasets


def _has_pynrrd() -> bool:
    """pynrrd gives MONAI's fast NrrdReader; without it NRRD goes through ITKReader (itk-io)."""
    return importlib.util.find_spec("nrrd") is not None


def _truncation_message(path: Path, exc: BaseException) -> str | None:
    """The message for a file whose (compressed) data ends too early, or ``None`` for other read errors.

    gzip raises ``EOFError`` ("Compressed file ended before the end-of-stream marker") when a ``.nii.gz`` stops
    mid-stream (a killed or failed write), ``zlib.error`` / ``gzip.BadGzipFile`` when its bytes are damaged;
    nibabel raises ``OSError`` / ``ValueError`` mentioning the missing bytes for a short uncompressed ``.nii``.
    """
    chain: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(chain) < 8:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    size = path.stat().st_size if path.is_file() else 0
    for err in chain:
        text = str(err).lower()
        if "not a gzipped file" in text:
            return (
                f"'{path}' could not be read: its name ends in .gz but it is not gzip-compressed ({err}). Check that "
                "it is really a compressed NIfTI / NRRD (re-copy or re-export it), or rename it."
            )
        if isinstance(err, EOFError) or "ended before" in text or "truncat" in text:
            return (
                f"'{path}' is truncated: its compressed data ends before the image is complete ({size} bytes on disk; "
                f"{type(err).__name__}: {err}). The file was cut off by a failed or interrupted write or copy: "
                "re-copy or re-export it."
            )
        if isinstance(err, (zlib.error, gzip.BadGzipFile)) or "crc check" in text:
            return (
                f"'{path}' is corrupt: its compressed data cannot be decompressed ({type(err).__name__}: {err}). "
                "Re-copy or re-export the file."
            )
    return None


def _check_nifti_size(path: Path, img: Any) -> None:
    """An uncompressed ``.nii`` must hold ``vox_offset + prod(shape) * itemsize`` bytes; refuse a short one."""
    if path.name.lower().endswith(".gz"):
        return  # the uncompressed size is only known after decompressing: the read itself reports truncation
    header = img.header
    offset = int(getattr(img.dataobj, "offset", 0) or header.get_data_offset())  # vox_offset 0 means 352 here
    needed = offset + int(np.prod(header.get_data_shape())) * header.get_data_dtype().itemsize
    size = path.stat().st_size
    if size < needed:
        raise InputDataError(
            f"'{path}' is truncated: the header describes {needed} bytes of image data and header but the file has "
            f"{size} bytes. It was cut off by a failed or interrupted write or copy: re-copy or re-export it."
        )


def _verify_gzip(path: Path) -> None:
    """Decompress a ``.gz`` file once to its end, so that gzip checks its length and CRC-32 trailer.

    nibabel reads only the bytes the image needs and stops before the trailer, so damaged compressed data can
    decode to wrong voxel values without any error; a stream that ends early raises ``EOFError``. Costs one extra
    decompression (about 0.16 s for a 35 MB BraTS volume); pass ``verify=False`` to skip it.
    """
    try:
        with gzip.open(path, "rb") as fh:
            while fh.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        message = _truncation_message(path, exc)
        raise InputDataError(
            message
            or f"'{path}' could not be decompressed ({type(exc).__name__}: {exc}). Re-copy or re-export the file."
        ) from exc


def _precheck(path: Path, kind: str, verify: bool = True) -> None:
    """Read the header of NIfTI / NRRD files so that a broken file fails fast with a clear message (MONAI's
    LoadImage would otherwise try every other reader first); with ``verify``, also check a gzip file's integrity
    (see :func:`_verify_gzip`)."""
    if verify and path.name.lower().endswith(".gz") and path.is_file():
        _verify_gzip(path)
    try:
        if kind == "nifti":
            import nibabel as nib

            img = nib.load(str(path))
            _ = img.dataobj.shape  # header parsed
            if isinstance(img, nib.Nifti1Image) and path.name.lower().endswith(".nii"):  # Nifti2Image included
                _check_nifti_size(path, img)
        elif kind == "nrrd" and _has_pynrrd():
            import nrrd

            nrrd.read_header(str(path))
    except InputDataError:
        raise
    except Exception as exc:  # nibabel / pynrrd raise many types for corrupt files
        truncated = _truncation_message(path, exc)
        if truncated:
            raise InputDataError(truncated) from exc
        raise InputDataError(
            f"'{path}' could not be read as a {kind} file ({type(exc).__name__}: {exc}). Check that it is complete "
            "(re-copy it) and really in that format."
        ) from exc


def _load_single(
    path: PathLike,
    *,
    reference: Any = None,
    series_uid: str | None = None,
    dtype: Any = np.float32,
    verify: bool = True,
) -> MetaTensor:
    """Load one 3D image or label to a ``(1, X, Y, Z)`` ``MetaTensor`` with a RAS affine (see :func:`load_volume`).

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
    _precheck(p, kind, verify)
    reader = {"nifti": "NibabelReader", "nrrd": "NrrdReader" if _has_pynrrd() else "ITKReader"}.get(kind)
    loader = LoadImage(reader=reader, image_only=True, ensure_channel_first=True, dtype=dtype)
    try:
        img = loader(str(p))
    except (RuntimeError, OSError, ValueError, EOFError, zlib.error) as exc:
        truncated = _truncation_message(p, exc)
        if truncated:
            raise InputDataError(truncated) from exc
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


def _is_multi(path: Any) -> bool:
    """True for a list/tuple/mapping of paths (several modalities), False for one path."""
    return isinstance(path, (Mapping, list, tuple))


def _modality_name(path: PathLike) -> str:
    """Channel name from a file name: ``Flair_subtrMeanDivStd.nii.gz`` -> ``Flair_subtrMeanDivStd``."""
    name = Path(path).name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def load_volume(
    path: VolumeSource,
    *,
    reference: Any = None,
    series_uid: str | None = None,
    dtype: Any = np.float32,
    modalities: Sequence[str] | None = None,
    atol: float = 1e-2,
    verify: bool = True,
) -> MetaTensor:
    """Load a 3D image or label, or several co-registered modalities, to a ``(C, X, Y, Z)`` ``MetaTensor``.

    One path gives ``C = 1``. A list of paths (``[flair, t1c]``) or a mapping ``{"flair": path, "t1c": path}``
    gives one channel per file, in that order, after checking that every file lies on the grid of the first
    (shape, spacing, directions, origin within ``atol`` mm): multi-modal MR such as BraTS. The affine and meta
    come from the first file; ``meta["filename_or_obj"]`` is the first file, ``meta["channel_files"]`` lists all
    files and ``meta["modalities"]`` the channel names (the mapping's keys, ``modalities=``, or the file stems).

    Args:
        path: NIfTI (``.nii``/``.nii.gz``), NRRD (``.nrrd``/``.nhdr``), a DICOM series folder, a single DICOM slice,
            a DICOM SEG file, or any format MONAI's ``LoadImage`` reads (``.mha`` ...); or a sequence / mapping of
            those (one channel each).
        reference: for a DICOM SEG, the source series to align to: the loaded image ``MetaTensor`` (from this
            function), its folder, or a :class:`DicomSeries`. Without it the SEG's own geometry is used.
        series_uid: SeriesInstanceUID to use in a folder that holds several series.
        dtype: output dtype.
        modalities: channel names for a sequence of paths (default: the file names without suffix).
        atol: tolerance in mm of the geometry check between channels.
        verify: decompress a ``.nii.gz`` / ``.nrrd.gz`` once to its end to check its length and CRC-32 (nibabel
            stops before the trailer, so damaged data could otherwise load as wrong voxels); ``False`` skips it.

    Returns:
        ``MetaTensor`` of shape ``(C, X, Y, Z)`` with a voxel-to-RAS ``affine``.

    Raises:
        InputDataError: a path does not exist, cannot be read (the message names the file and says when it is
            truncated), or a channel's geometry differs from the first file's (the message names both files).
        DicomError / MissingDependencyError: see :func:`load_dicom_series` and :func:`read_dicom_seg`.
    """
    if not _is_multi(path):
        if modalities is not None:
            raise InputDataError("modalities= names the channels of several files; pass a list of paths with it.")
        return _load_single(path, reference=reference, series_uid=series_uid, dtype=dtype, verify=verify)
    if isinstance(path, Mapping):
        if modalities is not None:
            raise InputDataError("a {modality: path} mapping already names the channels; do not pass modalities=.")
        names, files = [str(k) for k in path], list(path.values())
    else:
        files = list(path)
        names = [_modality_name(f) for f in files] if modalities is None else [str(m) for m in modalities]
    if not files:
        raise InputDataError("load_volume got an empty list of files: give at least one path.")
    if len(names) != len(files):
        raise InputDataError(f"{len(names)} modality names for {len(files)} files: give one name per file.")
    for f in files:
        if _is_multi(f):
            raise InputDataError(f"nested list of files {f!r}: give one flat list of paths, one per channel.")
    channels = [_load_single(f, reference=reference, series_uid=series_uid, dtype=dtype, verify=verify) for f in files]
    first = channels[0]
    for f, img in zip(files[1:], channels[1:]):
        try:
            check_geometry(first, img, atol=atol, names=(f"'{files[0]}'", f"'{f}'"))
        except InputDataError as exc:
            raise InputDataError(
                f"modality '{f}' is not on the grid of '{files[0]}', so they cannot be stacked as channels: {exc} "
                "Register/resample the modalities to one grid first (BraTS files already are)."
            ) from None
    stacked = torch.cat([c.as_tensor() for c in channels], dim=0)
    meta = {k: v for k, v in first.meta.items() if k != "affine"}
    out = MetaTensor(stacked, affine=first.affine.clone(), meta=meta)
    out.meta["filename_or_obj"] = str(files[0])
    out.meta["channel_files"] = [str(f) for f in files]
    out.meta["modalities"] = names
    out.meta["original_channel_dim"] = 0
    return out


class LoadVolume(Transform):
    """Array transform version of :func:`load_volume`: ``LoadVolume()(path, reference=None)``; ``path`` may be a
    list of files (one channel each)."""

    def __init__(self, series_uid: str | None = None, dtype: Any = np.float32, verify: bool = True) -> None:
        self.series_uid = series_uid
        self.dtype = dtype
        self.verify = verify

    def __call__(self, path: VolumeSource, reference: Any = None) -> MetaTensor:
        return load_volume(path, reference=reference, series_uid=self.series_uid, dtype=self.dtype, verify=self.verify)


class LoadVolumed(MapTransform):
    """Dictionary version of :class:`LoadVolume`.

    Args:
        keys: keys holding paths, e.g. ``("image", "label")``; loaded in this order. A key may hold a list of
            paths (or a ``{modality: path}`` mapping): one channel per file, geometries checked
            (see :func:`load_volume`), e.g. ``{"image": [flair, t1c], "label": seg}`` gives a ``(2, X, Y, Z)`` image.
        reference_key: key of the image a DICOM SEG label is aligned to (loaded first if it is in ``keys``).
        series_uid: SeriesInstanceUID for folders with several series; a data item's ``series_uid`` entry wins.
        dtype: output dtype, one for all keys or one per key.
        verify: check the integrity of gzip-compressed files (see :func:`load_volume`).
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
        verify: bool = True,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.verify = verify
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
            d[key] = load_volume(d[key], reference=reference, series_uid=uid, dtype=dtype, verify=self.verify)
        return d
