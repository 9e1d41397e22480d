"""A folder (or list) of single-frame DICOM slices to a 3D volume with validated geometry.

Output layout follows MONAI/ITK: ``(1, X, Y, Z)`` where ``X`` runs along a row (Columns), ``Y`` down a column
(Rows) and ``Z`` along the slice normal ``row_cosine x column_cosine`` in increasing order; the affine is RAS.
This is the same array and affine MONAI's ``ITKReader`` produces, so labels saved from either line up.

Checks done before any pixel is decoded, each failing with a :class:`~monai_peft.errors.DicomError` that says
what is wrong and what to do:

* empty folder, or no DICOM file in it;
* several series in the folder (names their SeriesInstanceUIDs; choose one with ``series_uid=``);
* slices without ImagePositionPatient / ImageOrientationPatient, mixed orientations, sizes or pixel spacings;
* two slices at the same position (mixed acquisitions / echoes / time points);
* slices not stacked along the normal (gantry tilt);
* a missing slice (gap in positions) or inconsistent slice spacing.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from pydicom.dataset import Dataset

from monai_peft.errors import DicomError
from monai_peft.transforms.dicom_io import (
    PathLike,
    decode_pixels,
    describe_source,
    is_dicom_file,
    read_dicom_file,
    sop_uids,
)
from monai_peft.transforms.geometry import LPS_TO_RAS
from monai_peft.transforms.pydicom_compat import apply_modality_lut

__all__ = [
    "DicomSeries",
    "LoadDicomSeries",
    "LoadDicomSeriesd",
    "MissingSliceWarning",
    "find_dicom_series",
    "load_dicom_multiframe",
    "load_dicom_series",
    "scan_dicom_folder",
]

logger = logging.getLogger(__name__)

SeriesSource = PathLike | Sequence[PathLike] | Sequence[Dataset]


class MissingSliceWarning(UserWarning):
    """The header says the series has more slices than were found (a slice at one end of the stack is missing,
    which slice positions alone cannot reveal)."""


@dataclass
class DicomSeries:
    """One validated series, slices sorted along the normal (headers only until :meth:`load` is called).

    Attributes:
        series_instance_uid: the series UID.
        datasets: slice datasets (headers, or full datasets if given in memory), sorted by position.
        paths: file of each slice (``None`` for in-memory datasets).
        affine_lps: 4x4 voxel (x=column, y=row, z=slice) to LPS mm.
        spacing: ``(column spacing, row spacing, slice spacing)`` in mm.
        shape: ``(X, Y, Z)`` = ``(Columns, Rows, number of slices)``.
    """

    series_instance_uid: str
    datasets: list[Dataset]
    paths: list[Path | None]
    affine_lps: np.ndarray
    spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    source: str = ""
    skipped_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def affine(self) -> np.ndarray:
        """4x4 voxel-to-RAS affine (MONAI / NIfTI convention)."""
        return LPS_TO_RAS @ self.affine_lps

    @property
    def sop_instance_uids(self) -> list[str]:
        """SOPInstanceUIDs of the slices, in volume (z) order."""
        return [sop_uids(ds)[1] for ds in self.datasets]

    def _full_dataset(self, i: int) -> Dataset:
        path = self.paths[i]
        if path is None:
            return self.datasets[i]
        return read_dicom_file(path)

    def load_array(self, rescale: bool = True, dtype: Any = np.float32) -> np.ndarray:
        """Decode every slice and return the ``(X, Y, Z)`` array (modality LUT / rescale applied if ``rescale``)."""
        rows, cols = int(self.datasets[0].Rows), int(self.datasets[0].Columns)
        out = np.empty((cols, rows, len(self.datasets)), dtype=dtype)
        for k in range(len(self.datasets)):
            ds = self._full_dataset(k)
            where = describe_source(self.paths[k] if self.paths[k] is not None else ds)
            if int(ds.get("SamplesPerPixel", 1)) != 1:
                raise DicomError(
                    f"{where} is a colour image (SamplesPerPixel={ds.SamplesPerPixel}); a volume needs grayscale "
                    "slices. Use read_dicom_image for colour images."
                )
            pixels = decode_pixels(ds, self.paths[k] if self.paths[k] is not None else ds)
            if pixels.shape != (rows, cols):
                raise DicomError(
                    f"{where} decodes to shape {pixels.shape}, expected ({rows}, {cols}) from its header: the "
                    "file is corrupt or multi-frame. Re-export the series."
                )
            values = apply_modality_lut(pixels, ds) if rescale else pixels
            out[:, :, k] = np.asarray(values).T
        return out

    def load(self, rescale: bool = True, dtype: Any = np.float32) -> MetaTensor:
        """Decode the pixels to a ``(1, X, Y, Z)`` ``MetaTensor`` with RAS affine and series metadata."""
        array = self.load_array(rescale=rescale, dtype=dtype)
        first = self.datasets[0]
        meta = {
            "affine": torch.as_tensor(self.affine, dtype=torch.float64),
            "original_affine": self.affine,
            "spatial_shape": np.asarray(self.shape),
            "spacing": np.asarray(self.spacing),
            "original_channel_dim": 0,
            "space": "RAS",
            "filename_or_obj": self.source,
            "series_instance_uid": self.series_instance_uid,
            # one string (DICOM multi-value style) so that batches of series with different lengths collate
            "sop_instance_uids": "\\".join(self.sop_instance_uids),
            "study_instance_uid": str(first.get("StudyInstanceUID", "")),
            "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
            "modality": str(first.get("Modality", "")),
            "series_description": str(first.get("SeriesDescription", "")),
            "warnings": "; ".join(self.warnings),
        }
        return MetaTensor(torch.from_numpy(array[None]), meta=meta)


def scan_dicom_folder(
    folder: PathLike, *, recursive: bool = False, force: bool = False
) -> tuple[dict[str, list[tuple[Path, Dataset]]], list[Path]]:
    """Read the headers of every DICOM file in ``folder`` and group them by SeriesInstanceUID.

    Args:
        folder: the folder.
        recursive: also look into sub-folders.
        force: also try files without the ``DICM`` preamble (skipped when they fail to parse).

    Returns:
        ``({series_uid: [(path, header), ...]}, skipped_non_dicom_files)``.

    Raises:
        DicomError: the folder does not exist, is empty, or holds no DICOM file; a DICOM file is truncated.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomError(f"DICOM series folder '{folder}' does not exist or is not a folder. Check the path.")
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    if not files:
        raise DicomError(
            f"DICOM series folder '{folder}' is empty: no file to read. Point at the folder that holds the slices"
            + ("" if recursive else " (or pass recursive=True if they are in sub-folders)")
            + "."
        )
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped: list[Path] = []
    for path in files:
        if path.name.upper() == "DICOMDIR":
            skipped.append(path)
            continue
        if not is_dicom_file(path):
            if not force:
                skipped.append(path)
                continue
            try:
                header = read_dicom_file(path, stop_before_pixels=True, force=True)
            except DicomError:
                skipped.append(path)
                continue
        else:
            header = read_dicom_file(path, stop_before_pixels=True)
        uid = str(header.get("SeriesInstanceUID", "") or "")
        groups.setdefault(uid, []).append((path, header))
    if not groups:
        examples = ", ".join(p.name for p in skipped[:3])
        raise DicomError(
            f"Folder '{folder}' holds {len(skipped)} file(s) but none is DICOM (e.g. {examples}). Point at the "
            "folder with the .dcm slices, or pass force=True for preamble-less DICOM files."
        )
    if skipped:
        logger.info("skipped %d non-DICOM file(s) in %s, e.g. %s", len(skipped), folder, skipped[0].name)
    return groups, skipped


def _describe_series(uid: str, members: Sequence[tuple[Path | None, Dataset]]) -> str:
    ds = members[0][1]
    desc = str(ds.get("SeriesDescription", "")).strip()
    number = ds.get("SeriesNumber", "")
    bits = [str(ds.get("Modality", "?"))]
    if number not in ("", None):
        bits.append(f"series number {number}")
    if desc:
        bits.append(f"'{desc}'")
    bits.append(f"{len(members)} file(s)")
    return f"{uid or '(empty SeriesInstanceUID)'} ({', '.join(bits)})"


def _select_series(
    groups: Mapping[str, list[tuple[Path | None, Dataset]]], series_uid: str | None, where: str
) -> tuple[str, list[tuple[Path | None, Dataset]]]:
    listing = "\n".join(f"  - {_describe_series(uid, m)}" for uid, m in groups.items())
    if series_uid is not None:
        if series_uid not in groups:
            raise DicomError(
                f"Series {series_uid} is not in {where}. Available series:\n{listing}\nPass one of these as series_uid=."
            )
        return series_uid, list(groups[series_uid])
    if len(groups) > 1:
        raise DicomError(
            f"{where} holds {len(groups)} DICOM series; a volume needs exactly one. Choose it with "
            f"series_uid='<SeriesInstanceUID>' (or move the series into separate folders):\n{listing}"
        )
    uid = next(iter(groups))
    return uid, list(groups[uid])


def _slice_name(path: Path | None, ds: Dataset) -> str:
    inst = ds.get("InstanceNumber", None)
    name = path.name if path is not None else f"SOPInstanceUID {ds.get('SOPInstanceUID', '?')}"
    return f"{name} (InstanceNumber {inst})" if inst is not None else name


def _geometry(
    members: list[tuple[Path | None, Dataset]], where: str, spacing_tolerance: float
) -> tuple[list[tuple[Path | None, Dataset]], np.ndarray, tuple[float, float, float]]:
    """Validate slice geometry; return members sorted along the normal, the LPS affine and the spacing."""
    for path, ds in members:
        if int(ds.get("NumberOfFrames", 1) or 1) > 1:
            raise DicomError(
                f"{_slice_name(path, ds)} in {where} is a multi-frame object ({ds.NumberOfFrames} frames) among "
                "other files; a series is made of single-frame slices. Load the multi-frame file on its own as a 3D "
                "volume (load_volume('<file>') or load_dicom_multiframe), or read its frames with read_dicom_image."
            )
        missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing") if not ds.get(k)]
        if missing:
            raise DicomError(
                f"{_slice_name(path, ds)} in {where} lacks {', '.join(missing)}: it is not a cross-sectional "
                "slice (e.g. a localizer, screenshot or radiograph), so no 3D geometry can be built. Remove it "
                "from the series, or read it alone with read_dicom_image."
            )
    ref_path, ref = members[0]
    iop = np.asarray(ref.ImageOrientationPatient, dtype=np.float64)
    rows, cols = int(ref.Rows), int(ref.Columns)
    pix = np.asarray(ref.PixelSpacing, dtype=np.float64)
    for path, ds in members[1:]:
        if not np.allclose(np.asarray(ds.ImageOrientationPatient, float), iop, atol=1e-4):
            raise DicomError(
                f"{where}: {_slice_name(path, ds)} has ImageOrientationPatient {list(ds.ImageOrientationPatient)} "
                f"but {_slice_name(ref_path, ref)} has {iop.tolist()}: the series mixes orientations (e.g. a "
                "localizer or a reformat). Keep only the slices of one stack."
            )
        if (int(ds.Rows), int(ds.Columns)) != (rows, cols):
            raise DicomError(
                f"{where}: {_slice_name(path, ds)} is {ds.Rows}x{ds.Columns} but {_slice_name(ref_path, ref)} is "
                f"{rows}x{cols}: slices of one volume must have the same size. Keep only the slices of one stack."
            )
        if not np.allclose(np.asarray(ds.PixelSpacing, float), pix, atol=1e-4):
            raise DicomError(
                f"{where}: {_slice_name(path, ds)} has PixelSpacing {list(ds.PixelSpacing)} but "
                f"{_slice_name(ref_path, ref)} has {pix.tolist()}: mixed pixel spacings in one series."
            )
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    positions = np.asarray([np.asarray(ds.ImagePositionPatient, np.float64) for _, ds in members])
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    members = [members[i] for i in order]
    positions, proj = positions[order], proj[order]
    n = len(members)
    if n > 1:
        steps = np.diff(proj)
        dup = np.flatnonzero(steps < 1e-3)
        if dup.size:
            i = int(dup[0])
            raise DicomError(
                f"{where}: {_slice_name(*members[i])} and {_slice_name(*members[i + 1])} are at the same position "
                f"({np.round(positions[i], 3).tolist()} mm); {dup.size} duplicate position(s) in total. The series "
                "mixes several acquisitions, echoes or time points (4D). Split it (e.g. by AcquisitionNumber, "
                "EchoNumbers or TemporalPositionIdentifier) and load one stack by passing its files."
            )
        offsets = positions - positions[0]
        in_plane = offsets - np.outer(offsets @ normal, normal)
        tilt = float(np.max(np.linalg.norm(in_plane, axis=1)))
        if tilt > max(1e-2, 0.01 * float(np.median(steps))):
            angle = float(np.degrees(np.arctan2(tilt, proj[-1] - proj[0])))
            raise DicomError(
                f"{where}: slices are not stacked along their normal (in-plane drift up to {tilt:.2f} mm, about "
                f"{angle:.1f} degrees): a gantry-tilted or sheared acquisition. It cannot be stored as a plain grid "
                "without resampling; resample it first (e.g. with dcm2niix, which corrects gantry tilt)."
            )
        spacing_z = float(np.median(steps))
        tol = max(1e-3, spacing_tolerance * spacing_z)
        gaps = np.flatnonzero(steps > 1.5 * spacing_z)
        if gaps.size:
            i = int(gaps[0])
            n_missing = round(steps[i] / spacing_z) - 1
            raise DicomError(
                f"{where}: missing slice(s) - gap of {steps[i]:.3f} mm between {_slice_name(*members[i])} at "
                f"{proj[i]:.3f} mm and {_slice_name(*members[i + 1])} at {proj[i + 1]:.3f} mm along the normal, "
                f"while the slice spacing is {spacing_z:.3f} mm (about {n_missing} slice(s) missing; {gaps.size} "
                "gap(s) in total). Re-export or re-copy the complete series; a volume with a hole would have wrong "
                "geometry."
            )
        bad = np.flatnonzero(np.abs(steps - spacing_z) > tol)
        if bad.size:
            i = int(bad[0])
            raise DicomError(
                f"{where}: inconsistent slice spacing - steps between slices range from {steps.min():.4f} to "
                f"{steps.max():.4f} mm (median {spacing_z:.4f} mm, tolerance {tol:.4f} mm); first irregular step "
                f"of {steps[i]:.4f} mm is between {_slice_name(*members[i])} and {_slice_name(*members[i + 1])}. "
                "The series has variable slice spacing; resample it to a regular grid first (e.g. dcm2niix), or "
                "raise spacing_tolerance if the variation is harmless."
            )
        slice_vec = (positions[-1] - positions[0]) / (n - 1)
    else:
        spacing_z = float(ref.get("SpacingBetweenSlices") or ref.get("SliceThickness") or 1.0)
        slice_vec = normal * spacing_z
    affine = np.eye(4)
    affine[:3, 0] = row_cos * pix[1]  # x: along a row (next column)
    affine[:3, 1] = col_cos * pix[0]  # y: down a column (next row)
    affine[:3, 2] = slice_vec
    affine[:3, 3] = positions[0]
    return members, affine, (float(pix[1]), float(pix[0]), float(spacing_z))


def _instance_numbers(members: list[tuple[Path | None, Dataset]]) -> np.ndarray | None:
    try:
        values = [ds.get("InstanceNumber") for _, ds in members]
        return None if any(v in (None, "") for v in values) else np.asarray([int(v) for v in values])
    except (TypeError, ValueError):
        return None


def _slice_count_warnings(members: list[tuple[Path | None, Dataset]], where: str) -> list[str]:
    """Messages when the header announces more slices than ``members`` (sorted along the normal) holds.

    A slice missing at an end of the stack leaves no gap in the positions, so only the header can tell:
    ``ImagesInAcquisition`` (one acquisition) or ``NumberOfSlices`` (PET / NM) give the expected count; consecutive
    InstanceNumbers that do not start at 1 point at missing first instance(s).
    """
    n = len(members)
    headers = [ds for _, ds in members]
    numbers = _instance_numbers(members)
    consecutive = numbers is not None and n > 1 and bool(np.all(np.abs(np.diff(numbers)) == 1))
    consecutive = consecutive and len(set(np.sign(np.diff(numbers)).tolist())) == 1
    msgs = []
    for keyword in ("ImagesInAcquisition", "NumberOfSlices"):
        try:
            counts = {int(ds.get(keyword)) for ds in headers if ds.get(keyword) not in (None, "")}
        except (TypeError, ValueError):
            continue
        acquisitions = {str(ds.get("AcquisitionNumber", "")) for ds in headers}
        if len(counts) != 1 or (keyword == "ImagesInAcquisition" and len(acquisitions) != 1):
            continue
        expected = counts.pop()
        if expected <= n:
            continue
        which = ""
        if consecutive and numbers is not None:
            lo, hi = int(numbers.min()), int(numbers.max())
            absent = [str(i) for i in range(1, lo)] + [str(i) for i in range(hi + 1, hi + 1 + expected - n - (lo - 1))]
            which = (
                f"; InstanceNumbers {lo}..{hi} are present without a gap, so InstanceNumber(s) {', '.join(absent[:5])}"
            )
            which += " are missing at an end of the stack" if absent else ""
        msgs.append(
            f"{where}: the header says {keyword}={expected}, but {n} slice(s) were found: {expected - n} slice(s) "
            f"missing at the end(s) of the stack (the positions found have no gap){which}. The volume is shorter "
            "than the acquisition; re-export or re-copy the complete series if that is not intended."
        )
        return msgs
    if consecutive and numbers is not None and int(numbers.min()) > 1:
        lo, hi = int(numbers.min()), int(numbers.max())
        end = members[int(np.argmin(numbers))]
        msgs.append(
            f"{where}: InstanceNumbers run {lo}..{hi} without a gap but do not start at 1: InstanceNumber(s) 1..{lo - 1} "
            f"are absent, so {lo - 1} slice(s) next to {_slice_name(*end)} at the end of the stack may be missing "
            "(or the series was exported as a subset). Re-export the complete series if that is not intended."
        )
    return msgs


def find_dicom_series(
    source: SeriesSource,
    series_uid: str | None = None,
    *,
    recursive: bool = False,
    force: bool = False,
    spacing_tolerance: float = 0.01,
) -> DicomSeries:
    """Locate one series in ``source`` and validate its geometry, reading headers only.

    Args:
        source: a folder, a list of slice files, or a list of ``pydicom`` datasets.
        series_uid: SeriesInstanceUID to use when ``source`` holds several series.
        recursive: search sub-folders of a folder.
        force: accept DICOM files without the ``DICM`` preamble.
        spacing_tolerance: allowed relative deviation of a slice step from the median step.

    Returns:
        The :class:`DicomSeries` (sorted slices, affine, spacing, shape).

    Raises:
        DicomError: see the module docstring for every check.
    """
    skipped: list[Path] = []
    members: dict[str, list[tuple[Path | None, Dataset]]]
    if isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        folder = Path(source)  # type: ignore[arg-type]
        if folder.is_file():
            header = read_dicom_file(folder, stop_before_pixels=True, force=force)
            members = {str(header.get("SeriesInstanceUID", "")): [(folder, header)]}
            where = f"'{folder}'"
        else:
            groups, skipped = scan_dicom_folder(folder, recursive=recursive, force=force)
            members = dict(groups)  # type: ignore[arg-type]
            where = f"folder '{folder}'"
        source_name = str(folder)
    else:
        items = list(source)  # type: ignore[arg-type]
        if not items:
            raise DicomError("No DICOM file or dataset given: the list is empty.")
        members = {}
        for item in items:
            if isinstance(item, Dataset):
                path, header = None, item
            else:
                path = Path(item)
                header = read_dicom_file(path, stop_before_pixels=True, force=force)
            uid = str(header.get("SeriesInstanceUID", "") or "")
            members.setdefault(uid, []).append((path, header))
        paths = [p for m in members.values() for p, _ in m if p is not None]
        parents = {p.parent for p in paths}
        source_name = str(parents.pop()) if len(parents) == 1 else (str(paths[0]) if paths else "")
        where = f"the {len(items)} given file(s)"
    uid, chosen = _select_series(members, series_uid, where)
    chosen, affine, spacing = _geometry(chosen, where, spacing_tolerance)
    ref = chosen[0][1]
    found_warnings = _slice_count_warnings(chosen, where)
    for msg in found_warnings:
        warnings.warn(msg, MissingSliceWarning, stacklevel=3)
    return DicomSeries(
        series_instance_uid=uid,
        datasets=[ds for _, ds in chosen],
        paths=[p for p, _ in chosen],
        affine_lps=affine,
        spacing=spacing,
        shape=(int(ref.Columns), int(ref.Rows), len(chosen)),
        source=source_name,
        skipped_files=skipped,
        warnings=found_warnings,
    )


def load_dicom_series(
    source: SeriesSource,
    series_uid: str | None = None,
    *,
    rescale: bool = True,
    dtype: Any = np.float32,
    recursive: bool = False,
    force: bool = False,
    spacing_tolerance: float = 0.01,
) -> MetaTensor:
    """Load a DICOM series to a ``(1, X, Y, Z)`` float ``MetaTensor`` with a RAS affine.

    Args:
        source: a folder, a list of slice files, or a list of ``pydicom`` datasets (with pixel data).
        series_uid: SeriesInstanceUID to load when ``source`` holds several series.
        rescale: apply the modality LUT (RescaleSlope/Intercept: CT in HU), per slice.
        dtype: numpy dtype of the output.
        recursive, force, spacing_tolerance: see :func:`find_dicom_series`.

    Returns:
        ``MetaTensor`` of shape ``(1, Columns, Rows, n_slices)``; meta has ``affine`` (RAS), ``spacing``,
        ``series_instance_uid``, ``sop_instance_uids`` (the slices' SOPInstanceUIDs in z order, joined by ``\\``;
        a DICOM SEG paired with the volume is checked against them), ``study_instance_uid``, ``frame_of_reference_uid``, ``modality``,
        ``filename_or_obj`` (the folder).

    Raises:
        DicomError: invalid input (see :func:`find_dicom_series`), truncated files, missing pixel data.
        MissingDependencyError: compressed slices without an installed decoder (names the package).

    Example::

        ct = load_dicom_series("ct_dicom_series/")  # (1, 512, 512, 20), HU
    """
    single = _single_multiframe(source, force)
    if single is not None:
        return load_dicom_multiframe(
            single, rescale=rescale, dtype=dtype, force=force, spacing_tolerance=spacing_tolerance
        )
    series = find_dicom_series(
        source, series_uid, recursive=recursive, force=force, spacing_tolerance=spacing_tolerance
    )
    return series.load(rescale=rescale, dtype=dtype)


def _single_multiframe(source: SeriesSource, force: bool) -> Path | Dataset | None:
    """``source`` when it is one multi-frame file or dataset (given alone or as a list of one), else ``None``."""
    if isinstance(source, (str, Path)) or hasattr(source, "__fspath__"):
        items: list[Any] = [source]
    elif isinstance(source, Sequence) and len(source) == 1:
        items = list(source)
    else:
        return None
    item = items[0]
    if isinstance(item, Dataset):
        header = item
    else:
        item = Path(item)
        if not item.is_file():
            return None
        header = read_dicom_file(item, stop_before_pixels=True, force=force)
    try:
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    return item if frames > 1 else None


def load_dicom_multiframe(
    source: PathLike | Dataset,
    *,
    rescale: bool = True,
    dtype: Any = np.float32,
    force: bool = False,
    spacing_tolerance: float = 0.01,
) -> MetaTensor:
    """Load a multi-frame object (Enhanced CT / MR / PET, RT Dose ...) as a ``(1, X, Y, Z)`` volume.

    The geometry comes from each frame's own position: the per-frame ``PlanePositionSequence`` of enhanced objects,
    or ``ImagePositionPatient`` + ``GridFrameOffsetVector`` for RT Dose (never from ``SliceThickness``, which
    differs from the frame step on overlapping reconstructions). Frames are sorted along the normal
    ``row_cosine x column_cosine`` like the slices of :func:`load_dicom_series`, so both give the same array and
    affine for the same data; voxel ``(x, y, z)`` is column ``x``, row ``y`` of the ``z``-th frame in that order,
    and the affine maps ``(0, 0, z)`` to that frame's stated position.

    Args:
        source: the file or an already-read dataset.
        rescale: apply the modality LUT per frame (``PixelValueTransformationSequence``: CT in HU) and an RT Dose's
            ``DoseGridScaling`` (dose in ``DoseUnits``, e.g. Gy).
        dtype: numpy dtype of the output.
        force: read a file without the ``DICM`` preamble.
        spacing_tolerance: allowed relative deviation of a frame step from the median step.

    Returns:
        ``MetaTensor`` ``(1, Columns, Rows, frames)`` with RAS ``affine``, ``spacing``, ``series_instance_uid``,
        ``sop_instance_uids`` (the object's own SOPInstanceUID), ``number_of_frames``, ``modality``.

    Raises:
        DicomError: no frame positions (no 3D geometry), mixed orientations or pixel spacings, frames at the same
            position (several time points / stacks), frames not stacked along the normal, or not equally spaced.
    """
    from monai_peft.transforms.dicom_image import _apply_luts, frame_dataset, frame_positions

    ds = source if isinstance(source, Dataset) else read_dicom_file(source, force=force)
    where = describe_source(source)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise DicomError(f"{where} is a colour multi-frame object; a volume needs grayscale frames.")
    positions = frame_positions(ds)
    if positions is None:
        raise DicomError(
            f"{where} ({n} frames) states no position for its frames: no per-frame PlanePositionSequence (in "
            "PerFrameFunctionalGroupsSequence) and no GridFrameOffsetVector, so no 3D geometry can be built and a "
            "label could not be placed on it. Use a copy with the functional groups intact (some anonymisers strip "
            "them), or read the frames as 2D images with read_dicom_image."
        )
    views = [frame_dataset(ds, k) for k in range(n)]
    iops, spacings = [], []
    for k, view in enumerate(views):
        iop, pix = view.get("ImageOrientationPatient"), view.get("PixelSpacing")
        if iop is None or len(iop) != 6 or not pix:
            missing = "ImageOrientationPatient (PlaneOrientationSequence)" if iop is None else "PixelSpacing"
            raise DicomError(
                f"{where}: frame {k + 1} has no {missing}, so no 3D geometry can be built. Read the frames as 2D "
                "images with read_dicom_image."
            )
        iops.append(np.asarray(iop, float))
        spacings.append(np.asarray(pix, float))
    for k in range(1, n):
        if not np.allclose(iops[k], iops[0], atol=1e-4):
            raise DicomError(
                f"{where}: frame {k + 1} has orientation {iops[k].tolist()}, frame 1 {iops[0].tolist()}: the object "
                "mixes orientations (e.g. a localizer or several stacks). Read single frames with read_dicom_image."
            )
        if not np.allclose(spacings[k], spacings[0], atol=1e-4):
            raise DicomError(
                f"{where}: frame {k + 1} has pixel spacing {spacings[k].tolist()}, frame 1 {spacings[0].tolist()}: "
                "mixed pixel spacings in one volume."
            )
    row_cos, col_cos, pix = iops[0][:3], iops[0][3:], spacings[0]
    normal = np.cross(row_cos, col_cos)
    proj = positions @ normal
    order = np.argsort(proj, kind="stable")
    positions, proj = positions[order], proj[order]
    if n > 1:
        steps = np.diff(proj)
        if np.any(steps < 1e-3):
            distinct = len(np.unique(np.round(proj, 3)))
            raise DicomError(
                f"{where}: several of its {n} frames are at the same position ({distinct} distinct positions for {n} "
                "frames): the object holds several time points, echoes or stacks (4D), not one volume. Read single "
                "frames with read_dicom_image(..., frame=k), or split it first."
            )
        in_plane = (positions - positions[0]) - np.outer((positions - positions[0]) @ normal, normal)
        drift = float(np.max(np.linalg.norm(in_plane, axis=1)))
        if drift > max(1e-2, 0.01 * float(np.median(steps))):
            raise DicomError(
                f"{where}: frames are not stacked along their normal (in-plane drift up to {drift:.2f} mm): a "
                "tilted or sheared acquisition that needs resampling first."
            )
        median = float(np.median(steps))
        tol = max(1e-3, spacing_tolerance * median)
        if np.any(np.abs(steps - median) > tol):
            raise DicomError(
                f"{where}: its frames are not equally spaced (steps between frame positions range from "
                f"{steps.min():.4f} to {steps.max():.4f} mm, median {median:.4f} mm, tolerance {tol:.4f} mm), so no "
                "single affine describes them. Resample it to a regular grid first, or raise spacing_tolerance if "
                "the variation is harmless."
            )
        slice_vec = (positions[-1] - positions[0]) / (n - 1)
        spacing_z = median
    else:
        spacing_z = float(views[0].get("SpacingBetweenSlices") or views[0].get("SliceThickness") or 1.0)
        slice_vec = normal * spacing_z
    pixels = decode_pixels(ds, source)
    if n == 1:
        pixels = pixels[None]
    rows, cols = int(ds.Rows), int(ds.Columns)
    out = np.empty((cols, rows, n), dtype=dtype)
    for z, k in enumerate(order):
        values, _, _ = _apply_luts(pixels[k], views[k], rescale, False, 0, True)
        out[:, :, z] = values.T
    affine = np.eye(4)
    affine[:3, 0] = row_cos * pix[1]
    affine[:3, 1] = col_cos * pix[0]
    affine[:3, 2] = slice_vec
    affine[:3, 3] = positions[0]
    ras = LPS_TO_RAS @ affine
    meta = {
        "affine": torch.as_tensor(ras, dtype=torch.float64),
        "original_affine": ras,
        "spatial_shape": np.asarray(out.shape),
        "spacing": np.asarray([float(pix[1]), float(pix[0]), spacing_z]),
        "original_channel_dim": 0,
        "space": "RAS",
        "filename_or_obj": str(source) if not isinstance(source, Dataset) else str(getattr(ds, "filename", "") or ""),
        "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
        "sop_instance_uids": sop_uids(ds)[1],
        "number_of_frames": n,
        "study_instance_uid": str(ds.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(ds.get("FrameOfReferenceUID", "")),
        "modality": str(ds.get("Modality", "")),
        "series_description": str(ds.get("SeriesDescription", "")),
        "warnings": "",
    }
    return MetaTensor(torch.from_numpy(out[None]), meta=meta)


class LoadDicomSeries(Transform):
    """Array transform: series folder / list of files -> ``(1, X, Y, Z)`` ``MetaTensor`` (see :func:`load_dicom_series`)."""

    def __init__(
        self,
        series_uid: str | None = None,
        rescale: bool = True,
        dtype: Any = np.float32,
        recursive: bool = False,
        force: bool = False,
        spacing_tolerance: float = 0.01,
    ) -> None:
        self.kwargs = dict(
            series_uid=series_uid,
            rescale=rescale,
            dtype=dtype,
            recursive=recursive,
            force=force,
            spacing_tolerance=spacing_tolerance,
        )

    def __call__(self, source: SeriesSource) -> MetaTensor:
        return load_dicom_series(source, **self.kwargs)


class LoadDicomSeriesd(MapTransform):
    """Dictionary version of :class:`LoadDicomSeries`.

    Args:
        keys: keys holding a series folder (or list of files); replaced by the loaded volume.
        series_uid: SeriesInstanceUID to choose in folders with several series; a data item may override it
            with its own ``series_uid`` entry.
        allow_missing_keys: skip absent keys.
        other arguments: see :func:`load_dicom_series`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        rescale: bool = True,
        dtype: Any = np.float32,
        recursive: bool = False,
        force: bool = False,
        spacing_tolerance: float = 0.01,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.series_uid = series_uid
        self.kwargs = dict(
            rescale=rescale, dtype=dtype, recursive=recursive, force=force, spacing_tolerance=spacing_tolerance
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        uid = d.get("series_uid", self.series_uid)
        for key in self.key_iterator(d):
            d[key] = load_dicom_series(d[key], uid, **self.kwargs)
        return d
