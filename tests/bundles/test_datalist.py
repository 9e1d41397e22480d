"""datalist_from_dir: the --dataset_dir layouts a bundle accepts, and the errors for unusable input."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from monai_peft.bundle import datalist_from_dir
from monai_peft.bundle.datalist import _case_name
from monai_peft.errors import DicomError, InputDataError
from tests.conftest import require_shared

BRATS_MODALITIES = ["Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz"]


def _png(path: Path) -> Path:
    from PIL import Image

    Image.fromarray(np.arange(35, dtype=np.uint8).reshape(5, 7)).save(path)
    return path


def test_one_file_per_case_keeps_each_case_name(tmp_path):
    ct = require_shared("dicom/ct_512.dcm")
    _png(tmp_path / "b.png")
    shutil.copy(ct, tmp_path / "a_ct.dcm")
    shutil.copy(ct, tmp_path / "noext")  # DICOM without suffix: recognised by content
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    cases = datalist_from_dir(tmp_path)
    assert [c["case"] for c in cases] == ["a_ct", "b", "noext"]
    assert cases[1]["image"] == str(tmp_path / "b.png")
    assert _case_name("x/case1.nii.gz") == "case1" and _case_name("x/img.PNG") == "img"


def test_a_list_of_files_and_a_single_file(tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png")
    assert [c["case"] for c in datalist_from_dir([b, a])] == ["b", "a"]  # list order is kept
    assert datalist_from_dir(a) == [{"image": str(a), "case": "a"}]


def test_modality_folders_on_real_brats_cases():
    root = require_shared("brats")
    cases = datalist_from_dir(root, modalities=BRATS_MODALITIES)
    assert [c["case"] for c in cases] == [f"brats_2013_pat000{i}_1" for i in (3, 4, 5, 6)]
    assert [Path(p).name for p in cases[0]["image"]] == BRATS_MODALITIES  # channel order = modalities order
    # one case folder given directly, and a list of one file per modality
    one = root / "brats_2013_pat0003_1"
    assert datalist_from_dir(one, modalities=BRATS_MODALITIES) == [cases[0]]
    listed = datalist_from_dir([one / m for m in BRATS_MODALITIES], modalities=BRATS_MODALITIES)
    assert listed == [cases[0]]


def test_case_missing_a_modality_names_case_and_file(tmp_path):
    root = require_shared("brats")
    case = tmp_path / "pat3"
    case.mkdir()
    shutil.copy(root / "brats_2013_pat0003_1" / BRATS_MODALITIES[0], case / BRATS_MODALITIES[0])
    with pytest.raises(InputDataError, match=r"pat3.*has no 'T1c_subtrMeanDivStd.nii.gz'"):
        datalist_from_dir(tmp_path, modalities=BRATS_MODALITIES)
    with pytest.raises(InputDataError, match="needs 2 modalities"):
        datalist_from_dir(case / BRATS_MODALITIES[0], modalities=BRATS_MODALITIES)


def test_several_images_in_a_case_folder_without_modalities_says_what_to_pass():
    root = require_shared("brats")
    with pytest.raises(InputDataError, match="modalities"):
        datalist_from_dir(root)


def test_dicom_series_folders(tmp_path):
    src = require_shared("dicom/ct_3slice")
    shutil.copytree(src, tmp_path / "ct_a")
    cases = datalist_from_dir(tmp_path)
    assert cases == [{"image": str(tmp_path / "ct_a"), "case": "ct_a"}]
    # loose DICOM slices in the folder itself are one series with dicom_series=True
    assert datalist_from_dir(tmp_path / "ct_a", dicom_series=True) == [
        {"image": str(tmp_path / "ct_a"), "case": "ct_a"}
    ]


def test_dicom_folder_with_two_series_is_rejected(tmp_path):
    src = require_shared("dicom/ct_3slice")
    case = tmp_path / "mixed"
    shutil.copytree(src, case)
    first = sorted(case.iterdir())[0]
    ds = pydicom.dcmread(first)
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(first)
    with pytest.raises(DicomError, match=r"holds 2 DICOM series"):
        datalist_from_dir(tmp_path)


def test_case_folder_with_no_image(tmp_path):
    (tmp_path / "case1").mkdir()
    (tmp_path / "case1" / "readme.txt").write_text("x")
    with pytest.raises(InputDataError, match=r"case1.*no DICOM slice and no image file"):
        datalist_from_dir(tmp_path)
    (tmp_path / "case1" / "readme.txt").unlink()
    with pytest.raises(InputDataError, match=r"case1.*is empty"):
        datalist_from_dir(tmp_path)


@pytest.mark.parametrize("kind", ["missing", "empty_folder", "only_junk", "empty_file", "unknown_type", "duplicate"])
def test_unusable_input_names_the_path(tmp_path, kind):
    target: object = tmp_path
    if kind == "missing":
        target, match = tmp_path / "absent", "absent' does not exist"
    elif kind == "empty_folder":
        match = "is empty"
    elif kind == "only_junk":
        (tmp_path / "a.txt").write_text("x")
        match = "holds no case"
    elif kind == "empty_file":
        (tmp_path / "a.png").write_bytes(b"")
        match = r"a.png' is empty \(0 bytes\)"
    elif kind == "unknown_type":
        (tmp_path / "a.xyz").write_text("x")
        target, match = [tmp_path / "a.xyz"], "neither DICOM nor an image file"
    else:
        _png(tmp_path / "a.png")
        os.makedirs(tmp_path / "a")
        _png(tmp_path / "a" / "x.png")
        match = "same case name 'a'"
    with pytest.raises(InputDataError, match=match):
        datalist_from_dir(target)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    p = _png(tmp_path / "a.png")
    p.chmod(0)
    try:
        with pytest.raises(InputDataError, match="not readable"):
            datalist_from_dir(tmp_path)
    finally:
        p.chmod(0o644)
