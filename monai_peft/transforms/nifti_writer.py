"""NIfTI writing that keeps the affine of the source image (nibabel; qform and sform both set, code 1 = scanner).

Writes are atomic: the file is written to a hidden temporary file in the target folder and renamed onto the final
name (``os.replace``) only when complete, so a failed (disk full, file-size limit) or killed write never leaves a
partial ``.nii.gz`` under the final name, and an earlier file of that name stays intact.
"""

from __future__ import annotations

import gzip
import os
import tempfile
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_io import PathLike

__all__ = ["SaveNiftid", "atomic_nib_save", "output_stem", "write_nifti"]


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_nib_save(img: nib.Nifti1Image, path: PathLike) -> Path:
    """``nib.save(img, path)`` through a temporary file in the same folder and ``os.replace``.

    The temporary file is hidden and ends in ``.tmp`` (``.<name>.<random>.tmp``), so a data-set glob for
    ``*.nii.gz`` never picks up what a killed write leaves; it is gzip-compressed when ``path`` ends in ``.gz``.
    On any error the temporary file is removed and the exception propagates: ``path`` is then untouched. The
    data are flushed to disk (``fsync``) before the rename; the file gets the usual ``0o666 & ~umask`` mode.
    """
    from nibabel.fileholders import FileHolder

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent))
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            if out.name.lower().endswith(".gz"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as stream:
                    img.to_file_map({"image": FileHolder(fileobj=stream)})
            else:
                img.to_file_map({"image": FileHolder(fileobj=raw)})
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _storage_dtype(arr: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is not None:
        return arr.astype(dtype)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float64:
        return arr.astype(np.float32)
    if arr.dtype == np.int64:
        info = np.iinfo(np.int32)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise InputDataError("int64 values exceed int32, which is the widest integer NIfTI viewers read.")
        return arr.astype(np.int32)
    return arr


def write_nifti(
    image: torch.Tensor | np.ndarray,
    path: PathLike,
    *,
    affine: np.ndarray | torch.Tensor | None = None,
    dtype: Any = None,
) -> Path:
    """Write a channel-first image to NIfTI with its affine.

    Args:
        image: ``(1, X, Y, Z)``, ``(C, X, Y, Z)`` (stored as ``X, Y, Z, C``) or ``(X, Y, Z)`` without channel
            only when ``affine`` is given. A ``MetaTensor`` brings its own RAS affine.
        path: output ``.nii`` / ``.nii.gz`` file (parent folders are created).
        affine: 4x4 voxel-to-RAS affine; default: ``image.affine``.
        dtype: storage dtype; default keeps the input (bool -> uint8, float64 -> float32, int64 -> int32).

    Returns:
        The written path. Reading it back with nibabel or MONAI gives the same array and affine. The write is
        atomic (temporary file in the same folder, then ``os.replace``): a failed write raises and leaves no file
        under ``path`` (an earlier file there is kept).

    Raises:
        InputDataError: no affine available, or a shape that is not channel-first 3D.
    """
    if affine is None:
        if not isinstance(image, MetaTensor):
            raise InputDataError(
                "write_nifti needs the affine of the image: pass a MetaTensor or affine=. Writing without it "
                "would lose the image's position in the patient."
            )
        affine = image.affine
    aff = affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 4:
        arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    elif arr.ndim != 3 or isinstance(image, MetaTensor):  # a bare (X, Y, Z) array is fine with an explicit affine
        raise InputDataError(
            f"write_nifti expects a channel-first 3D image (C, X, Y, Z), got shape {tuple(arr.shape)}."
        )
    arr = _storage_dtype(np.ascontiguousarray(arr), dtype)
    img = nib.Nifti1Image(arr, aff.astype(np.float64))
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    if not Path(path).name.lower().endswith((".nii", ".nii.gz")):
        raise InputDataError(f"write_nifti writes .nii or .nii.gz files, got '{path}'.")
    return atomic_nib_save(img, path)


def output_stem(source: Any) -> str:
    """File-name stem for outputs derived from ``source`` (a path, folder, or a MetaTensor's filename_or_obj)."""
    name = Path(str(source)).name if source else "image"
    for suffix in (".nii.gz", ".nii", ".nrrd", ".nhdr", ".dcm", ".mha", ".mhd", ".png", ".jpg", ".jpeg"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name or "image"


class SaveNiftid(MapTransform):
    """Save ``d[key]`` to ``output_dir/<source stem>_<postfix>.nii.gz`` keeping its affine.

    The stem comes from ``d[key].meta["filename_or_obj"]`` (a DICOM folder gives the folder name). The written
    path is stored in ``d[key].meta["saved_to"]``.

    Args:
        keys: keys to save.
        output_dir: output folder.
        output_postfix: appended to the stem (e.g. ``"seg"``).
        dtype: storage dtype (see :func:`write_nifti`).
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: PathLike,
        output_postfix: str = "",
        dtype: Any = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.output_dir = Path(output_dir)
        self.output_postfix = output_postfix
        self.dtype = dtype

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = getattr(img, "meta", {})
            stem = output_stem(meta.get("filename_or_obj"))
            name = f"{stem}_{self.output_postfix}" if self.output_postfix else stem
            path = write_nifti(img, self.output_dir / f"{name}.nii.gz", dtype=self.dtype)
            if isinstance(img, MetaTensor):
                img.meta["saved_to"] = os.fspath(path)
        return d
