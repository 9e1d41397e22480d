"""Export a few real MedMNIST images as PNG / DICOM files, to try a 2D bundle's ``inference.json`` on files.

``python -m monai_peft.bundle medmnist_images --out sample_cxr --count 16`` writes
``pneumoniamnist_test_0000.png`` ... from the local PneumoniaMNIST npz (``../shared/data`` or
``$MONAI_PEFT_SHARED_DATA``); ``--dicom 2`` writes the first two as DICOM Secondary Capture files instead.
The labels go to ``labels.csv`` beside them (the bundle's inference ignores it).
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

import numpy as np

from monai_peft.checkpoint import atomic_write_bytes
from monai_peft.errors import InputDataError

__all__ = ["export_medmnist_images", "write_secondary_capture"]


def write_secondary_capture(path: str | os.PathLike, image: np.ndarray, patient_id: str = "ANON") -> Path:
    """Write a uint8 ``(H, W)`` image as a MONOCHROME2 DICOM Secondary Capture file (atomically)."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    arr = np.ascontiguousarray(image, dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientID, ds.Modality, ds.ConversionType = patient_id, "OT", "WSD"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    # display window of the 8-bit values: DICOM's linear VOI with centre 128 / width 256 maps x to x / 255 exactly
    ds.WindowCenter, ds.WindowWidth = 128, 256
    ds.PixelData = arr.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def export_medmnist_images(
    out_dir: str | os.PathLike,
    npz: str | os.PathLike | None = None,
    split: str = "test",
    count: int = 16,
    dicom: int = 0,
    flag: str = "pneumoniamnist",
) -> list[Path]:
    """Write the first ``count`` images of a MedMNIST split as files named ``<flag>_<split>_<index>``.

    Args:
        out_dir: destination folder (created).
        npz: the MedMNIST ``.npz``; default: the local PneumoniaMNIST file (see :mod:`monai_peft.demo`).
        split: ``"train"``, ``"val"`` or ``"test"``.
        count: number of images.
        dicom: how many of them (the first) to write as DICOM instead of PNG.

    Returns:
        The written image paths; ``labels.csv`` (``case,label``) is written beside them.
    """
    from PIL import Image

    from monai_peft.data.medmnist import load_medmnist_npz
    from monai_peft.demo import find_pneumoniamnist

    source = Path(npz) if npz is not None else find_pneumoniamnist()
    if source is None or not source.is_file():
        raise InputDataError(
            f"MedMNIST file {source or 'pneumoniamnist_28.npz'} not found; pass --npz PATH or set MONAI_PEFT_SHARED_DATA"
        )
    images, labels = load_medmnist_npz(source, split)
    if images.ndim != 3:
        raise InputDataError(f"{source} holds {images.ndim - 1}D images of shape {images.shape[1:]}; need grayscale 2D")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i in range(min(count, len(images))):
        name = f"{flag}_{split}_{i:04d}"
        if i < dicom:
            paths.append(write_secondary_capture(out / f"{name}.dcm", images[i], patient_id=name))
        else:
            buffer = io.BytesIO()
            Image.fromarray(np.asarray(images[i], dtype=np.uint8), mode="L").save(buffer, format="PNG")
            atomic_write_bytes(out / f"{name}.png", buffer.getvalue())
            paths.append(out / f"{name}.png")
        rows.append([name, int(labels[i].reshape(-1)[0])])
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([["case", "label"], *rows])
    atomic_write_bytes(out / "labels.csv", text.getvalue().encode())
    return paths
