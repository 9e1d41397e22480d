"""DICOM SEG reading and writing with highdicom, aligned to the source series grid.

* :func:`read_dicom_seg` turns a SEG object into a ``(1, X, Y, Z)`` label volume (segment numbers, or your label
  values) on the grid of its source series - the same grid :func:`~monai_peft.transforms.load_dicom_series`
  gives the image - checking that every SEG frame sits where its referenced slice is.
* :func:`write_dicom_seg` writes a label volume as a BINARY SEG with one segment per label value, referencing the
  source slices (SOPInstanceUIDs, FrameOfReferenceUID, study), so PACS viewers overlay it on the series.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from monai_peft.errors import DicomError, InputDataError, require
from monai_peft.transforms.dicom_io import PathLike, describe_source, header_copy, read_dicom_file, sop_uids
from monai_peft.transforms.dicom_series import DicomSeries, SeriesSource, find_dicom_series
from monai_peft.transforms.geometry import LPS_TO_RAS, check_geometry, reorient_array

__all__ = [
    "DEFAULT_SEGMENT_COLORS",
    "SEG_SOP_CLASS_UIDS",
    "SaveDicomSegd",
    "SegWriteResult",
    "read_dicom_seg",
    "write_dicom_seg",
]

SEG_SOP_CLASS_UIDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation Storage",
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
}

# distinct RGB colours (0-255) cycled over segments when none are given
DEFAULT_SEGMENT_COLORS: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
    (170, 110, 40),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 215, 180),
    (0, 0, 128),
    (128, 128, 128),
)


def _highdicom() -> Any:
    return require("highdicom", feature="DICOM SEG reading/writing", install="highdicom>=0.22")


def _as_series(source: SeriesSource | DicomSeries, series_uid: str | None) -> DicomSeries:
    if isinstance(source, DicomSeries):
        return source
    return find_dicom_series(source, series_uid)


def _read_seg_dataset(seg: PathLike | Dataset) -> Dataset:
    ds = seg if isinstance(seg, Dataset) else read_dicom_file(seg)
    sop = str(ds.get("SOPClassUID", ""))
    if sop not in SEG_SOP_CLASS_UIDS:
        raise DicomError(
            f"{describe_source(seg)} is not a DICOM SEG object (SOP class {sop or 'missing'}, modality "
            f"{ds.get('Modality', '?')}). Pass a Segmentation Storage file, or load label maps in NIfTI/NRRD with "
            "LoadVolume."
        )
    return ds


def _referenced_series_uid(ds: Dataset) -> str | None:
    refs = [str(item.get("SeriesInstanceUID", "") or "") for item in ds.get("ReferencedSeriesSequence", [])]
    return refs[0] if len(refs) == 1 and refs[0] else None


def _frame_reference(ds: Dataset, i: int) -> str | None:
    """SOPInstanceUID of the source slice a SEG frame was derived from, if recorded."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame or i >= len(per_frame):
        return None
    for deriv in per_frame[i].get("DerivationImageSequence", []):
        for src in deriv.get("SourceImageSequence", []):
            if "ReferencedSOPInstanceUID" in src:
                return str(src.ReferencedSOPInstanceUID)
    return None


def _frames_outside_series(ds: Dataset, series: DicomSeries) -> list[tuple[int, str]]:
    """``(frame index, referenced SOPInstanceUID)`` of SEG frames whose source instance is not a slice of ``series``."""
    known = set(series.sop_instance_uids)
    n = len(ds.get("PerFrameFunctionalGroupsSequence") or [])
    refs = ((i, _frame_reference(ds, i)) for i in range(n))
    return [(i, uid) for i, uid in refs if uid is not None and uid not in known]


def _group_value(group: Dataset | None, sequence: str, keyword: str) -> Any:
    if group is None:
        return None
    seq = group.get(sequence)
    return seq[0].get(keyword) if seq else None


def _seg_frame_geometry(ds: Dataset) -> list[tuple[Any, Any, Any]]:
    """``(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)`` of every SEG frame (per-frame over shared)."""
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    keys = (
        ("PlanePositionSequence", "ImagePositionPatient"),
        ("PlaneOrientationSequence", "ImageOrientationPatient"),
        ("PixelMeasuresSequence", "PixelSpacing"),
    )
    defaults = [_group_value(shared, seq, kw) for seq, kw in keys]
    out = []
    for group in ds.get("PerFrameFunctionalGroupsSequence") or []:
        values = [_group_value(group, seq, kw) for seq, kw in keys]
        out.append(tuple(v if v is not None else d for v, d in zip(values, defaults)))
    return out


def _check_frames_on_series(seg_ds: Dataset, series: DicomSeries, where: str, atol: float) -> None:
    """Every SEG frame must have the series orientation/spacing and lie on a series slice (the referenced one)."""
    iop = np.asarray(series.datasets[0].ImageOrientationPatient, float)
    pix = np.asarray(series.datasets[0].PixelSpacing, float)
    index_of = {uid: k for k, uid in enumerate(series.sop_instance_uids)}
    inv = np.linalg.inv(series.affine_lps)
    spacing = np.asarray(series.spacing)
    for i, (ipp, frame_iop, frame_pix) in enumerate(_seg_frame_geometry(seg_ds)):
        if frame_iop is not None and not np.allclose(np.asarray(frame_iop, float), iop, atol=1e-4):
            raise DicomError(f"{where}: frame {i + 1} orientation differs from the source series; not aligned.")
        if frame_pix is not None and not np.allclose(np.asarray(frame_pix, float), pix, atol=1e-4):
            raise DicomError(
                f"{where}: frame {i + 1} pixel spacing {list(frame_pix)} differs from the source series "
                f"{pix.tolist()}; the SEG was made on another grid."
            )
        if ipp is None:
            continue
        ijk = inv @ np.append(np.asarray(ipp, float), 1.0)
        ref = _frame_reference(seg_ds, i)
        k = index_of.get(ref) if ref is not None else None
        expected_k = float(k) if k is not None else float(np.rint(ijk[2]))
        off_mm = np.abs(ijk[:3] - np.array([0.0, 0.0, expected_k])) * spacing
        if np.any(off_mm > atol):
            raise DicomError(
                f"{where}: frame {i + 1} is at {np.round(np.asarray(ipp, float), 3).tolist()} mm, which is not on "
                f"the source slice it refers to (off by {np.round(off_mm, 3).tolist()} mm). The SEG does not belong "
                "to this series or was made on a different grid."
            )


def _place_volume_by_position(seg: Any, series: DicomSeries, where: str, atol: float, **kwargs: Any) -> np.ndarray:
    """Fallback when frames do not reference source instances: put each SEG volume slice at its position."""
    vol = seg.get_volume(combine_segments=True, **kwargs)
    arr = np.asarray(vol.array)  # (slices, rows, cols)
    out = np.zeros((len(series.datasets), int(series.datasets[0].Rows), int(series.datasets[0].Columns)), arr.dtype)
    if arr.shape[1:] != out.shape[1:]:
        raise DicomError(f"{where}: SEG frames are {arr.shape[1:]}, the series slices {out.shape[1:]}; not aligned.")
    inv = np.linalg.inv(series.affine_lps)
    for k in range(arr.shape[0]):
        origin = np.asarray(vol.affine, float) @ np.array([k, 0.0, 0.0, 1.0])
        ijk = inv @ origin
        z = int(np.rint(ijk[2]))
        if not 0 <= z < out.shape[0] or np.any(np.abs(ijk[:3] - [0, 0, z]) * np.asarray(series.spacing) > atol):
            raise DicomError(
                f"{where}: SEG slice at {np.round(origin[:3], 3).tolist()} mm is not on the source series grid."
            )
        out[z] = arr[k]
    return out


def read_dicom_seg(
    seg: PathLike | Dataset,
    source: SeriesSource | DicomSeries | None = None,
    *,
    series_uid: str | None = None,
    segment_numbers: Sequence[int] | None = None,
    label_values: Mapping[int, int] | None = None,
    dtype: Any = np.float32,
    atol: float = 1e-2,
    check_references: bool = True,
) -> MetaTensor:
    """Read a DICOM SEG as a label volume on its source series grid.

    Args:
        seg: SEG file or dataset.
        source: the source series (folder, files, datasets or a :class:`DicomSeries`). When given, the output is on
            exactly the grid of ``load_dicom_series(source)``; in a folder with several series the one the SEG
            references is chosen. When ``None``, the SEG's own plane positions define the grid.
        series_uid: force the source series to use.
        segment_numbers: segments to include (default: all).
        label_values: map segment number -> output value (e.g. ``SegWriteResult.segment_values`` to get the
            original label values back); default: the segment number.
        dtype: output dtype.
        atol: tolerance (mm) for SEG frames lying on source slices.
        check_references: the SEG's referenced series (``ReferencedSeriesSequence``) must be the source series and
            every frame's source instance (``SourceImageSequence``) must be one of its slices; otherwise a frame
            would silently be dropped and the label come out (partly) empty. ``False`` only for a series that was
            re-exported with new UIDs: frames are then placed by position (orientation, spacing and position are
            still checked).

    Returns:
        ``(1, X, Y, Z)`` ``MetaTensor`` (0 = background), RAS affine; overlapping segments raise.

    Raises:
        DicomError: not a SEG, another series or instances than the source, wrong frame of reference, frames off
            the source grid, overlapping segments.
    """
    hd = _highdicom()
    seg_ds = _read_seg_dataset(seg)
    where = f"DICOM SEG {describe_source(seg)}"
    hseg = hd.seg.Segmentation.from_dataset(seg_ds, copy=isinstance(seg, Dataset))  # never mutate a caller's
    ref_uid = _referenced_series_uid(seg_ds)
    if source is None:
        array, affine_lps = _seg_own_volume(hseg, where, segment_numbers)
        meta_source = str(seg) if not isinstance(seg, Dataset) else ""
    else:
        if isinstance(source, DicomSeries):
            series = source
        else:
            try:
                series = find_dicom_series(source, series_uid or ref_uid)
            except DicomError as exc:
                if series_uid is None and ref_uid is not None and "is not in" in str(exc):
                    raise DicomError(
                        f"{where} references series {ref_uid}, which is not in {source}: the SEG belongs to another "
                        "series. Pass the series it was made from."
                    ) from exc
                raise
        if check_references and ref_uid is not None and series.series_instance_uid != ref_uid:
            raise DicomError(
                f"{where} references series {ref_uid} but the image it is paired with is series "
                f"{series.series_instance_uid} ({series.source or 'in memory'}): the SEG was made on another series, "
                "and read onto this one it would give an empty label. Pair it with the series it was made from. If "
                "this series is a re-export of it with new UIDs, pass check_references=False to place the frames "
                "by position."
            )
        outside = _frames_outside_series(seg_ds, series) if check_references else []
        if outside:
            n_frames = len(seg_ds.get("PerFrameFunctionalGroupsSequence") or [])
            raise DicomError(
                f"{where}: {len(outside)} of {n_frames} frame(s) reference source instances that are not in the series "
                f"{series.series_instance_uid} ({series.source or 'in memory'}), e.g. frame {outside[0][0] + 1} -> "
                f"SOPInstanceUID {outside[0][1]}. Those frames would be dropped silently. Pair the SEG with the "
                "complete series it was made from; if this series is a re-export with new UIDs, pass "
                "check_references=False to place the frames by position."
            )
        seg_for = str(seg_ds.get("FrameOfReferenceUID", ""))
        src_for = str(series.datasets[0].get("FrameOfReferenceUID", ""))
        if seg_for and src_for and seg_for != src_for:
            raise DicomError(
                f"{where} has FrameOfReferenceUID {seg_for}, the source series {src_for}: they are not in the same "
                "patient coordinate system. Pass the series the SEG was made from."
            )
        _check_frames_on_series(seg_ds, series, where, atol)
        kwargs = {"segment_numbers": segment_numbers} if segment_numbers is not None else {}
        try:
            if check_references:
                frames = hseg.get_pixels_by_source_instance(
                    source_sop_instance_uids=series.sop_instance_uids,
                    combine_segments=True,
                    assert_missing_frames_are_empty=True,  # every referenced instance was checked to be in the series
                    ignore_spatial_locations=True,  # checked above by position
                    **kwargs,
                )
            else:
                frames = _place_volume_by_position(hseg, series, where, atol, **kwargs)
        except RuntimeError as exc:
            if "overlap" in str(exc).lower():
                raise DicomError(f"{where}: segments overlap, so they cannot form one label map ({exc}).") from exc
            frames = _place_volume_by_position(hseg, series, where, atol, **kwargs)
        except (KeyError, ValueError, AttributeError):
            frames = _place_volume_by_position(hseg, series, where, atol, **kwargs)
        array = np.asarray(frames).transpose(2, 1, 0)  # (Z, rows, cols) -> (X, Y, Z)
        affine_lps = series.affine_lps
        meta_source = series.source
    if label_values is not None:
        lut = np.arange(max(int(array.max()), *(int(k) for k in label_values)) + 1, dtype=np.int64)
        for number, value in label_values.items():
            lut[int(number)] = int(value)
        array = lut[array.astype(np.int64)]
    affine = LPS_TO_RAS @ affine_lps
    meta = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine,
        "spatial_shape": np.asarray(array.shape),
        "original_channel_dim": 0,
        "space": "RAS",
        "filename_or_obj": meta_source,
        "seg_sop_instance_uid": str(seg_ds.get("SOPInstanceUID", "")),
        "segment_labels": "\\".join(str(s.SegmentLabel) for s in seg_ds.SegmentSequence),
    }
    return MetaTensor(torch.as_tensor(np.ascontiguousarray(array[None]).astype(dtype)), meta=meta)


def _seg_own_volume(hseg: Any, where: str, segment_numbers: Sequence[int] | None) -> tuple[np.ndarray, np.ndarray]:
    kwargs = {"segment_numbers": segment_numbers} if segment_numbers is not None else {}
    try:
        vol = hseg.get_volume(combine_segments=True, **kwargs)
    except (RuntimeError, ValueError) as exc:
        raise DicomError(
            f"{where}: its frames do not form a regular 3D grid ({exc}); pass the source series to read it."
        ) from exc
    arr = np.asarray(vol.array).transpose(2, 1, 0)  # (slices, rows, cols) -> (X=cols, Y=rows, Z=slices)
    aff = np.asarray(vol.affine, float)
    affine_lps = np.eye(4)
    affine_lps[:3, 0], affine_lps[:3, 1], affine_lps[:3, 2] = aff[:3, 2], aff[:3, 1], aff[:3, 0]
    affine_lps[:3, 3] = aff[:3, 3]
    normal = np.cross(affine_lps[:3, 0], affine_lps[:3, 1])
    if arr.shape[2] > 1 and float(affine_lps[:3, 2] @ normal) < 0:  # keep slices in increasing normal order
        affine_lps[:3, 3] = affine_lps[:3, 3] + affine_lps[:3, 2] * (arr.shape[2] - 1)
        affine_lps[:3, 2] = -affine_lps[:3, 2]
        arr = arr[:, :, ::-1]
    return np.ascontiguousarray(arr), affine_lps


# patient / study attributes a SEG copies from its source (type 2: present, possibly empty)
_TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
)


def _clean_headers(datasets: Sequence[Dataset], slice_spacing: float) -> list[Dataset]:
    """Header-only copies of the source slices that highdicom accepts: SOP UIDs restored from the file meta when
    an anonymiser blanked them, an empty SpecificCharacterSet (default repertoire) removed, and missing type 2
    patient/study attributes added empty; a missing SliceThickness (needed by the SEG pixel measures) is set to
    the slice spacing."""
    out = []
    for ds in datasets:
        header = header_copy(ds)
        cls, inst = sop_uids(ds)
        if not inst:
            raise InputDataError(
                f"source slice {describe_source(ds)} has no SOPInstanceUID (not even in its file meta), so a SEG "
                "cannot reference it. Use the original (non-anonymised) series."
            )
        header.SOPClassUID, header.SOPInstanceUID = cls, inst
        if "SpecificCharacterSet" in header and not header.SpecificCharacterSet:
            del header.SpecificCharacterSet
        if not header.get("SliceThickness"):
            header.SliceThickness = round(float(slice_spacing), 6)
        for keyword in _TYPE2_COPIED:  # type 2 = must be present, may be empty; some writers omit them
            if keyword not in header:
                setattr(header, keyword, "")
        out.append(header)
    return out


class SegWriteResult(NamedTuple):
    """What :func:`write_dicom_seg` wrote: the file and the map segment number -> label value."""

    path: Path
    segment_values: dict[int, int]


def _label_array(label: Any) -> tuple[np.ndarray, np.ndarray | None]:
    affine = None
    if isinstance(label, MetaTensor):
        affine = label.affine.detach().cpu().numpy().astype(np.float64)
    arr = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if arr.ndim == 4:
        if arr.shape[0] != 1:
            raise InputDataError(
                f"label has {arr.shape[0]} channels; write_dicom_seg needs one label map (1, X, Y, Z). Use argmax "
                "over class channels first (monai AsDiscrete(argmax=True))."
            )
        arr = arr[0]
    if arr.ndim != 3:
        raise InputDataError(f"label must be (1, X, Y, Z) or (X, Y, Z), got shape {arr.shape}.")
    integral = np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool
    if not integral and (not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr))):
        raise InputDataError(
            "label holds non-integer values; a SEG stores label maps. Threshold / argmax the prediction first."
        )
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        raise InputDataError(f"label has negative values (min {arr.min()}); labels must be >= 0.")
    return arr, affine


def _names_for(values: Sequence[int], names: Mapping[int, str] | Sequence[str] | None) -> dict[int, str]:
    if names is None:
        return {v: f"label {v}" for v in values}
    if isinstance(names, Mapping):
        return {v: str(names.get(v, f"label {v}")) for v in values}
    seq = list(names)  # names[i] is the name of label value i + 1
    return {v: (seq[v - 1] if 0 < v <= len(seq) else f"label {v}") for v in values}


def write_dicom_seg(
    label: Any,
    source: SeriesSource | DicomSeries,
    output_path: PathLike,
    *,
    series_uid: str | None = None,
    segment_names: Mapping[int, str] | Sequence[str] | None = None,
    segment_colors: Mapping[int, tuple[int, int, int]] | None = None,
    segment_types: Mapping[int, Code] | None = None,
    segment_category: Code | None = None,
    series_description: str = "Segmentation",
    series_number: int = 300,
    content_label: str = "SEGMENTATION",
    algorithm_name: str = "monai_peft",
    algorithm_version: str | None = None,
    manufacturer: str = "monai_peft",
    omit_empty_frames: bool = True,
    atol: float = 1e-2,
) -> SegWriteResult:
    """Write a label volume as a BINARY DICOM SEG referencing its source series.

    Args:
        label: ``(1, X, Y, Z)`` or ``(X, Y, Z)`` integer label map on the source series grid. A ``MetaTensor`` whose
            axes were only flipped/permuted (e.g. by ``Orientationd("RAS")``) is moved back; any other grid
            difference raises (invert spacing/cropping first, e.g. with ``monai.transforms.Invertd``).
        source: the source series (folder, files, datasets or :class:`DicomSeries`); only headers are needed.
        output_path: the ``.dcm`` file to write (parent folders are created).
        series_uid: source series to use in folders with several series.
        segment_names: name per label value (mapping, or sequence where item ``i`` names value ``i + 1``).
        segment_colors: RGB (0-255) per label value; default: a fixed palette.
        segment_types: SNOMED/DCM ``Code`` of the segmented property type per label value (default: Tissue).
        segment_category: property category for all segments (default: Tissue).
        series_description, series_number, content_label: SEG series attributes.
        algorithm_name, algorithm_version, manufacturer: provenance (``AUTOMATIC`` segments).
        omit_empty_frames: skip frames without any foreground (smaller files).
        atol: tolerance (mm) for the label/series geometry check.

    Returns:
        :class:`SegWriteResult` with the file path and ``segment_values`` (segment number -> label value; label
        values are numbered 1..K in increasing order).

    Raises:
        InputDataError: label not on the series grid, empty, multi-channel or non-integer.
        DicomError: invalid source series (see :func:`~monai_peft.transforms.find_dicom_series`).
    """
    hd = _highdicom()
    from pydicom.sr.codedict import codes

    import monai_peft

    series = _as_series(source, series_uid)
    arr, affine = _label_array(label)
    if affine is not None:
        ras = series.affine
        if not np.allclose(affine, ras, atol=atol):
            moved, moved_affine = reorient_array(arr, affine, ras)
            if moved.shape == tuple(series.shape):
                arr, affine = moved, moved_affine
        fake_ref = MetaTensor(torch.zeros((1, *series.shape), dtype=torch.uint8), affine=torch.as_tensor(series.affine))
        fake_lab = MetaTensor(torch.zeros((1, *arr.shape), dtype=torch.uint8), affine=torch.as_tensor(affine))
        check_geometry(
            fake_ref,
            fake_lab,
            atol=atol,
            names=("source series", "label"),
            orientation_hint="an axis order/flip alone is undone automatically; this label is rotated against the "
            "series",
        )
    elif tuple(arr.shape) != tuple(series.shape):
        raise InputDataError(
            f"label shape {arr.shape} does not match the source series {series.shape} (Columns, Rows, slices). "
            "Resample the label to the series grid first."
        )
    first = series.datasets[0]
    if not first.get("StudyInstanceUID") or not series.series_instance_uid:
        warnings.warn(
            "the source series has an empty StudyInstanceUID/SeriesInstanceUID (anonymised?): the SEG will reference "
            "its slices by SOPInstanceUID, but a PACS may not link it to the study.",
            UserWarning,
            stacklevel=2,
        )
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not values:
        raise InputDataError("label is empty (all zeros): a DICOM SEG needs at least one segment; nothing written.")
    lut = np.zeros(max(values) + 1, dtype=np.uint16 if len(values) > 255 else np.uint8)
    for number, value in enumerate(values, start=1):
        lut[value] = number
    frames = np.ascontiguousarray(lut[arr].transpose(2, 1, 0))  # (X, Y, Z) -> (Z, rows, cols)
    names = _names_for(values, segment_names)
    version = algorithm_version or monai_peft.__version__
    algorithm = hd.AlgorithmIdentificationSequence(
        name=algorithm_name, version=version, family=codes.cid7162.ArtificialIntelligence
    )
    category = segment_category or codes.SCT.Tissue
    descriptions = []
    for number, value in enumerate(values, start=1):
        rgb = (segment_colors or {}).get(value, DEFAULT_SEGMENT_COLORS[(number - 1) % len(DEFAULT_SEGMENT_COLORS)])
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=names[value][:64],
                segmented_property_category=category,
                segmented_property_type=(segment_types or {}).get(value, codes.SCT.Tissue),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                display_color=hd.color.CIELabColor.from_rgb(*[int(c) for c in rgb]),
            )
        )
    seg = hd.seg.Segmentation(
        source_images=_clean_headers(series.datasets, series.spacing[2]),
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=series_number,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name="monai_peft",
        software_versions=version,
        device_serial_number="0",
        content_label=content_label,
        series_description=series_description,
        omit_empty_frames=omit_empty_frames,
    )
    out = Path(output_path)
    _save_atomically(seg, out)
    return SegWriteResult(out, dict(enumerate(values, start=1)))


def _save_atomically(ds: Dataset, out: Path) -> None:
    """Write ``ds`` to a temporary file in ``out``'s folder, then rename it to ``out`` (``os.replace``).

    A write that fails (disk full, file-size limit) or is killed leaves no partial file under the final name, and an
    existing ``out`` stays intact until the new file is complete.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        ds.save_as(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class SaveDicomSegd(MapTransform):
    """Write ``d[key]`` (a label map on the source series grid) as a DICOM SEG next to other outputs.

    The source series is ``d[source_key].meta["filename_or_obj"]`` (the folder :class:`LoadDicomSeriesd` /
    :class:`LoadVolumed` loaded) and its ``series_instance_uid``. The file is
    ``output_dir/<SeriesInstanceUID>_<output_postfix>.dcm``; its path is stored in ``d[key].meta["saved_to"]``.

    Args:
        keys: label keys to save.
        output_dir: folder for the SEG files.
        source_key: key of the loaded source image.
        output_postfix: file name postfix.
        allow_missing_keys: skip absent keys.
        seg_kwargs: passed to :func:`write_dicom_seg` (names, colours, codes ...).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: PathLike,
        source_key: str = "image",
        output_postfix: str = "seg",
        allow_missing_keys: bool = False,
        **seg_kwargs: Any,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.source_key = source_key
        self.output_postfix = output_postfix
        self.seg_kwargs = seg_kwargs

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        src = d.get(self.source_key)
        meta = getattr(src, "meta", {}) if src is not None else {}
        folder = meta.get("filename_or_obj") or (src if isinstance(src, (str, os.PathLike)) else None)
        if not folder:
            raise InputDataError(
                f"SaveDicomSegd needs the source series: d['{self.source_key}'] must be a DICOM series loaded with "
                "LoadDicomSeriesd/LoadVolumed (its meta 'filename_or_obj' names the folder) or the folder path."
            )
        uid = meta.get("series_instance_uid") or None
        for key in self.key_iterator(d):
            name = f"{uid or Path(str(folder)).name}_{self.output_postfix}.dcm"
            result = write_dicom_seg(d[key], folder, self.output_dir / name, series_uid=uid, **self.seg_kwargs)
            if isinstance(d[key], MetaTensor):
                d[key].meta["saved_to"] = str(result.path)
        return d
