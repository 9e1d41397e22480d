"""Build a MONAI datalist (``[{"image": ..., "case": ...}, ...]``) from a folder of unlabelled cases.

A bundle's ``inference.json`` points ``--dataset_dir`` at the user's studies; this module turns that into the list of
dictionaries that ``monai.data.Dataset`` takes, and fails early (headers only, before any case is predicted),
naming the file or folder and saying what to do, when the input is unusable. Layouts (they may be mixed in one
folder):

* one image file per case: ``case01.nii.gz``, ``patient7.png``, ``xray.dcm`` (case name = file name without
  extension). With ``modalities`` (a multi-channel bundle), such a file must hold every modality as a channel
  (a 4D NIfTI ``X, Y, Z, C``; its channel count is checked against ``len(modalities)`` from the header);
* one sub-folder per case holding one entry per modality named as in ``modalities``
  (e.g. ``["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]`` or ``["flair", "t1c"]``); an entry is
  a file (NIfTI ...) or a folder holding that modality's DICOM series (``case/flair/*.dcm``); a folder named after
  the file name without its extension also matches (``case/Flair_subtrMeanDivStd/*.dcm``). ``"image"`` is then
  the list of paths in the order of ``modalities`` (case name = sub-folder name);
* one sub-folder per case holding the slices of one DICOM series (``"image"`` = the folder; case name = folder
  name). With several ``modalities`` this is refused: one series is one modality, so each needs its own folder.

``dataset_dir`` may also be a single file / case folder / series folder, or a list of files and folders (each one
case; with ``modalities``, a list of exactly ``len(modalities)`` single-channel files or DICOM series folders is
one multi-modal case).

``spatial_dims`` tells what the bundle's network takes: with ``2`` (radiographs), 3D volumes (a DICOM series
folder, a multi-frame DICOM, a 3D NIfTI) are refused, and a sub-folder holding one image file is that case;
with ``3``, 2D image files (PNG, JPEG ...) and 2D NIfTI files are refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai_peft.errors import InputDataError

__all__ = ["DEFAULT_EXTENSIONS", "datalist_from_dir"]

logger = logging.getLogger(__name__)

#: file name endings that count as one image (matched case-insensitively); DICOM files without a suffix are
#: recognised by their ``DICM`` preamble.
DEFAULT_EXTENSIONS: tuple[str, ...] = (
    ".nii.gz",
    ".nii",
    ".nrrd",
    ".mha",
    ".dcm",
    ".png",
    ".jpg",
    ".jpeg",
    ".tif",
    ".tiff",
    ".bmp",
)
#: 2D-only image formats (refused by a 3D bundle).
_FLAT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
_NIFTI_EXTENSIONS = (".nii.gz", ".nii")


def _case_name(path: str | os.PathLike, extensions: Sequence[str] = DEFAULT_EXTENSIONS) -> str:
    """Name of a case: the folder name, or the file name without its (possibly double, ``.nii.gz``) extension."""
    p = Path(path)
    name = p.name
    if p.is_dir():
        return name
    for ext in sorted(extensions, key=len, reverse=True):
        if name.lower().endswith(ext.lower()):
            return name[: -len(ext)]
    return p.stem


def _has_extension(path: Path, extensions: Sequence[str]) -> bool:
    name = path.name.lower()
    return any(name.endswith(e.lower()) for e in extensions)


def _is_dicom(path: Path) -> bool:
    from monai_peft.transforms.dicom_io import is_dicom_file

    try:
        return path.is_file() and is_dicom_file(path)
    except OSError:
        return False


def _check_readable(path: Path) -> None:
    if not path.exists():
        raise InputDataError(f"input '{path}' does not exist. Check the path given as --dataset_dir.")
    if path.is_file():
        if not os.access(path, os.R_OK):
            raise InputDataError(f"input file '{path}' is not readable (permission denied). Fix its permissions.")
        if path.stat().st_size == 0:
            raise InputDataError(f"input file '{path}' is empty (0 bytes). Re-copy or re-export it.")
    elif not os.access(path, os.R_OK | os.X_OK):
        raise InputDataError(f"input folder '{path}' is not readable (permission denied). Fix its permissions.")


def _visible(folder: Path) -> list[Path]:
    """Entries of ``folder`` that can be cases: hidden files and a DICOMDIR index are left out."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.name.upper() != "DICOMDIR")


def _holds_dicom(folder: Path) -> bool:
    """True when ``folder`` directly holds at least one DICOM file (a series folder)."""
    return folder.is_dir() and any(_is_dicom(p) for p in _visible(folder))


def _nifti_shape(path: Path) -> tuple[int, ...] | None:
    """The data shape in a NIfTI header (``None`` for other formats); an unreadable header names the file."""
    if not path.name.lower().endswith(_NIFTI_EXTENSIONS):
        return None
    import nibabel as nib

    try:
        return tuple(int(s) for s in nib.load(str(path)).header.get_data_shape())
    except Exception as exc:  # nibabel raises many types for a damaged header
        raise InputDataError(
            f"input file '{path}' could not be read as NIfTI ({type(exc).__name__}: {exc}). Check that it is "
            "complete (re-copy or re-export it) and really a NIfTI file."
        ) from exc


def _nifti_channels(shape: tuple[int, ...]) -> int:
    """Channels of a NIfTI data shape: ``X, Y, Z`` -> 1, ``X, Y, Z, C`` -> C, ``X, Y, Z, 1, C`` -> C."""
    if len(shape) <= 3:
        return 1
    if len(shape) == 4:
        return shape[3]
    return shape[4] if shape[3] == 1 else shape[3] * shape[4]


def _series_summary(folder: Path) -> tuple[int, str]:
    """(number of series, a one-line description of each) of the DICOM files directly in ``folder``."""
    from monai_peft.transforms.dicom_series import scan_dicom_folder

    groups, _ = scan_dicom_folder(folder)
    parts = []
    for uid, members in groups.items():
        ds = members[0][1]
        desc = str(ds.get("SeriesDescription", "") or "").strip()
        label = f"'{desc}'" if desc else f"series number {ds.get('SeriesNumber', '?')}"
        parts.append(f"{label}: {len(members)} file(s), SeriesInstanceUID {uid or '(empty)'}")
    return len(groups), "; ".join(parts)


def _series_case(folder: Path, spatial_dims: int | None = None) -> dict[str, Any]:
    """Validate a DICOM series folder (headers only): no images / several series raise ``DicomError``."""
    from monai_peft.transforms.dicom_series import find_dicom_series

    series = find_dicom_series(folder)
    if spatial_dims == 2:
        raise InputDataError(
            f"'{folder}' is a DICOM series of {len(series.paths)} slice(s) (a 3D volume), but this bundle takes 2D "
            "images (radiographs): give the image files themselves, one file per case (a folder of .dcm/.png "
            "files, or a list of files)."
        )
    return {"image": str(folder), "case": folder.name}


def _layout_hint(folder: Path, modalities: Sequence[str]) -> str:
    names = [_case_name(m) for m in modalities]
    subs = ", ".join(f"'{folder}/{n}/*.dcm'" for n in names)
    return (
        f"Lay out the case as one sub-folder per modality, each holding that modality's series only ({subs}) and "
        f'pass their names in channel order (--modalities "{names}"); or convert the case to one NIfTI file per '
        f"modality ({list(modalities)}), or one 4D NIfTI with {len(modalities)} channels."
    )


def _single_series_refusal(folder: Path, modalities: Sequence[str]) -> InputDataError:
    """The error for a case folder that is itself a DICOM series folder when several modalities are needed."""
    try:
        n, listing = _series_summary(folder)
    except InputDataError:
        n, listing = 0, ""
    what = (
        "is a single DICOM series folder (one image)"
        if n <= 1
        else f"holds {n} DICOM series mixed in one folder ({listing})"
    )
    return InputDataError(
        f"case folder '{folder}' {what}, but this bundle takes {len(modalities)} modalities {list(modalities)} as "
        "channels, and one DICOM series holds one modality. " + _layout_hint(folder, modalities)
    )


def _modality_path(folder: Path, modality: str) -> Path | None:
    """``folder/modality`` (file or series folder), else ``folder/<modality without extension>`` if a folder."""
    p = folder / modality
    if p.exists():
        return p
    stem = _case_name(modality)
    q = folder / stem
    return q if stem != modality and q.is_dir() else None


def _modality_entry(path: Path, folder: Path, modality: str, spatial_dims: int | None = None) -> str:
    _check_readable(path)
    if path.is_file():
        shape = _nifti_shape(path)
        _check_spatial(path, shape, spatial_dims)
        if shape is not None and _nifti_channels(shape) != 1:
            raise InputDataError(
                f"modality file '{path}' holds {_nifti_channels(shape)} channels (shape {shape}); each modality "
                "file must be one single-channel volume. Split it, or give it alone as a multi-channel case."
            )
    else:
        from monai_peft.errors import DicomError
        from monai_peft.transforms.dicom_series import find_dicom_series

        try:
            find_dicom_series(path)
        except DicomError as exc:
            raise type(exc)(
                f"modality '{modality}' of case '{folder.name}' is the folder '{path}', which must hold exactly one "
                f"DICOM series (that modality's slices): {exc}"
            ) from None
    return str(path)


def _modality_case(folder: Path, modalities: Sequence[str], spatial_dims: int | None = None) -> dict[str, Any]:
    paths: list[str] = []
    for modality in modalities:
        p = _modality_path(folder, modality)
        if p is None:
            if len(modalities) > 1 and _holds_dicom(folder):
                raise _single_series_refusal(folder, modalities)
            if len(modalities) == 1 and _holds_dicom(folder):
                return {"image": [_modality_entry(folder, folder, modality, spatial_dims)], "case": folder.name}
            present = ", ".join(q.name for q in _visible(folder)[:8]) or "nothing"
            raise InputDataError(
                f"case folder '{folder}' has no '{modality}' (it holds: {present}). Each case needs one entry per "
                f"modality named {list(modalities)}: a file, or a folder holding that modality's DICOM series; "
                "rename them or pass the names of yours as --modalities."
            )
        paths.append(_modality_entry(p, folder, modality, spatial_dims))
    return {"image": paths, "case": folder.name}


def _check_spatial(path: Path, shape: tuple[int, ...] | None, spatial_dims: int | None) -> None:
    if spatial_dims == 3:
        flat = _has_extension(path, _FLAT_EXTENSIONS) or (
            shape is not None and (len(shape) < 3 or sorted(shape[:3])[0] <= 1)
        )
        if flat:
            raise InputDataError(
                f"input '{path}' is a 2D image{f' (shape {shape})' if shape else ''}, but this is a 3D bundle: it "
                "segments whole volumes. Give the 3D volume (NIfTI, NRRD or a DICOM series folder), not a slice."
            )
    elif spatial_dims == 2 and shape is not None and len(shape) >= 3 and shape[2] > 1:
        raise InputDataError(
            f"input '{path}' is a 3D volume (shape {shape}), but this bundle takes 2D images (radiographs): "
            "give 2D image files (DICOM, PNG, JPEG, TIFF)."
        )


def _check_dicom_image(path: Path, spatial_dims: int | None) -> None:
    """Headers of a single DICOM file: it must hold an image, and one frame for a 2D bundle."""
    from monai_peft.transforms.dicom_io import read_dicom_file

    ds = read_dicom_file(path, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        raise InputDataError(
            f"DICOM file '{path}' holds no image (Modality {ds.get('Modality', '?')}, SOP class "
            f"{getattr(ds.get('SOPClassUID', ''), 'name', ds.get('SOPClassUID', '?'))}): it is a report, "
            "presentation state or other non-image object. Remove it from the input."
        )
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if spatial_dims == 2 and frames > 1:
        raise InputDataError(
            f"DICOM file '{path}' is a multi-frame object ({frames} frames: a volume or cine), but this bundle "
            "takes single 2D images (radiographs). Give single-frame images, or export the frame you want."
        )


def _file_case(
    path: Path,
    extensions: Sequence[str],
    modalities: Sequence[str] | None = None,
    spatial_dims: int | None = None,
) -> dict[str, Any]:
    _check_readable(path)
    dicom = _is_dicom(path)
    if not (_has_extension(path, extensions) or dicom):
        raise InputDataError(
            f"input file '{path}' is neither DICOM nor an image file of a known type ({', '.join(extensions)}). "
            "Convert it, or remove it from the list."
        )
    if dicom:
        if modalities and len(modalities) > 1:
            raise InputDataError(
                f"'{path}' is a single DICOM file (one image of one modality), but this bundle takes "
                f"{len(modalities)} modalities {list(modalities)} as channels of a 3D volume. Give a case folder "
                "with one sub-folder per modality holding its series (e.g. 'case/flair/*.dcm', 'case/t1c/*.dcm'), "
                "and pass --modalities with their names."
            )
        _check_dicom_image(path, spatial_dims)
        if spatial_dims == 3:
            raise InputDataError(
                f"'{path}' is a single DICOM file, but this is a 3D bundle: give the folder holding every slice "
                "of the series."
            )
    shape = _nifti_shape(path)
    _check_spatial(path, shape, spatial_dims)
    if modalities and len(modalities) > 1 and shape is not None and _nifti_channels(shape) != len(modalities):
        raise InputDataError(
            f"'{path}' holds {_nifti_channels(shape)} channel(s) (shape {shape}), but this bundle takes "
            f"{len(modalities)} modalities {list(modalities)}. Give one 4D NIfTI with {len(modalities)} channels "
            "in that order, or a case folder with one file (or DICOM series folder) per modality."
        )
    return {"image": str(path), "case": _case_name(path, extensions)}


def _flat_folder_case(folder: Path, extensions: Sequence[str]) -> dict[str, Any]:
    """A 2D bundle's case sub-folder: it must hold exactly one image file (that case)."""
    files = [p for p in _visible(folder) if p.is_file() and (_has_extension(p, extensions) or _is_dicom(p))]
    if len(files) == 1:
        return {**_file_case(files[0], extensions, spatial_dims=2), "case": folder.name}
    if not files:
        raise InputDataError(
            f"case folder '{folder}' holds no image file ({', '.join(extensions)}) and no DICOM file. Put one image "
            "per case folder, or the image files directly in --dataset_dir."
        )
    if all(_is_dicom(p) for p in files):
        _series_case(folder, spatial_dims=2)  # a series of slices: the 3D-volume error (or the DICOM error)
    raise InputDataError(
        f"case folder '{folder}' holds {len(files)} image files ({', '.join(p.name for p in files[:5])}); a "
        "case is one 2D image. Put the image files directly in --dataset_dir (one case each), or give them as a list."
    )


def _folder_case(
    folder: Path,
    modalities: Sequence[str] | None,
    extensions: Sequence[str],
    spatial_dims: int | None = None,
) -> dict[str, Any]:
    _check_readable(folder)
    if modalities:
        return _modality_case(folder, modalities, spatial_dims)
    if spatial_dims == 2:
        return _flat_folder_case(folder, extensions)
    files = [p for p in _visible(folder) if p.is_file()]
    if not files:
        raise InputDataError(
            f"case folder '{folder}' is empty. A case folder holds one DICOM series (its slices) or one image file."
        )
    if any(_is_dicom(p) for p in files):
        return _series_case(folder, spatial_dims)
    images = [p for p in files if _has_extension(p, extensions)]
    if len(images) == 1:
        return {**_file_case(images[0], extensions, spatial_dims=spatial_dims), "case": folder.name}
    if not images:
        raise InputDataError(
            f"case folder '{folder}' holds no DICOM slice and no image file ({', '.join(extensions)}); found "
            f"{', '.join(p.name for p in files[:5])}."
        )
    raise InputDataError(
        f"case folder '{folder}' holds {len(images)} image files ({', '.join(p.name for p in images[:5])}) and no "
        "modality names were given. Pass modalities=[file names in channel order] (--modalities in the bundle), "
        "or put one image per case."
    )


def _unique(cases: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    seen: dict[str, Any] = {}
    for c in cases:
        if c["case"] in seen:
            raise InputDataError(
                f"two inputs in {where} have the same case name '{c['case']}' ({seen[c['case']]} and {c['image']}); "
                "outputs are named after the case, so rename one of them."
            )
        seen[c["case"]] = c["image"]
    return cases


def _is_modality_list(items: Sequence[Path], modalities: Sequence[str] | None) -> bool:
    """A list of exactly ``len(modalities)`` single-channel files or DICOM series folders: one multi-modal case."""
    if not modalities or len(items) != len(modalities):
        return False
    for p in items:
        if p.is_dir():
            if not _holds_dicom(p):
                return False  # a case folder
        elif p.is_file():
            shape = _nifti_shape(p)
            if shape is not None and _nifti_channels(shape) != 1 and len(modalities) > 1:
                return False  # multi-channel files: each one is a case
        else:
            return False
    return True


def datalist_from_dir(
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike],
    modalities: Sequence[str] | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    dicom_series: bool = False,
    spatial_dims: int | None = None,
) -> list[dict[str, Any]]:
    """List the cases of ``dataset_dir`` as ``[{"image": path | [path per modality], "case": name}, ...]``.

    Args:
        dataset_dir: a folder of cases (see the module docstring), a single image file, case folder or series
            folder, or a list of files / folders (each one case).
        modalities: names of the modality entries inside each case folder (files, or folders holding a DICOM
            series), in channel order. ``None``: each case is a single image (file or DICOM series folder).
        extensions: file endings that count as images (DICOM files are also recognised by content).
        dicom_series: DICOM files lying directly in ``dataset_dir`` form ONE series (one case named after the
            folder, for 3D bundles) instead of one case per file (2D images such as radiographs).
        spatial_dims: 2 or 3 for a 2D / 3D bundle: refuse inputs of the other kind from their headers (see the
            module docstring); ``None`` checks nothing of the kind.

    Returns:
        Cases sorted by name (a list input keeps its order), each with a unique ``"case"`` (outputs are named
        after it).

    Raises:
        InputDataError: missing, unreadable or empty input; a case missing a modality; a case folder that is one
            DICOM series when several modalities are needed; a file whose channel count (NIfTI header) is not
            ``len(modalities)``; a 2D input to a 3D bundle or a 3D one to a 2D bundle; an unrecognised file in a
            list; two inputs with the same case name; a folder with no case. ``DicomError`` (a subclass) for a
            DICOM folder with no images or with two series.

    Example::

        datalist_from_dir("brats/", modalities=["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"])
        # [{"image": [".../pat0003/Flair...", ".../pat0003/T1c..."], "case": "pat0003"}, ...]
        datalist_from_dir("dicom_cases/", modalities=["flair", "t1c"])  # dicom_cases/<case>/{flair,t1c}/*.dcm
    """
    if spatial_dims not in (None, 2, 3):
        raise ValueError(f"spatial_dims must be 2, 3 or None, got {spatial_dims!r}")
    modalities = list(modalities) if modalities else None
    if isinstance(dataset_dir, (str, os.PathLike)):
        root = Path(dataset_dir)
        _check_readable(root)
        if root.is_file():
            return [_file_case(root, extensions, modalities, spatial_dims)]
        if modalities and all(_modality_path(root, m) is not None for m in modalities):
            return [_modality_case(root, modalities, spatial_dims)]  # the folder is itself one case
        entries = _visible(root)
        if not entries:
            raise InputDataError(
                f"input folder '{root}' is empty. Put one image file or one case folder per case in it."
            )
        if modalities and any(_is_dicom(p) for p in entries):
            if len(modalities) > 1:
                raise _single_series_refusal(root, modalities)
            return [_modality_case(root, modalities, spatial_dims)]
        cases: list[dict[str, Any]] = []
        loose_dicom: list[Path] = []
        skipped: list[Path] = []
        for entry in entries:
            if entry.is_dir():
                cases.append(_folder_case(entry, modalities, extensions, spatial_dims))
            elif _has_extension(entry, extensions) or _is_dicom(entry):
                if (dicom_series or spatial_dims == 3) and _is_dicom(entry):
                    loose_dicom.append(entry)
                else:
                    cases.append(_file_case(entry, extensions, modalities, spatial_dims))
            else:
                skipped.append(entry)
        if loose_dicom:
            cases.append(_series_case(root, spatial_dims))
        if skipped:
            logger.warning("ignored %d file(s) in %s that are not cases, e.g. %s", len(skipped), root, skipped[0].name)
        if not cases:
            what = (
                f"case sub-folders holding {modalities}, or {len(modalities)}-channel image files"
                if modalities
                else f"image files ({', '.join(extensions)}), DICOM files or case folders"
            )
            raise InputDataError(
                f"input folder '{root}' holds no case: expected {what}; found {', '.join(p.name for p in entries[:5])}."
            )
        return _unique(sorted(cases, key=lambda c: c["case"]), f"'{root}'")
    items = [Path(p) for p in dataset_dir]
    if not items:
        raise InputDataError("the list of inputs is empty. Give at least one image file or case folder.")
    for p in items:
        _check_readable(p)
    if _is_modality_list(items, modalities):
        assert modalities is not None
        image = []
        for p, m in zip(items, modalities, strict=True):
            image.append(_modality_entry(p, p.parent, m, spatial_dims))
        parents = {p.parent.name for p in items}
        name = parents.pop() if len(parents) == 1 else _case_name(items[0], extensions)
        return [{"image": image, "case": name}]
    cases = []
    for p in items:
        if p.is_dir():
            if modalities and len(modalities) > 1 and _holds_dicom(p):
                raise _single_series_refusal(p, modalities)
            cases.append(_folder_case(p, modalities, extensions, spatial_dims))
        else:
            cases.append(_file_case(p, extensions, modalities, spatial_dims))
    return _unique(cases, "the input list")
