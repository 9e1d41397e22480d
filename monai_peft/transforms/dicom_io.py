"""Low-level DICOM file access with readable errors.

Everything that opens a DICOM file in :mod:`monai_peft.transforms` goes through :func:`read_dicom_file` and
:func:`decode_pixels`, so that every way a file can be unusable is reported the same way:

* not a DICOM file, or a folder / missing path      -> :class:`~monai_peft.errors.DicomError`
* truncated file (header or pixel data cut short)   -> :class:`~monai_peft.errors.DicomError`
* no Pixel Data element (SR, presentation state...) -> :class:`~monai_peft.errors.DicomError`
* compressed transfer syntax without a decoder      -> :class:`~monai_peft.errors.MissingDependencyError`
  naming the pip packages that provide one.
"""

from __future__ import annotations

import copy
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from monai_peft.errors import DicomError, MissingDependencyError

__all__ = [
    "DECODER_PACKAGES",
    "PathLike",
    "check_decoder",
    "decode_pixels",
    "describe_source",
    "header_copy",
    "is_dicom_file",
    "read_dicom_file",
    "sop_uids",
]

PathLike = str | os.PathLike

_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)  # Pixel Data, Float Pixel Data, Double Float Pixel Data

# pip requirements that provide a pydicom decoder for each compressed transfer syntax (first = recommended).
_J2K = ("pylibjpeg pylibjpeg-openjpeg", "Pillow (built with OpenJPEG)", "python-gdcm")
_JPEG = ("pylibjpeg pylibjpeg-libjpeg", "Pillow", "python-gdcm")
_JPEG_LOSSLESS = ("pylibjpeg pylibjpeg-libjpeg", "python-gdcm")
_JPEG_LS = ("pyjpegls", "pylibjpeg pylibjpeg-libjpeg", "python-gdcm")
DECODER_PACKAGES: dict[str, tuple[str, ...]] = {
    "1.2.840.10008.1.2.4.50": _JPEG,  # JPEG Baseline 8-bit
    "1.2.840.10008.1.2.4.51": _JPEG,  # JPEG Extended 12-bit
    "1.2.840.10008.1.2.4.57": _JPEG_LOSSLESS,  # JPEG Lossless P14
    "1.2.840.10008.1.2.4.70": _JPEG_LOSSLESS,  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": _JPEG_LS,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _JPEG_LS,  # JPEG-LS Near Lossless
    "1.2.840.10008.1.2.4.90": _J2K,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _J2K,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": ("pylibjpeg pylibjpeg-openjpeg",),  # HTJ2K
    "1.2.840.10008.1.2.5": ("pylibjpeg pylibjpeg-rle",),  # RLE Lossless (pydicom decodes it natively too)
}


def describe_source(source: PathLike | Dataset) -> str:
    """A short human-readable name for a file or dataset, used in error messages."""
    if isinstance(source, Dataset):
        name = getattr(source, "filename", None)
        if isinstance(name, (str, os.PathLike)) and str(name):
            return f"'{name}'"
        uid = source.get("SOPInstanceUID", "")
        return f"dataset (SOPInstanceUID {uid})" if uid else "in-memory dataset"
    return f"'{source}'"


def sop_uids(ds: Dataset) -> tuple[str, str]:
    """``(SOPClassUID, SOPInstanceUID)`` of ``ds``, falling back to the file meta's Media Storage UIDs.

    Some anonymisers blank the dataset's SOP UIDs but keep the file meta ones, which PS3.10 defines as equal.
    """
    meta = getattr(ds, "file_meta", None)
    cls = str(ds.get("SOPClassUID", "") or "") or str(meta.get("MediaStorageSOPClassUID", "") if meta else "")
    inst = str(ds.get("SOPInstanceUID", "") or "") or str(meta.get("MediaStorageSOPInstanceUID", "") if meta else "")
    return cls, inst


def header_copy(ds: Dataset) -> Dataset:
    """Deep copy of ``ds`` without its pixel data (safe to modify; the original is untouched)."""
    new = Dataset()
    for tag in list(ds.keys()):  # keys, not elements: iterating a Dataset would parse every raw element
        if int(tag) in _PIXEL_TAGS:
            continue
        new.add(copy.deepcopy(ds[tag]))
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        new.file_meta = copy.deepcopy(meta)
    return new


def is_dicom_file(path: PathLike) -> bool:
    """True when ``path`` is a file that starts with the 128-byte preamble followed by ``DICM``.

    Cheap (reads 132 bytes); used to sort DICOM from non-DICOM files in a folder. Preamble-less files
    (old ACR-NEMA style) return ``False``; :func:`read_dicom_file` with ``force=True`` can still read them.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def _raw_elements_end(ds: Dataset) -> tuple[int, bool]:
    """File offset just past the last top-level element still in raw (unparsed) form, and whether any raw
    element has undefined length whose end could not be computed."""
    end, unknown = 0, False
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if not isinstance(raw, RawDataElement) or raw.value_tell is None:
            continue
        if raw.length == 0xFFFFFFFF:
            if isinstance(raw.value, (bytes, bytearray)):
                end = max(end, raw.value_tell + len(raw.value) + 8)  # + sequence delimitation item
            else:
                unknown = True
        else:
            end = max(end, raw.value_tell + raw.length)
    return end, unknown


def read_dicom_file(path: PathLike, *, stop_before_pixels: bool = False, force: bool = False) -> Dataset:
    """Read one DICOM file, checking that it is DICOM and complete.

    Args:
        path: path of the file.
        stop_before_pixels: read the header only (fast; used to scan series folders).
        force: read files without the ``DICM`` preamble (old ACR-NEMA style). Off by default so that a
            random file is reported as "not DICOM" instead of being parsed into garbage.

    Returns:
        The ``pydicom`` dataset.

    Raises:
        DicomError: the path is missing or a folder, the file is not DICOM, or it is truncated.
    """
    path = Path(path)
    if not path.exists():
        raise DicomError(f"DICOM file '{path}' does not exist. Check the path.")
    if path.is_dir():
        raise DicomError(
            f"'{path}' is a folder, not a DICOM file. Use load_dicom_series('{path}') to read a series folder."
        )
    size = path.stat().st_size
    if size == 0:
        raise DicomError(f"'{path}' is an empty file (0 bytes), not DICOM. Re-copy or re-export it.")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, force=force)
        except InvalidDicomError as exc:
            raise DicomError(
                f"'{path}' is not a DICOM file: it lacks the 128-byte preamble and 'DICM' marker ({exc}). "
                "Remove it from the input, or pass force=True if it is a preamble-less (ACR-NEMA) DICOM file."
            ) from exc
        except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise DicomError(
                f"'{path}' could not be parsed as DICOM ({type(exc).__name__}: {exc}). The file is truncated or "
                "corrupt: re-copy or re-export it."
            ) from exc
    eof_warnings = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    for w in caught:  # re-emit anything that was not about truncation
        if str(w.message) not in eof_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    end, unknown = _raw_elements_end(ds)
    truncated = bool(eof_warnings) or end > size
    if not stop_before_pixels and not unknown and 0 < size - end < 8:
        truncated = True  # the file ends inside an element header
    if not stop_before_pixels and len(ds) == 0:
        truncated = True
    if truncated:
        detail = eof_warnings[0] if eof_warnings else f"its elements need {max(end, size + 1)} bytes, it has {size}"
        raise DicomError(
            f"DICOM file '{path}' is truncated ({detail}). The copy is incomplete: re-copy or re-export it from "
            "the source (PACS, CD, archive)."
        )
    return ds


def check_decoder(ds: Dataset, source: PathLike | Dataset | None = None) -> None:
    """Raise :class:`MissingDependencyError` when no installed plugin can decode ``ds``'s transfer syntax.

    The message names the transfer syntax and the pip packages that provide a decoder for it.
    """
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None:
        return  # pydicom will guess (uncompressed); nothing to check
    uid = UID(str(tsyntax))
    if not uid.is_compressed:
        return
    from pydicom.pixels import get_decoder

    where = describe_source(source if source is not None else ds)
    packages = DECODER_PACKAGES.get(str(uid), ())
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DicomError(
            f"{where} uses transfer syntax {uid.name} ({uid}), which pydicom cannot decode at all. Convert it to "
            "an uncompressed transfer syntax (e.g. `dcmdjpeg` / `gdcmconv --raw`) before loading."
        ) from exc
    if decoder.is_available:
        return
    hint = " or ".join(f"`pip install {p}`" for p in packages) or "a pydicom pixel-data plugin"
    missing = "; ".join(decoder.missing_dependencies)
    raise MissingDependencyError(
        f"{where} is compressed with {uid.name} ({uid}) and no decoder for it is installed"
        + (f" (pydicom plugins: {missing})" if missing else "")
        + f". Install one: {hint}."
    )


def decode_pixels(ds: Dataset, source: PathLike | Dataset | None = None) -> np.ndarray:
    """Decode the stored pixel values of ``ds`` (no LUT applied).

    Returns:
        ``(rows, cols)`` for one frame, ``(frames, rows, cols)`` for multi-frame; a trailing axis of 3 for
        colour (``SamplesPerPixel == 3``, YBR converted to RGB).

    Raises:
        DicomError: no pixel data element, or pixel data shorter than the header announces (truncated).
        MissingDependencyError: compressed transfer syntax without an installed decoder.
    """
    where = describe_source(source if source is not None else ds)
    if not any(tag in ds for tag in _PIXEL_TAGS):
        sop = ds.get("SOPClassUID")
        kind = f" (SOP class: {UID(str(sop)).name})" if sop else ""
        raise DicomError(
            f"{where} has no Pixel Data element{kind}: it is not an image (e.g. a structured report, presentation "
            "state or a header-only copy). Remove it from the input or point at the image files."
        )
    check_decoder(ds, source)
    try:
        return ds.pixel_array
    except ValueError as exc:
        msg = str(exc)
        if "less than expected" in msg or "too short" in msg.lower() or "truncat" in msg.lower():
            raise DicomError(f"{where} is truncated: {msg}. Re-copy or re-export the file from the source.") from exc
        raise DicomError(f"{where}: its pixel data cannot be decoded ({msg}).") from exc
    except (RuntimeError, NotImplementedError, AttributeError, TypeError) as exc:
        raise DicomError(
            f"{where}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}). The file may be corrupt "
            "or use an unusual encoding; try converting it with `gdcmconv --raw`."
        ) from exc
