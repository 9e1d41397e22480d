"""Atomic prediction writers: NIfTI named after the case and, for DICOM input, a DICOM SEG referencing the series.

Every file is written to a temporary file in the destination folder and moved into place with ``os.replace``
(atomic on POSIX and Windows within one file system): a failed write leaves no partial file, and an earlier output
of the same name stays intact until the new one is complete. All outputs of one case are finished before any is
moved into place, so a case gets all its outputs or none.

:class:`SavePredictiond` is the dictionary transform a bundle puts at the end of its ``postprocessing``, after the
prediction was inverted to the input's grid (:class:`~monai_peft.inference.InvertToOriginald`).
"""

from __future__ import annotations

import os
import secrets
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from monai_peft.errors import InputDataError, MonaiPeftError

__all__ = [
    "OutputDirError",
    "SavePredictiond",
    "atomic_write",
    "case_name",
    "check_output_dir",
    "write_prediction_nifti",
]

_NIFTI_EXT = (".nii.gz", ".nii")
_KNOWN_EXT = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".dcm", ".png", ".jpg", ".jpeg", ".npz", ".npy")


class OutputDirError(MonaiPeftError, PermissionError):
    """The output folder cannot be created or written to."""


def check_output_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` if needed and prove that files can be created in it (a probe file is written and removed).

    Call it before any work starts, so a run fails in a second instead of after the first case was predicted.

    Raises:
        OutputDirError: the folder cannot be created (e.g. a parent is a file) or is not writable; the message
            names the folder and what to do.
    """
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"the output path {out} exists and is not a folder; choose a folder for the outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputDirError(
            f"cannot create the output folder {out}: {exc.strerror or exc}. Choose another folder "
            "(bundle: --output_dir /writable/folder)"
        ) from exc
    probe = out / f".write-probe-{secrets.token_hex(6)}"
    try:
        with open(probe, "wb") as f:
            f.write(b"ok")
    except OSError as exc:
        raise OutputDirError(
            f"the output folder {out} is not writable ({exc.strerror or exc}). Fix its permissions or choose "
            "another folder (bundle: --output_dir /writable/folder)"
        ) from exc
    finally:
        probe.unlink(missing_ok=True)
    return out


def _split_ext(name: str) -> tuple[str, str]:
    low = name.lower()
    for ext in _KNOWN_EXT:
        if low.endswith(ext):
            return name[: -len(ext)], name[-len(ext) :]
    stem, dot, ext = name.rpartition(".")
    return (stem, f".{ext}") if dot and stem else (name, "")


def _temp_path(final: Path) -> Path:
    stem, ext = _split_ext(final.name)
    return final.with_name(f".{stem}.tmp-{secrets.token_hex(6)}{ext}")  # same folder, same extension


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> Path:
    """Write ``path`` atomically: ``write(temp_path)`` then ``os.replace(temp_path, path)``.

    ``temp_path`` is in the same folder and ends with the same extension (so writers that choose the format from
    the name, like nibabel's ``.nii.gz``, behave the same). On any error the temporary file is removed and the
    error re-raised; an existing ``path`` is left untouched.
    """
    final = Path(path)
    tmp = _temp_path(final)
    try:
        write(tmp)
        if not tmp.is_file():
            raise OSError(f"the writer did not create {tmp}")
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return final


def case_name(source: Any, fallback: str = "case") -> str:
    """Name of a case from its source: a file's name without extension, a folder's name (DICOM series or a
    per-case folder of modality files), or the common folder of a list of files.

    Examples: ``"BraTS_001.nii.gz" -> "BraTS_001"``, ``"ct_dicom_series/" -> "ct_dicom_series"``,
    ``["pat3/Flair.nii.gz", "pat3/T1c.nii.gz"] -> "pat3"``.
    """
    if isinstance(source, (list, tuple)):
        paths = [Path(str(s)) for s in source if s]
        if not paths:
            return fallback
        if len(paths) == 1:
            return case_name(paths[0], fallback)
        parents = {p.parent for p in paths}
        if len(parents) == 1:
            return next(iter(parents)).name or fallback
        return case_name(paths[0], fallback)
    if source is None or source == "":
        return fallback
    p = Path(str(source))
    name = p.name
    if not name:
        return fallback
    if p.is_dir():
        return name
    stem, _ = _split_ext(name)
    return stem or fallback


def _array_for_nifti(image: torch.Tensor | np.ndarray) -> np.ndarray:
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 3:  # (C, H, W): a 2D prediction, stored as (H, W, 1[, C])
        arr = arr[:, :, :, None]
    if arr.ndim != 4:
        raise InputDataError(
            f"a prediction to write must be channel-first (C, X, Y, Z) or (C, H, W), got shape {tuple(arr.shape)}; "
            "remove the batch axis first (monai.data.decollate_batch)"
        )
    arr = arr[0] if arr.shape[0] == 1 else np.moveaxis(arr, 0, -1)
    return np.ascontiguousarray(arr)


def _storage(arr: np.ndarray, dtype: Any) -> np.ndarray:
    if dtype is not None:
        return arr.astype(dtype)
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    integral = np.issubdtype(arr.dtype, np.integer) or (
        arr.size > 0 and np.all(np.isfinite(arr)) and np.array_equal(arr, np.round(arr))
    )
    if integral and arr.size:
        lo, hi = float(arr.min()), float(arr.max())
        for cand in (np.uint8, np.int16, np.int32):
            info = np.iinfo(cand)
            if info.min <= lo and hi <= info.max:
                return arr.astype(cand)
        raise InputDataError(f"label values {lo}..{hi} exceed int32, the widest integer NIfTI viewers read")
    return arr.astype(np.float32)


def write_prediction_nifti(
    pred: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    *,
    affine: np.ndarray | torch.Tensor | None = None,
    reference: str | os.PathLike | None = None,
    dtype: Any = None,
    atol: float = 1e-3,
) -> Path:
    """Write a channel-first prediction to NIfTI atomically.

    Args:
        pred: ``(C, X, Y, Z)`` (``C == 1`` is stored as ``X, Y, Z``, else ``X, Y, Z, C``) or ``(C, H, W)``; a
            ``MetaTensor`` brings its affine.
        path: the ``.nii.gz`` / ``.nii`` file.
        affine: 4x4 voxel-to-RAS affine (default: ``pred.affine``).
        reference: the input NIfTI the prediction belongs to. When the prediction is on its grid (same shape,
            affine within ``atol`` mm), the reference's header is reused (qform/sform and their codes), so the
            output's affine read back by nibabel / ITK equals the input's bit for bit.
        dtype: storage dtype; default: labels (integer values) in the smallest of uint8 / int16 / int32, other
            values in float32.
        atol: tolerance (mm) of the grid match with ``reference``.

    Returns:
        The written path.
    """
    if affine is None:
        if not isinstance(pred, MetaTensor):
            raise InputDataError(
                "write_prediction_nifti needs the prediction's affine: pass a MetaTensor or affine=; writing without "
                "it would lose the prediction's position in the patient"
            )
        affine = pred.affine
    img = _nifti_image(pred, affine, reference, dtype, atol)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(out, lambda tmp: img.to_filename(str(tmp)))


def _nifti_image(
    pred: torch.Tensor | np.ndarray,
    affine: np.ndarray | torch.Tensor,
    reference: str | os.PathLike | None,
    dtype: Any,
    atol: float,
) -> Any:
    """The ``nibabel.Nifti1Image`` to save: the reference's header when on its grid, else qform = sform = affine."""
    import nibabel as nib

    aff = (affine.detach().cpu().numpy() if isinstance(affine, torch.Tensor) else np.asarray(affine)).astype(np.float64)
    arr = _storage(_array_for_nifti(pred), dtype)
    if reference is not None and str(reference).lower().endswith(_NIFTI_EXT) and Path(reference).is_file():
        ref = nib.load(str(reference))
        if tuple(ref.shape[:3]) == tuple(arr.shape[:3]) and np.allclose(ref.affine, aff, atol=atol, rtol=0):
            img = nib.Nifti1Image(arr, np.asarray(ref.affine, dtype=np.float64), header=ref.header.copy())
            img.set_data_dtype(arr.dtype)
            img.header.set_slope_inter(1.0, 0.0)
            return img
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    return img


def _dicom_series_source(meta: Mapping[str, Any]) -> tuple[str, str | None] | None:
    """(folder, SeriesInstanceUID or None) when the case was loaded from a DICOM series folder.

    The DICOM loaders (:func:`monai_peft.transforms.load_dicom_series`, ``LoadVolumed``) put the folder in
    ``filename_or_obj`` and the series UIDs in the meta (an anonymised series may have an empty UID).
    """
    src = meta.get("filename_or_obj")
    if isinstance(src, (list, tuple)):
        src = src[0] if len(src) == 1 else None
    if not src or not Path(str(src)).is_dir():
        return None
    if "series_instance_uid" not in meta and "sop_instance_uids" not in meta:
        return None
    uid = meta.get("series_instance_uid")
    return str(src), (str(uid) if uid else None)


def _source_file(meta: Mapping[str, Any]) -> str | None:
    src = meta.get("filename_or_obj")
    if isinstance(src, (list, tuple)):
        src = src[0] if src else None
    return str(src) if src else None


class SavePredictiond(MapTransform):
    """Write ``d[key]`` for one case as ``output_dir/<case>_<postfix>.nii.gz`` and, for DICOM input, a DICOM SEG.

    The prediction must already be on the input's grid (invert the preprocessing first with
    :class:`~monai_peft.inference.InvertToOriginald`) and hold one case ``(C, X, Y, Z)``; label maps ``(1, X, Y, Z)``
    are what a DICOM SEG can store.

    The case name comes from ``d[case_key]`` when present, else from the source in the prediction's (or
    ``d[source_key]``'s) ``meta["filename_or_obj"]`` (see :func:`case_name`): a NIfTI file gives its name, a DICOM
    series folder or a per-case folder of modality files gives the folder's name.

    Args:
        keys: prediction key(s).
        output_dir: output folder; created and checked for writability when the transform is built, so a bad
            folder fails before any case is predicted.
        output_postfix: appended to the case name (``""`` for none).
        source_key: key of the input image (its meta names the source).
        case_key: key of an explicit case name in the data dict.
        nifti: write the NIfTI file.
        dicom_seg: ``"auto"`` (when the input was a DICOM series), True (required: raise otherwise) or False.
        seg_kwargs: passed to :func:`monai_peft.transforms.write_dicom_seg` (segment names, colours, codes ...).
        dtype: NIfTI storage dtype (default: see :func:`write_prediction_nifti`).
        separate_folder: put each case's files in ``output_dir/<case>/``.
        allow_missing_keys: skip absent keys.

    After the call, ``d[key].meta["saved_to"]`` is the NIfTI path and ``d[key].meta["saved_seg_to"]`` the SEG path
    (or None).
    """

    def __init__(
        self,
        keys: KeysCollection,
        output_dir: str | os.PathLike,
        output_postfix: str = "seg",
        source_key: str = "image",
        case_key: str = "case_name",
        nifti: bool = True,
        dicom_seg: bool | str = "auto",
        seg_kwargs: Mapping[str, Any] | None = None,
        dtype: Any = None,
        separate_folder: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if dicom_seg not in (True, False, "auto"):
            raise ValueError(f"dicom_seg must be True, False or 'auto', got {dicom_seg!r}")
        if not nifti and dicom_seg is False:
            raise ValueError("SavePredictiond with nifti=False and dicom_seg=False would write nothing")
        self.output_dir = check_output_dir(output_dir)
        self.output_postfix = str(output_postfix or "")
        self.source_key = source_key
        self.case_key = case_key
        self.nifti = bool(nifti)
        self.dicom_seg = dicom_seg
        self.seg_kwargs = dict(seg_kwargs or {})
        self.dtype = dtype
        self.separate_folder = bool(separate_folder)

    def _meta(self, d: Mapping[Hashable, Any], pred: Any) -> dict[str, Any]:
        meta: dict[str, Any] = {}
        src = d.get(self.source_key)
        if isinstance(src, MetaTensor):
            meta.update(src.meta)
        if isinstance(pred, MetaTensor):
            meta.update({k: v for k, v in pred.meta.items() if v is not None})
        return meta

    def _case(self, d: Mapping[Hashable, Any], meta: Mapping[str, Any]) -> str:
        explicit = d.get(self.case_key)
        if isinstance(explicit, str) and explicit:
            name = explicit
        else:
            name = case_name(meta.get("filename_or_obj"))
        if any(c in name for c in "/\\") or name in (".", ".."):
            raise InputDataError(f"case name {name!r} is not a valid file name")
        return name

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if isinstance(pred, torch.Tensor) and pred.ndim == 5 and pred.shape[0] == 1 and pred.shape[1] <= 1:
                raise InputDataError(
                    f"d[{key!r}] has a batch axis (shape {tuple(pred.shape)}); write one case at a time "
                    "(monai.data.decollate_batch first, as bundle postprocessing does)"
                )
            meta = self._meta(d, pred)
            case = self._case(d, meta)
            folder = self.output_dir / case if self.separate_folder else self.output_dir
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{case}_{self.output_postfix}" if self.output_postfix else case
            dicom = _dicom_series_source(meta)
            if self.dicom_seg is True and dicom is None:
                raise InputDataError(
                    f"case {case!r}: dicom_seg=True needs a DICOM series input (meta 'filename_or_obj' a series folder "
                    "and 'series_instance_uid'), but the input was not loaded from one"
                )
            jobs: list[tuple[Path, Callable[[Path], Any]]] = []
            source_file = _source_file(meta)
            if self.nifti:
                target = folder / f"{stem}.nii.gz"
                self._refuse_input_overwrite(target, meta)
                reference = source_file if source_file and source_file.lower().endswith(_NIFTI_EXT) else None
                jobs.append((target, self._nifti_job(pred, reference)))
            if dicom is not None and self.dicom_seg in (True, "auto"):
                job = self._seg_job(pred, dicom, case)
                if job is not None:
                    jobs.append((folder / f"{stem}.dcm", job))
            written = self._commit(jobs, case)
            if isinstance(pred, MetaTensor):
                pred.meta["saved_to"] = str(written[0]) if self.nifti and written else None
                pred.meta["saved_seg_to"] = next((str(p) for p in written if p.suffix == ".dcm"), None)
        return d

    @staticmethod
    def _refuse_input_overwrite(target: Path, meta: Mapping[str, Any]) -> None:
        src = meta.get("filename_or_obj")
        sources = src if isinstance(src, (list, tuple)) else [src]
        for s in sources:
            if s and Path(str(s)).exists() and Path(str(s)).resolve() == target.resolve():
                raise InputDataError(
                    f"the output {target} would overwrite the input image; choose another output_dir or postfix"
                )

    def _nifti_job(self, pred: Any, reference: str | None) -> Callable[[Path], Any]:
        if not isinstance(pred, MetaTensor):
            raise InputDataError(
                "SavePredictiond needs the prediction as a MetaTensor with its affine (invert the preprocessing with "
                "InvertToOriginald, which keeps the meta)"
            )
        img = _nifti_image(pred, pred.affine, reference, self.dtype, 1e-3)
        return lambda tmp: img.to_filename(str(tmp))

    def _seg_job(self, pred: Any, dicom: tuple[str, str | None], case: str) -> Callable[[Path], Any] | None:
        from monai_peft.transforms.dicom_seg import write_dicom_seg

        folder, uid = dicom
        arr = pred.detach().cpu() if isinstance(pred, torch.Tensor) else torch.as_tensor(np.asarray(pred))
        if arr.ndim == 4 and arr.shape[0] != 1:
            raise InputDataError(
                f"case {case!r}: a DICOM SEG stores one label map (1, X, Y, Z), but the prediction has {arr.shape[0]} "
                "channels; add AsDiscreted(argmax=True) to the postprocessing before saving"
            )
        if not bool((arr != 0).any()):
            warnings.warn(
                f"case {case!r}: the prediction has no foreground, so no DICOM SEG is written (a SEG needs at least "
                "one segment); the NIfTI output is written as usual",
                UserWarning,
                stacklevel=3,
            )
            return None
        label = pred if isinstance(pred, MetaTensor) else arr

        def job(tmp: Path) -> None:
            write_dicom_seg(label, folder, tmp, series_uid=uid, **self.seg_kwargs)

        return job

    @staticmethod
    def _commit(jobs: Sequence[tuple[Path, Callable[[Path], Any]]], case: str) -> list[Path]:
        """Write every job to its temporary file; only when all succeeded, move them into place."""
        temps: list[tuple[Path, Path]] = []
        try:
            for final, job in jobs:
                tmp = _temp_path(final)
                temps.append((tmp, final))
                job(tmp)
                if not tmp.is_file():
                    raise OSError(f"the writer did not create {tmp}")
        except BaseException as exc:
            for tmp, _ in temps:
                tmp.unlink(missing_ok=True)
            if isinstance(exc, (MonaiPeftError, KeyboardInterrupt)):
                raise
            raise OSError(
                f"writing the outputs of case {case!r} failed ({type(exc).__name__}: {exc}); nothing was "
                "written for this case and earlier outputs are intact"
            ) from exc
        out = []
        for tmp, final in temps:
            os.replace(tmp, final)
            out.append(final)
        return out
