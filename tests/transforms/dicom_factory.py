"""Small synthetic DICOM files written with pydicom, for tests (no real patient data)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def make_image(
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    signed: bool = False,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    position: Sequence[float] | None = (0.0, 0.0, 0.0),
    orientation: Sequence[float] | None = AXIAL,
    pixel_spacing: Sequence[float] | None = (0.5, 0.75),
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    instance: int = 1,
    modality: str = "CT",
    sop_class: str = CTImageStorage,
    with_pixels: bool = True,
) -> Dataset:
    """A single-frame grayscale image dataset; ``pixels`` are the stored values ``(rows, cols)``."""
    pixels = np.asarray(pixels)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = frame_uid or generate_uid()
    ds.PatientName = "Synthetic^Test"
    ds.PatientID = "SYN001"
    ds.Modality = modality
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    if position is not None:
        ds.ImagePositionPatient = [float(v) for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [float(v) for v in orientation]
    if pixel_spacing is not None:
        ds.PixelSpacing = [float(v) for v in pixel_spacing]
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = 0.0 if intercept is None else intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if with_pixels:
        ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_series(
    folder: Path,
    *,
    n: int = 5,
    rows: int = 6,
    cols: int = 4,
    spacing_z: float = 2.0,
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.5, 0.75),
    skip: Sequence[int] = (),
    z_offsets: Sequence[float] | None = None,
    series_uid: str | None = None,
    study_uid: str | None = None,
    frame_uid: str | None = None,
    slope: float = 1.0,
    intercept: float = -1024.0,
    prefix: str = "slice",
    images_in_acquisition: int | None = None,
) -> tuple[list[Path], np.ndarray]:
    """Write ``n`` slices of a series (files named in scrambled order) and return (paths, stored volume).

    Slice ``k`` sits at ``origin + k * spacing_z * normal`` (plus ``z_offsets[k]``); its stored values are
    ``1000 + 100 * k + 10 * row + col`` so every voxel is identifiable. Slices in ``skip`` are not written. The
    returned stored volume is ``(n, rows, cols)`` in slice order (including skipped ones). Slice ``k`` has
    InstanceNumber ``n - k``; ``images_in_acquisition`` is written as ImagesInAcquisition when given.
    """
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    frame_uid = frame_uid or generate_uid()
    iop = np.asarray(orientation, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    r, c = np.mgrid[0:rows, 0:cols]
    volume = np.stack([1000 + 100 * k + 10 * r + c for k in range(n)]).astype(np.uint16)
    paths = []
    order = list(range(n))[::-1]  # write in reverse to make sure nothing relies on file order
    for k in order:
        if k in skip:
            continue
        offset = 0.0 if z_offsets is None else float(z_offsets[k])
        pos = np.asarray(origin, dtype=float) + (k * spacing_z + offset) * normal
        ds = make_image(
            volume[k],
            position=pos,
            orientation=orientation,
            pixel_spacing=pixel_spacing,
            series_uid=series_uid,
            study_uid=study_uid,
            frame_uid=frame_uid,
            instance=n - k,
            slope=slope,
            intercept=intercept,
        )
        if images_in_acquisition is not None:
            ds.ImagesInAcquisition = int(images_in_acquisition)
        paths.append(save(ds, folder / f"{prefix}_{n - k:03d}.dcm"))
    return paths, volume


def make_enhanced(
    frames: np.ndarray,
    positions: Sequence[Sequence[float]],
    *,
    orientation: Sequence[float] = AXIAL,
    pixel_spacing: Sequence[float] = (0.6, 0.9),
    slice_thickness: float | None = None,
    slopes: Sequence[float] | None = None,
    intercepts: Sequence[float] | None = None,
    modality: str = "CT",
    series_uid: str | None = None,
    frame_uid: str | None = None,
) -> Dataset:
    """An enhanced multi-frame image (Enhanced CT / MR Image Storage) with the geometry in functional groups.

    ``frames`` are the stored values ``(F, rows, cols)``; frame ``k`` is at ``positions[k]`` (LPS mm, in the
    per-frame PlanePositionSequence), with per-frame rescale ``slopes[k]`` / ``intercepts[k]``; orientation and
    pixel spacing are in the shared groups. ``slice_thickness`` (shared PixelMeasuresSequence) may differ from the
    real frame step, as it does on real scanners with overlapping reconstructions.
    """
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import EnhancedCTImageStorage, EnhancedMRImageStorage

    frames = np.asarray(frames)
    n = frames.shape[0]
    sop_class = EnhancedCTImageStorage if modality == "CT" else EnhancedMRImageStorage
    ds = make_image(
        frames[0],
        position=None,
        orientation=None,
        pixel_spacing=None,
        modality=modality,
        sop_class=sop_class,
        series_uid=series_uid,
        frame_uid=frame_uid,
        with_pixels=False,
    )
    ds.NumberOfFrames = n
    shared = Dataset()
    orient = Dataset()
    orient.ImageOrientationPatient = [float(v) for v in orientation]
    shared.PlaneOrientationSequence = DicomSequence([orient])
    measures = Dataset()
    measures.PixelSpacing = [float(v) for v in pixel_spacing]
    if slice_thickness is not None:
        measures.SliceThickness = float(slice_thickness)
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k in range(n):
        group = Dataset()
        pos = Dataset()
        pos.ImagePositionPatient = [float(v) for v in positions[k]]
        group.PlanePositionSequence = DicomSequence([pos])
        if slopes is not None or intercepts is not None:
            tr = Dataset()
            tr.RescaleSlope = float(slopes[k]) if slopes is not None else 1.0
            tr.RescaleIntercept = float(intercepts[k]) if intercepts is not None else 0.0
            tr.RescaleType = "HU" if modality == "CT" else "US"
            group.PixelValueTransformationSequence = DicomSequence([tr])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    return ds
