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
import zlib
from pathlib import Path

import numpy as np
import pydicom
from pydicom.datadict import keyword_for_tag
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
_DEFLATED = "1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is zlib-compressed
_FORCE_HINT = (
    "If it is a DICOM file without the preamble (old ACR-NEMA style), read it with read_dicom_image(..., "
    "force=True), read_dicom_file(..., force=True) or load_dicom_series(..., force=True)."
)
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
# first word of a pip requirement in DECODER_PACKAGES -> the pydicom decoder plugin it provides
_PACKAGE_PLUGINS = {"pylibjpeg": "pylibjpeg", "python-gdcm": "gdcm", "Pillow": "pillow", "pyjpegls": "pyjpegls"}


def _capable_packages(ds: Dataset, uid: UID) -> tuple[str, ...]:
    """pip requirements able to decode ``ds``: 12-bit JPEG Extended is beyond Pillow (8-bit only)."""
    packages = DECODER_PACKAGES.get(str(uid), ())
    if str(uid) == "1.2.840.10008.1.2.4.51" and int(ds.get("BitsStored", 8) or 8) > 8:
        packages = tuple(p for p in packages if not p.startswith("Pillow"))
    return packages


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
                f"Remove it from the input. {_FORCE_HINT}"
            ) from exc
        except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, zlib.error) as exc:
            raise DicomError(
                f"'{path}' could not be parsed as DICOM ({type(exc).__name__}: {exc}). The file is truncated or "
                "corrupt: re-copy or re-export it."
            ) from exc
    eof_warnings = [str(w.message) for w in caught if "end of file" in str(w.message).lower()]
    for w in caught:  # re-emit anything that was not about truncation
        if str(w.message) not in eof_warnings:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if force and not any(keyword_for_tag(tag) for tag in list(ds.keys())):  # keys: no raw element parsed
        raise DicomError(
            f"'{path}' is not a DICOM file: read with force=True it holds no standard DICOM element (only "
            f"{', '.join(str(t) for t in list(ds.keys())[:3]) or 'nothing'}). Remove it from the input."
        )
    if force:
        _set_parsed_transfer_syntax(ds)
    end, unknown = _raw_elements_end(ds)
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        # element offsets are positions in the inflated stream, not in the (smaller) file; a cut-off deflated
        # stream makes zlib or pydicom fail above instead
        end, unknown = 0, True
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


def _set_parsed_transfer_syntax(ds: Dataset) -> None:
    """A file without file meta (ACR-NEMA style) has no TransferSyntaxUID, which pixel decoding needs: record the
    uncompressed encoding pydicom parsed the dataset with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and meta.get("TransferSyntaxUID"):
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        return
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    )


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
    from monai_peft.transforms.pydicom_compat import get_decoder

    where = describe_source(source if source is not None else ds)
    packages = _capable_packages(ds, uid)
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise DicomError(
            f"{where} uses transfer syntax {uid.name} ({uid}), which pydicom cannot decode at all. Convert it to "
            "an uncompressed transfer syntax (e.g. `dcmdjpeg` / `gdcmconv --raw`) before loading."
        ) from exc
    if decoder is None or decoder.is_available:  # None: pydicom 2, which names a missing handler itself
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
    except RuntimeError as exc:
        _raise_if_a_better_decoder_exists(ds, where, exc)
        raise DicomError(
            f"{where}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}). The file may be corrupt "
            "or use an unusual encoding; try converting it with `gdcmconv --raw`."
        ) from exc
    except zlib.error as exc:
        raise DicomError(f"{where} is truncated or corrupt (deflated data: {exc}). Re-copy or re-export it.") from exc
    except ValueError as exc:
        msg = str(exc)
        if "less than expected" in msg or "too short" in msg.lower() or "truncat" in msg.lower():
            raise DicomError(f"{where} is truncated: {msg}. Re-copy or re-export the file from the source.") from exc
        raise DicomError(f"{where}: its pixel data cannot be decoded ({msg}).") from exc
    except (NotImplementedError, AttributeError, TypeError) as exc:
        raise DicomError(
            f"{where}: its pixel data cannot be decoded ({type(exc).__name__}: {exc}). The file may be corrupt "
            "or use an unusual encoding; try converting it with `gdcmconv --raw`."
        ) from exc


def _raise_if_a_better_decoder_exists(ds: Dataset, where: str, exc: Exception) -> None:
    """When the installed plugins failed but a plugin that is not installed can decode this transfer syntax (e.g.
    Pillow on 12-bit JPEG Extended, which only pylibjpeg-libjpeg or GDCM decode), raise
    :class:`MissingDependencyError` naming it instead of blaming the file."""
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax is None or not UID(str(tsyntax)).is_compressed:
        return
    from monai_peft.transforms.pydicom_compat import get_decoder

    uid = UID(str(tsyntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return
    if decoder is None:  # pydicom 2: no decoder registry to consult
        return
    available = set(decoder.available_plugins)
    missing = [p for p in _capable_packages(ds, uid) if _PACKAGE_PLUGINS.get(p.split()[0]) not in available]
    if not missing:
        return
    bits = int(ds.get("BitsStored", 0) or 0)
    depth = f" with {bits}-bit samples" if bits else ""
    hint = " or ".join(f"`pip install {p}`" for p in missing)
    raise MissingDependencyError(
        f"{where} is compressed with {uid.name} ({uid}){depth}, which the installed decoder plugin(s) "
        f"({', '.join(sorted(decoder.available_plugins)) or 'none'}) cannot decode: {exc}. The file is probably "
        f"fine; install a decoder that can: {hint}."
    ) from exc
