"""Chest X-ray loading from DICOM or PNG/JPEG/TIFF to a ``(1, H, W)`` float image in ``[0, 1]``.

DICOM goes through :func:`read_dicom_image` (modality LUT, VOI LUT / window, MONOCHROME1 inversion); then values
are mapped to ``[0, 1]``:

* ``"range"``: by the known output range of the last LUT stage (the VOI output range when a window / VOI LUT was
  applied) - the radiologist's display, identical for every image with the same window;
* ``"minmax"``: by the image's own min and max;
* ``"auto"`` (default): ``"range"`` when a VOI LUT was applied (DICOM) or for 8-bit files, else ``"minmax"``
  (raw 12-16 bit data rarely fills its nominal range).

Colour inputs are converted to grayscale (ITU-R 601 luma). Output is row-major ``(1, H, W)`` (not MONAI's PIL
``(1, W, H)``), the layout 2D backbones are trained on.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from pydicom.dataset import Dataset

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_image import read_dicom_image
from monai_peft.transforms.dicom_io import PathLike, is_dicom_file

__all__ = ["IMAGE_SUFFIXES", "LoadChestXray", "LoadChestXrayd", "read_chest_xray", "scale_to_unit"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_LUMA = np.array([0.299, 0.587, 0.114])
Scaling = Literal["auto", "range", "minmax"]


def scale_to_unit(values: np.ndarray, mode: Literal["range", "minmax"], value_range: tuple[float, float]) -> np.ndarray:
    """Map ``values`` to ``[0, 1]`` by ``value_range`` (clipped) or by their own min/max (constant -> 0)."""
    if mode == "range":
        lo, hi = float(value_range[0]), float(value_range[1])
    else:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros_like(values, dtype=np.float64)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def _read_pil(path: Path) -> tuple[np.ndarray, tuple[float, float], bool]:
    """Grayscale values, their nominal range, and whether the file is 8-bit."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("RGB", "RGBA", "P", "LA", "CMYK", "YCbCr"):
                arr = np.asarray(im.convert("RGB"), dtype=np.float64) @ _LUMA
                return arr, (0.0, 255.0), True
            if mode in ("L", "1"):
                arr = np.asarray(im.convert("L"), dtype=np.float64)
                return arr, (0.0, 255.0), True
            arr = np.asarray(im, dtype=np.float64)
            if mode.startswith("I;16") or mode == "I":
                return arr, (0.0, 65535.0), False
            return arr, (float(arr.min()), float(arr.max())), False
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise InputDataError(f"'{path}' is not a readable image file ({exc}). Re-export it as PNG/JPEG/DICOM.") from exc


def read_chest_xray(
    source: PathLike | Dataset,
    *,
    voi_lut: bool = True,
    invert_monochrome1: bool = True,
    scaling: Scaling = "auto",
    frame: int = 0,
) -> MetaTensor:
    """Load a chest X-ray (DICOM or PNG/JPEG/TIFF/BMP) as a ``(1, H, W)`` float32 ``MetaTensor`` in ``[0, 1]``.

    Args:
        source: file path or ``pydicom`` dataset.
        voi_lut: apply the DICOM VOI LUT / window.
        invert_monochrome1: invert MONOCHROME1 DICOM so that bone is bright.
        scaling: ``"auto"``, ``"range"`` or ``"minmax"`` (see the module docstring).
        frame: frame of a multi-frame DICOM.

    Raises:
        InputDataError: missing path or unreadable image; DicomError / MissingDependencyError for DICOM problems.
    """
    if isinstance(source, Dataset) or (Path(source).is_file() and is_dicom_file(source)):
        img = read_dicom_image(source, frame=frame, voi_lut=voi_lut, invert_monochrome1=invert_monochrome1)
        values = img.numpy().astype(np.float64)
        if values.shape[0] == 3:  # colour DICOM (secondary capture)
            values = np.tensordot(_LUMA, values, axes=(0, 0))[None]
        value_range = tuple(img.meta["value_range"])
        mode = scaling if scaling != "auto" else ("range" if img.meta["voi_applied"] else "minmax")
        out = scale_to_unit(values, mode, value_range)
        meta = dict(img.meta)
        meta["scaling"] = mode
        return MetaTensor(torch.as_tensor(out, dtype=torch.float32), meta=meta)
    path = Path(source)
    if not path.exists():
        raise InputDataError(f"chest X-ray file '{path}' does not exist. Check the path.")
    if path.suffix.lower() not in IMAGE_SUFFIXES and path.suffix.lower() != ".dcm":
        raise InputDataError(
            f"'{path}' is neither DICOM (no 'DICM' marker) nor an image file ({', '.join(IMAGE_SUFFIXES)})."
        )
    if path.suffix.lower() == ".dcm":
        read_dicom_image(path)  # raises the specific DicomError (not DICOM, truncated ...)
    values, value_range, eight_bit = _read_pil(path)
    mode = scaling if scaling != "auto" else ("range" if eight_bit else "minmax")
    out = scale_to_unit(values, mode, value_range)[None]
    meta = {  # same keys as the DICOM branch so mixed DICOM/PNG batches collate
        "affine": torch.eye(4, dtype=torch.float64),
        "original_affine": np.eye(4),
        "spacing": np.array([1.0, 1.0]),
        "value_range": np.asarray(value_range, dtype=np.float64),
        "voi_applied": False,
        "photometric_interpretation": "MONOCHROME2",
        "modality": "",
        "sop_instance_uid": "",
        "filename_or_obj": str(path),
        "space": "RAS",
        "scaling": mode,
    }
    return MetaTensor(torch.as_tensor(out, dtype=torch.float32), meta=meta)


class LoadChestXray(Transform):
    """Array transform version of :func:`read_chest_xray`: path -> ``(1, H, W)`` float32 in ``[0, 1]``."""

    def __init__(
        self, voi_lut: bool = True, invert_monochrome1: bool = True, scaling: Scaling = "auto", frame: int = 0
    ) -> None:
        self.kwargs = dict(voi_lut=voi_lut, invert_monochrome1=invert_monochrome1, scaling=scaling, frame=frame)

    def __call__(self, source: PathLike | Dataset) -> MetaTensor:
        return read_chest_xray(source, **self.kwargs)


class LoadChestXrayd(MapTransform):
    """Dictionary version of :class:`LoadChestXray` (replaces each key's path by the loaded image)."""

    def __init__(
        self,
        keys: KeysCollection,
        voi_lut: bool = True,
        invert_monochrome1: bool = True,
        scaling: Scaling = "auto",
        frame: int = 0,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadChestXray(voi_lut, invert_monochrome1, scaling, frame)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
