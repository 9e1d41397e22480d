"""Build a MONAI datalist (``[{"image": ..., "case": ...}, ...]``) from a folder of unlabelled cases.

A bundle's ``inference.json`` points ``--dataset_dir`` at the user's studies; this module turns that into the list of
dictionaries that ``monai.data.Dataset`` takes, and fails early, naming the file or folder, when the input is
unusable. Three layouts are recognised (they may be mixed in one folder):

* one image file per case: ``case01.nii.gz``, ``patient7.png``, ``xray.dcm`` (case name = file name without
  extension);
* one sub-folder per case holding one file per modality, with the file names given in ``modalities``
  (e.g. ``["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]``); ``"image"`` is then the list of paths
  in the order of ``modalities`` (case name = sub-folder name);
* one sub-folder per case holding the slices of one DICOM series (``"image"`` = the folder; case name = folder name).

``dataset_dir`` may also be a single file / series folder, or a list of files and folders (each one case; with
``modalities``, a list of exactly ``len(modalities)`` files is one multi-modal case).
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
        return is_dicom_file(path)
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
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _series_case(folder: Path) -> dict[str, Any]:
    """Validate a DICOM series folder (headers only): no images / several series raise ``DicomError``."""
    from monai_peft.transforms.dicom_series import find_dicom_series

    find_dicom_series(folder)
    return {"image": str(folder), "case": folder.name}


def _modality_case(folder: Path, modalities: Sequence[str]) -> dict[str, Any]:
    paths = []
    for modality in modalities:
        p = folder / modality
        if not p.is_file():
            present = ", ".join(q.name for q in _visible(folder)[:8]) or "nothing"
            raise InputDataError(
                f"case folder '{folder}' has no '{modality}' (it holds: {present}). Each case needs one file per "
                f"modality named {list(modalities)}; rename the files or pass the names of yours as modalities."
            )
        _check_readable(p)
        paths.append(str(p))
    return {"image": paths, "case": folder.name}


def _folder_case(folder: Path, modalities: Sequence[str] | None, extensions: Sequence[str]) -> dict[str, Any]:
    _check_readable(folder)
    if modalities:
        return _modality_case(folder, modalities)
    files = [p for p in _visible(folder) if p.is_file()]
    if not files:
        raise InputDataError(
            f"case folder '{folder}' is empty. A case folder holds one DICOM series (its slices) or one image file."
        )
    if any(_is_dicom(p) for p in files):
        return _series_case(folder)
    images = [p for p in files if _has_extension(p, extensions)]
    if len(images) == 1:
        _check_readable(images[0])
        return {"image": str(images[0]), "case": folder.name}
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


def _file_case(path: Path, extensions: Sequence[str]) -> dict[str, Any]:
    _check_readable(path)
    if not (_has_extension(path, extensions) or _is_dicom(path)):
        raise InputDataError(
            f"input file '{path}' is neither DICOM nor an image file of a known type ({', '.join(extensions)}). "
            "Convert it, or remove it from the list."
        )
    return {"image": str(path), "case": _case_name(path, extensions)}


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


def datalist_from_dir(
    dataset_dir: str | os.PathLike | Sequence[str | os.PathLike],
    modalities: Sequence[str] | None = None,
    extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    dicom_series: bool = False,
) -> list[dict[str, Any]]:
    """List the cases of ``dataset_dir`` as ``[{"image": path | [path per modality], "case": name}, ...]``.

    Args:
        dataset_dir: a folder of cases (see the module docstring), a single image file or series folder, or a
            list of files / folders (each one case).
        modalities: file names of the modalities inside each case folder, in channel order. ``None``: each case
            is a single image (file or DICOM series folder).
        extensions: file endings that count as images (DICOM files are also recognised by content).
        dicom_series: DICOM files lying directly in ``dataset_dir`` form ONE series (one case named after the
            folder, for 3D bundles) instead of one case per file (2D images such as radiographs).

    Returns:
        Cases sorted by name, each with a unique ``"case"`` (outputs are named after it).

    Raises:
        InputDataError: missing, unreadable or empty input; a case missing a modality; an unrecognised file in
            a list; two inputs with the same case name; a folder with no case. ``DicomError`` (a subclass) for a
            DICOM folder with no images or with two series.

    Example::

        datalist_from_dir("brats/", modalities=["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"])
        # [{"image": [".../pat0003/Flair...", ".../pat0003/T1c..."], "case": "pat0003"}, ...]
    """
    modalities = list(modalities) if modalities else None
    if isinstance(dataset_dir, (str, os.PathLike)):
        root = Path(dataset_dir)
        _check_readable(root)
        if root.is_file():
            if modalities and len(modalities) > 1:
                raise InputDataError(
                    f"'{root}' is a single file but this bundle needs {len(modalities)} modalities {modalities}: "
                    "pass the case folder, or a list of one file per modality."
                )
            return [_file_case(root, extensions)]
        if modalities and all((root / m).is_file() for m in modalities):
            return [_modality_case(root, modalities)]  # the folder is itself one case
        entries = _visible(root)
        if not entries:
            raise InputDataError(
                f"input folder '{root}' is empty. Put one image file or one case folder per case in it."
            )
        cases: list[dict[str, Any]] = []
        loose_dicom: list[Path] = []
        skipped: list[Path] = []
        for entry in entries:
            if entry.is_dir():
                cases.append(_folder_case(entry, modalities, extensions))
            elif _has_extension(entry, extensions) or _is_dicom(entry):
                if modalities:
                    skipped.append(entry)
                elif dicom_series and _is_dicom(entry):
                    loose_dicom.append(entry)
                else:
                    cases.append(_file_case(entry, extensions))
            else:
                skipped.append(entry)
        if loose_dicom:
            cases.append(_series_case(root))
        if skipped:
            logger.warning("ignored %d file(s) in %s that are not cases, e.g. %s", len(skipped), root, skipped[0].name)
        if not cases:
            what = (
                f"case sub-folders holding {modalities}"
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
    if modalities and len(items) == len(modalities) and all(p.is_file() for p in items):
        for p in items:
            _check_readable(p)
        parents = {p.parent.name for p in items}
        name = parents.pop() if len(parents) == 1 else _case_name(items[0], extensions)
        return [{"image": [str(p) for p in items], "case": name}]
    cases = []
    for p in items:
        _check_readable(p)
        if modalities and p.is_file():
            raise InputDataError(
                f"'{p}' is a single file but each case needs {len(modalities)} modalities {modalities}: give case "
                f"folders, or a list of exactly {len(modalities)} files (one per modality, in that order)."
            )
        cases.append(_folder_case(p, modalities, extensions) if p.is_dir() else _file_case(p, extensions))
    return _unique(cases, "the input list")
