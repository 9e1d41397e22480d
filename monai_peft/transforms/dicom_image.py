"""Single DICOM images (radiographs, single slices, multi-frame objects) to float arrays.

The grayscale display pipeline of DICOM PS3.4 is applied in order:

1. **Modality LUT** - ``RescaleSlope``/``RescaleIntercept`` (e.g. CT stored values to HU) or a Modality LUT
   Sequence (``pydicom.pixels.apply_modality_lut``);
2. **VOI LUT** (only with ``voi_lut=True``; the default gives modality values, as the volume loaders do) -
   ``WindowCenter``/``WindowWidth`` (LINEAR, LINEAR_EXACT, SIGMOID) or a VOI LUT Sequence
   (``pydicom.pixels.apply_voi_lut``);
3. **MONOCHROME1 inversion** - MONOCHROME1 images show low values as white; they are inverted inside the known
   output range so that, after this step, bright always means "high" as in MONOCHROME2.

Enhanced (multi-frame) objects keep these attributes per frame in functional groups
(``PixelValueTransformationSequence``, ``FrameVOILUTSequence``); they are read per frame.

Output layout (row-major, as torchvision/timm backbones expect - unlike MONAI's PIL reader, which transposes):

* one frame: ``(1, H, W)`` (``H`` = Rows, ``W`` = Columns);
* multi-frame: ``(1, F, H, W)``, or ``(1, H, W)`` when ``frame=`` picks one;
* colour (``SamplesPerPixel == 3``): ``(3, H, W)`` / ``(3, F, H, W)``, RGB, no LUT applied.

The ``MetaTensor`` affine (RAS, mm) comes from ``ImagePositionPatient``/``ImageOrientationPatient``/
``PixelSpacing`` (``ImagerPixelSpacing`` for projection radiographs) where present. For geometry-correct 3D
volumes from a series folder use :func:`monai_peft.transforms.load_dicom_series`.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from pydicom.dataset import Dataset

from monai_peft.errors import DicomError
from monai_peft.transforms.dicom_io import PathLike, decode_pixels, describe_source, read_dicom_file
from monai_peft.transforms.geometry import LPS_TO_RAS
from monai_peft.transforms.pydicom_compat import apply_modality_lut, apply_voi_lut

__all__ = [
    "LoadDicomImage",
    "LoadDicomImaged",
    "dicom_overlays",
    "frame_dataset",
    "frame_positions",
    "modality_output_range",
    "read_dicom_image",
    "voi_output_range",
]

_PIXEL_MODULE = (
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "SamplesPerPixel",
    "Rows",
    "Columns",
    "ModalityLUTSequence",
    "VOILUTSequence",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "DoseGridScaling",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "SliceThickness",
    "SpacingBetweenSlices",
)
# functional-group sequences of enhanced objects that carry the attributes above, per frame or shared
_GROUP_SEQUENCES = (
    "PixelValueTransformationSequence",
    "FrameVOILUTSequence",
    "PixelMeasuresSequence",
    "PlanePositionSequence",
    "PlaneOrientationSequence",
)


def _stored_range(ds: Dataset) -> tuple[float, float]:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        return 0.0, float(2**bits - 1)
    return float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)


def _lut_data(item: Dataset) -> np.ndarray:
    """LUT entries of a Modality/VOI LUT Sequence item, decoding OW byte strings."""
    data = item.LUTData
    if isinstance(data, (bytes, bytearray)):
        return np.frombuffer(data, dtype="<u2" if int(item.LUTDescriptor[2]) > 8 else "u1")
    return np.asarray(data)


def modality_output_range(ds: Dataset) -> tuple[float, float]:
    """Range of values after the modality LUT stage (stored range mapped by rescale, or the LUT's entries)."""
    if ds.get("ModalityLUTSequence"):
        lut = _lut_data(ds.ModalityLUTSequence[0])
        return float(lut.min()), float(lut.max())
    lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = sorted((lo * slope + inter, hi * slope + inter))
    scale = _dose_scaling(ds)
    if scale is not None:
        lo, hi = sorted((lo * scale, hi * scale))
    return lo, hi


def _dose_scaling(ds: Dataset) -> float | None:
    """``DoseGridScaling`` of an RT Dose (stored value x scaling = dose in ``DoseUnits``), else ``None``."""
    value = ds.get("DoseGridScaling")
    return float(value) if value not in (None, "") else None


def _has_voi_sequence(ds: Dataset) -> bool:
    seq = ds.get("VOILUTSequence")
    return bool(seq) and "LUTDescriptor" in seq[0] and "LUTData" in seq[0]


def _has_window(ds: Dataset) -> bool:
    return ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None


def voi_output_range(ds: Dataset, index: int = 0, prefer_lut: bool = True) -> tuple[float, float] | None:
    """Range of values after the VOI LUT stage, or ``None`` when ``ds`` has no VOI LUT / window.

    Matches ``pydicom.pixels.apply_voi_lut``: a VOI LUT Sequence maps into its entries' range; windowing maps into
    the modality output range computed from ``BitsStored``/``PixelRepresentation`` and the rescale.
    """
    use_lut = _has_voi_sequence(ds) and (prefer_lut or not _has_window(ds))
    if use_lut:
        lut = _lut_data(ds.VOILUTSequence[index])
        return float(lut.min()), float(lut.max())
    if not _has_window(ds):
        return None
    if ds.get("ModalityLUTSequence"):
        return 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    lo, hi = _stored_range(ds)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        slope, inter = float(ds.RescaleSlope), float(ds.RescaleIntercept)
        lo, hi = lo * slope + inter, hi * slope + inter
    return float(min(lo, hi)), float(max(lo, hi))


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def frame_dataset(ds: Dataset, frame: int) -> Dataset:
    """A flat dataset holding the pixel-module, LUT and geometry attributes that apply to ``frame``.

    For classic single-frame objects this is the top level; for enhanced multi-frame objects the
    shared and then the per-frame functional groups override it (``PixelValueTransformationSequence``,
    ``FrameVOILUTSequence``, ``PixelMeasuresSequence``, ``PlanePositionSequence``, ``PlaneOrientationSequence``).
    """
    view = Dataset()
    for kw in _PIXEL_MODULE:
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    if hasattr(ds, "file_meta"):
        view.file_meta = ds.file_meta
    groups = []
    if ds.get("SharedFunctionalGroupsSequence"):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    for group in groups:
        for seq_kw in _GROUP_SEQUENCES:
            seq = group.get(seq_kw)
            if not seq:
                continue
            for elem in seq[0]:
                if elem.keyword and elem.keyword in _PIXEL_MODULE:
                    setattr(view, elem.keyword, elem.value)
    return view


def _apply_luts(
    arr: np.ndarray, view: Dataset, modality_lut: bool, voi_lut: bool, voi_index: int, prefer_voi_sequence: bool
) -> tuple[np.ndarray, tuple[float, float], bool]:
    """Modality then VOI LUT on one frame; returns values, their range and whether a VOI LUT was applied."""
    value_range = _stored_range(view)
    out = arr
    if modality_lut:
        out = apply_modality_lut(out, view)
        scale = _dose_scaling(view)  # pydicom's modality LUT does not know RT Dose scaling
        if scale is not None:
            out = np.asarray(out, dtype=np.float64) * scale
        value_range = modality_output_range(view)
    applied_voi = False
    if voi_lut and (_has_voi_sequence(view) or _has_window(view)):
        voi_range = voi_output_range(view, voi_index, prefer_voi_sequence)
        use_lut = _has_voi_sequence(view) and (prefer_voi_sequence or not _has_window(view))
        if use_lut and not np.issubdtype(out.dtype, np.integer):
            out = np.rint(out).astype(np.int64)  # VOI LUT entries are indexed by integer modality values
        out = apply_voi_lut(out, view, index=voi_index, prefer_lut=prefer_voi_sequence)
        value_range = voi_range if voi_range is not None else value_range
        applied_voi = True
    return np.asarray(out, dtype=np.float64), value_range, applied_voi


def _plane_value(group: Dataset | None, sequence: str, keyword: str) -> Any:
    if group is None:
        return None
    seq = group.get(sequence)
    return seq[0].get(keyword) if seq else None


def frame_positions(ds: Dataset) -> np.ndarray | None:
    """``(F, 3)`` ImagePositionPatient (LPS mm) of every frame of a multi-frame object, or ``None`` when the file
    does not state them.

    * enhanced objects (CT, MR, PET ...): ``PlanePositionSequence`` of each ``PerFrameFunctionalGroupsSequence``
      item (or the shared group when all frames share one position);
    * RT Dose and other objects with ``GridFrameOffsetVector``: ``ImagePositionPatient + (g_k - g_0) * normal``
      (offsets along the normal ``row_cosine x column_cosine``; relative (``g_0 = 0``) and absolute offsets alike).
    """
    n = _number_of_frames(ds)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    out = []
    for k in range(n):
        group = per_frame[k] if k < len(per_frame) else None
        ipp = _plane_value(group, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None:
            ipp = _plane_value(shared, "PlanePositionSequence", "ImagePositionPatient")
        if ipp is None or len(ipp) != 3:
            out = []
            break
        out.append([float(v) for v in ipp])
    if out:
        return np.asarray(out, dtype=np.float64)
    offsets = ds.get("GridFrameOffsetVector")
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if offsets is not None and ipp is not None and iop is not None and len(iop) == 6:
        g = np.asarray([float(v) for v in (offsets if isinstance(offsets, (list, tuple)) else list(offsets))])
        if len(g) != n:
            raise DicomError(
                f"{describe_source(ds)} has {n} frames but GridFrameOffsetVector has {len(g)} values: the frame "
                "positions cannot be known. The file is inconsistent; re-export it."
            )
        normal = np.cross(np.asarray(iop[:3], float), np.asarray(iop[3:], float))
        return np.asarray(ipp, float)[None] + (g - g[0])[:, None] * normal[None]
    return None


def _frame_step(positions: np.ndarray, where: str) -> np.ndarray | None:
    """Vector (LPS mm) from one frame to the next, checking that the frames are equally spaced on a line.
    ``None`` when all frames are at one position (cine / time series: the frame axis is not spatial)."""
    steps = np.diff(positions, axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    if float(np.max(np.linalg.norm(positions - positions[0], axis=1))) < 1e-3:
        return None
    mean = (positions[-1] - positions[0]) / (len(positions) - 1)
    dev = float(np.max(np.linalg.norm(steps - mean, axis=1)))
    if dev > max(1e-3, 0.01 * float(np.linalg.norm(mean))):
        raise DicomError(
            f"{where}: the frames are not equally spaced along one line (steps between frame positions range from "
            f"{lengths.min():.4f} to {lengths.max():.4f} mm, up to {dev:.4f} mm off the mean step), so no single affine "
            "describes them. The object holds several stacks, time points or irregular slices: read one frame with "
            "read_dicom_image(..., frame=k), or resample it to a regular grid first."
        )
    return mean


def _geometry(
    view: Dataset, n_frames: int | None, positions: np.ndarray | None = None, where: str = ""
) -> tuple[np.ndarray, np.ndarray, bool]:
    """4x4 RAS affine, spacing and whether the pixel spacing was assumed, for a (H, W) frame, or a (F, H, W) stack
    when ``n_frames`` is given (``positions``: the stated position of each of those frames, see
    :func:`frame_positions`)."""
    spacing = view.get("PixelSpacing") or view.get("ImagerPixelSpacing")
    assumed = not spacing
    dr, dc = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
    iop = view.get("ImageOrientationPatient")
    if iop is not None and len(iop) == 6:
        row_cos, col_cos = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    else:
        row_cos, col_cos = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
    normal = np.cross(row_cos, col_cos)
    ipp = view.get("ImagePositionPatient")
    origin = np.asarray(ipp, float) if ipp is not None and len(ipp) == 3 else np.zeros(3)
    thickness = float(view.get("SpacingBetweenSlices") or view.get("SliceThickness") or 1.0)
    step = normal * thickness
    if positions is not None:
        origin = positions[0]
        if n_frames is not None and len(positions) > 1:
            frame_step = _frame_step(positions, where)
            step = frame_step if frame_step is not None else normal * thickness
    lps = np.eye(4)
    if n_frames is None:
        lps[:3, 0], lps[:3, 1], lps[:3, 2] = col_cos * dr, row_cos * dc, normal * thickness
        spacing_out = np.array([dr, dc])
    else:
        lps[:3, 0], lps[:3, 1], lps[:3, 2] = step, col_cos * dr, row_cos * dc
        spacing_out = np.array([float(np.linalg.norm(step)), dr, dc])
    lps[:3, 3] = origin
    return LPS_TO_RAS @ lps, spacing_out, assumed


def dicom_overlays(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Overlay planes (groups 6000-601E with Overlay Data) drawn on the image grid.

    Args:
        ds: the dataset.
        frame: frame of a multi-frame overlay to return.

    Returns:
        ``(K, H, W)`` uint8 array of 0/1, one plane per overlay group, placed at its ``OverlayOrigin``
        (``K == 0`` when there is none).
    """
    rows, cols = int(ds.Rows), int(ds.Columns)
    planes = []
    for group in range(0x6000, 0x6020, 2):
        if (group, 0x3000) not in ds:
            continue
        ov = np.asarray(ds.overlay_array(group))
        if ov.ndim == 3:
            ov = ov[min(frame, ov.shape[0] - 1)]
        canvas = np.zeros((rows, cols), dtype=np.uint8)
        origin = ds.get((group, 0x0050))
        r0, c0 = (int(origin.value[0]) - 1, int(origin.value[1]) - 1) if origin is not None else (0, 0)
        rs, cs = max(r0, 0), max(c0, 0)
        re, ce = min(r0 + ov.shape[0], rows), min(c0 + ov.shape[1], cols)
        if re > rs and ce > cs:
            canvas[rs:re, cs:ce] = ov[rs - r0 : re - r0, cs - c0 : ce - c0] > 0
        planes.append(canvas)
    if not planes:
        return np.zeros((0, rows, cols), dtype=np.uint8)
    return np.stack(planes)


def read_dicom_image(
    source: PathLike | Dataset,
    *,
    frame: int | None = None,
    modality_lut: bool = True,
    voi_lut: bool = False,
    voi_index: int = 0,
    prefer_voi_sequence: bool = True,
    invert_monochrome1: bool = True,
    dtype: Any = np.float32,
    force: bool = False,
) -> MetaTensor:
    """Read a single DICOM image (one or more frames) to a float ``MetaTensor``.

    By default only the modality LUT is applied (CT in HU, MR in its stored scale, RT Dose in Gy via
    ``DoseGridScaling``): the same values :func:`~monai_peft.transforms.load_volume` and
    :func:`~monai_peft.transforms.load_dicom_series` give, which is what a model trained on volumes or on values
    with a physical meaning should see. ``voi_lut=True`` adds the file's display window (values on the window's
    output scale, clipped outside it): use it only for models pre-trained on display-rendered images, e.g. chest
    X-rays exported as PNG/JPEG (:func:`~monai_peft.transforms.read_chest_xray` does so by default).

    Args:
        source: file path or an already-read ``pydicom`` dataset.
        frame: index of the frame to return for multi-frame objects (``None``: all frames).
        modality_lut: apply RescaleSlope/Intercept or the Modality LUT Sequence (and an RT Dose's
            ``DoseGridScaling``).
        voi_lut: also apply the VOI LUT Sequence or WindowCenter/Width when present (off by default, see above).
        voi_index: which of several windows / VOI LUTs to use.
        prefer_voi_sequence: when both a VOI LUT Sequence and a window exist, use the sequence.
        invert_monochrome1: invert MONOCHROME1 images inside their output range (bright = high).
        dtype: output dtype.
        force: read a file without the 128-byte preamble and ``DICM`` marker (old ACR-NEMA style).

    Returns:
        ``(1, H, W)`` (one frame), ``(1, F, H, W)`` (all frames) or ``(3, ...)`` (colour). Meta keys:
        ``affine`` (RAS), ``spacing``, ``value_range`` (range of the output values: the VOI output range if a VOI
        was applied, else the modality range), ``voi_applied``, ``photometric_interpretation``, ``modality``,
        ``sop_instance_uid``, ``filename_or_obj``, ``spacing_assumed`` (``True`` when the file has no PixelSpacing /
        ImagerPixelSpacing and 1.0 mm was used; a ``UserWarning`` says so too). For all frames of a multi-frame
        object the frame axis of the affine runs from each frame's stated position to the next
        (``PlanePositionSequence`` or ``GridFrameOffsetVector``; frames must be equally spaced).

    Raises:
        DicomError: not DICOM, truncated, no pixel data, ``frame`` out of range, or frames at unequally spaced
            positions (when all frames are read).
        MissingDependencyError: compressed pixel data without an installed decoder.
    """
    ds = source if isinstance(source, Dataset) else read_dicom_file(source, force=force)
    where = describe_source(source)
    pixels = decode_pixels(ds, source)
    n_frames = _number_of_frames(ds)
    samples = int(ds.get("SamplesPerPixel", 1))
    if n_frames == 1:
        pixels = pixels[None]  # (1, H, W[, 3])
    if frame is not None:
        if not -n_frames <= frame < n_frames:
            raise DicomError(f"{where} has {n_frames} frame(s); frame={frame} is out of range.")
        frame_ids = [frame % n_frames]
    else:
        frame_ids = list(range(n_frames))
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    views = [frame_dataset(ds, i) for i in frame_ids]
    if samples != 1:
        out = np.moveaxis(pixels[frame_ids].astype(np.float64), -1, 0)  # (3, F, H, W)
        value_range, voi_applied = _stored_range(ds), False
    else:
        frames, lows, highs, applied = [], [], [], []
        for view, i in zip(views, frame_ids):
            values, (lo, hi), did_voi = _apply_luts(
                pixels[i], view, modality_lut, voi_lut, voi_index, prefer_voi_sequence
            )
            if invert_monochrome1 and photometric == "MONOCHROME1":
                values = lo + hi - values
            frames.append(values)
            lows.append(lo)
            highs.append(hi)
            applied.append(did_voi)
        out = np.stack(frames)[None]  # (1, F, H, W)
        value_range, voi_applied = (min(lows), max(highs)), all(applied)
    single = len(frame_ids) == 1 and (frame is not None or n_frames == 1)
    if single:
        out = out[:, 0]
    positions = frame_positions(ds) if n_frames > 1 else None
    if positions is not None:
        positions = positions[frame_ids]
    affine, spacing, assumed = _geometry(views[0], None if single else len(frame_ids), positions, where)
    if assumed:
        warnings.warn(
            f"{where} has no PixelSpacing or ImagerPixelSpacing: 1.0 mm x 1.0 mm pixels are assumed (meta "
            "'spacing_assumed' is True). Physical sizes and resampling in mm are only as right as that guess.",
            UserWarning,
            stacklevel=2,
        )
    meta = {
        "affine": torch.as_tensor(affine, dtype=torch.float64),
        "original_affine": affine,
        "spacing": spacing,
        "value_range": np.asarray(value_range, dtype=np.float64),
        "voi_applied": voi_applied,
        "spacing_assumed": assumed,
        "photometric_interpretation": photometric,
        "modality": str(ds.get("Modality", "")),
        "sop_instance_uid": str(ds.get("SOPInstanceUID", "")),
        "filename_or_obj": str(source) if not isinstance(source, Dataset) else str(getattr(ds, "filename", "") or ""),
        "space": "RAS",
    }
    return MetaTensor(
        torch.as_tensor(np.ascontiguousarray(out), dtype=torch.float64).to(_torch_dtype(dtype)), meta=meta
    )


def _torch_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    return torch.from_numpy(np.zeros(0, dtype=dtype)).dtype


class LoadDicomImage(Transform):
    """Array transform: path (or dataset) of a single DICOM image -> float ``MetaTensor``.

    See :func:`read_dicom_image` for the arguments and output shapes. With ``return_overlays=True`` the call
    returns ``(image, overlays)`` where ``overlays`` is ``(K, H, W)`` uint8 (see :func:`dicom_overlays`).

    Example::

        img = LoadDicomImage()("ct.dcm")  # (1, H, W), modality LUT applied (HU), MONOCHROME1 inverted
        cxr = LoadDicomImage(voi_lut=True)("cxr.dcm")  # + the file's display window
    """

    def __init__(
        self,
        frame: int | None = None,
        modality_lut: bool = True,
        voi_lut: bool = False,
        voi_index: int = 0,
        prefer_voi_sequence: bool = True,
        invert_monochrome1: bool = True,
        dtype: Any = np.float32,
        return_overlays: bool = False,
        force: bool = False,
    ) -> None:
        self.force = force
        self.kwargs = dict(
            frame=frame,
            modality_lut=modality_lut,
            voi_lut=voi_lut,
            voi_index=voi_index,
            prefer_voi_sequence=prefer_voi_sequence,
            invert_monochrome1=invert_monochrome1,
            dtype=dtype,
        )
        self.return_overlays = return_overlays

    def __call__(self, source: PathLike | Dataset) -> MetaTensor | tuple[MetaTensor, np.ndarray]:
        ds = source if isinstance(source, Dataset) else read_dicom_file(source, force=self.force)
        img = read_dicom_image(ds, **self.kwargs)
        img.meta["filename_or_obj"] = str(source) if not isinstance(source, Dataset) else img.meta["filename_or_obj"]
        if not self.return_overlays:
            return img
        frame = self.kwargs["frame"] or 0
        return img, dicom_overlays(ds, frame=frame)


class LoadDicomImaged(MapTransform):
    """Dictionary version of :class:`LoadDicomImage`.

    Args:
        keys: keys holding DICOM file paths (or datasets); replaced by the loaded ``MetaTensor``.
        overlay_postfix: when set, overlay planes of ``key`` are stored under ``f"{key}_{overlay_postfix}"``
            as a ``(K, H, W)`` uint8 tensor.
        allow_missing_keys: skip absent keys.
        other arguments: see :func:`read_dicom_image`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        frame: int | None = None,
        modality_lut: bool = True,
        voi_lut: bool = False,
        voi_index: int = 0,
        prefer_voi_sequence: bool = True,
        invert_monochrome1: bool = True,
        dtype: Any = np.float32,
        overlay_postfix: str | None = None,
        allow_missing_keys: bool = False,
        force: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.overlay_postfix = overlay_postfix
        self.loader = LoadDicomImage(
            frame=frame,
            modality_lut=modality_lut,
            voi_lut=voi_lut,
            voi_index=voi_index,
            prefer_voi_sequence=prefer_voi_sequence,
            invert_monochrome1=invert_monochrome1,
            dtype=dtype,
            return_overlays=overlay_postfix is not None,
            force=force,
        )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            result = self.loader(d[key])
            if self.overlay_postfix is None:
                d[key] = result
            else:
                d[key], overlays = result
                d[f"{key}_{self.overlay_postfix}"] = torch.as_tensor(overlays)
        return d
