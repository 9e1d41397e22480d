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
from tests.bundles.bundle_utils import permission_bits_enforced
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_image, make_series, save

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
    with pytest.raises(InputDataError, match=r"holds 1 channel\(s\).*takes 2 modalities"):
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


@pytest.mark.skipif(not permission_bits_enforced(), reason="this process (root) can read any file")
def test_unreadable_file(tmp_path):
    p = _png(tmp_path / "a.png")
    p.chmod(0)
    try:
        with pytest.raises(InputDataError, match="not readable"):
            datalist_from_dir(tmp_path)
    finally:
        p.chmod(0o644)


# ------------------------------------------------------------------ multi-modal layouts: 4D files, DICOM series folders
def _nifti(path: Path, shape: tuple[int, ...]) -> Path:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.diag([1.0, 1.5, 3.0, 1.0])).to_filename(path)
    return path


def test_one_4d_nifti_per_case_is_checked_for_its_channel_count(tmp_path):
    good = _nifti(tmp_path / "d" / "case_b.nii.gz", (10, 12, 7, 2))  # anisotropic, non-square, 2 channels
    _nifti(tmp_path / "d" / "case_a.nii", (9, 8, 6, 2))
    cases = datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"], spatial_dims=3)
    assert cases == [
        {"image": str(tmp_path / "d" / "case_a.nii"), "case": "case_a"},
        {"image": str(good), "case": "case_b"},
    ]
    assert datalist_from_dir(good, modalities=["flair", "t1c"]) == [cases[1]]
    _nifti(tmp_path / "d" / "case_c.nii.gz", (10, 12, 7, 3))
    with pytest.raises(InputDataError, match=r"case_c.nii.gz' holds 3 channel\(s\).*takes 2 modalities"):
        datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])
    # a list of two 4D files is two cases, a list of two 3D files one two-channel case
    two = [tmp_path / "d" / "case_a.nii", good]
    assert [c["case"] for c in datalist_from_dir(two, modalities=["flair", "t1c"])] == ["case_a", "case_b"]
    f, t = _nifti(tmp_path / "p1" / "f.nii.gz", (5, 6, 7)), _nifti(tmp_path / "p1" / "t.nii.gz", (5, 6, 7))
    assert datalist_from_dir([f, t], modalities=["flair", "t1c"]) == [{"image": [str(f), str(t)], "case": "p1"}]


def _series_case(root: Path, name: str, modalities=("flair", "t1c"), **kw) -> Path:
    case = root / name
    study, frame = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for m in modalities:
        make_series(case / m, n=5, rows=6, cols=4, study_uid=study, frame_uid=frame, **kw)
    return case


def test_one_dicom_series_folder_per_modality(tmp_path):
    a = _series_case(tmp_path / "d", "pat1")
    _series_case(tmp_path / "d", "pat0")
    cases = datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"], spatial_dims=3)
    assert [c["case"] for c in cases] == ["pat0", "pat1"]
    assert cases[1] == {"image": [str(a / "flair"), str(a / "t1c")], "case": "pat1"}
    # a modality named like a file matches a series folder named without the extension
    b = _series_case(tmp_path / "e", "pat2", modalities=("Flair_subtrMeanDivStd", "t1c"))
    mixed = datalist_from_dir(tmp_path / "e", modalities=["Flair_subtrMeanDivStd.nii.gz", "t1c"])
    assert mixed == [{"image": [str(b / "Flair_subtrMeanDivStd"), str(b / "t1c")], "case": "pat2"}]
    with pytest.raises(InputDataError, match=r"pat2' has no 'flair' \(it holds: Flair_subtrMeanDivStd, t1c\)"):
        datalist_from_dir(tmp_path / "e", modalities=["flair", "t1c"])
    # the case folder itself, and a list of one series folder per modality
    assert datalist_from_dir(a, modalities=["flair", "t1c"]) == [cases[1]]
    assert datalist_from_dir([a / "flair", a / "t1c"], modalities=["flair", "t1c"]) == [cases[1]]
    # a NIfTI for one modality and a DICOM series for the other
    c = tmp_path / "f" / "pat3"
    _nifti(c / "flair.nii.gz", (4, 6, 5))
    shutil.copytree(a / "t1c", c / "t1c")
    got = datalist_from_dir(c, modalities=["flair.nii.gz", "t1c"])
    assert got == [{"image": [str(c / "flair.nii.gz"), str(c / "t1c")], "case": "pat3"}]


def test_modality_series_folder_with_two_series_or_no_dicom_names_case_and_modality(tmp_path):
    case = _series_case(tmp_path / "d", "pat1")
    make_series(case / "t1c", n=5, rows=6, cols=4, prefix="other")  # a second series in the same folder
    with pytest.raises(DicomError, match=r"modality 't1c' of case 'pat1'.*t1c'.*holds 2 DICOM series"):
        datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])
    shutil.rmtree(case / "t1c")
    (case / "t1c").mkdir()
    (case / "t1c" / "notes.txt").write_text("no image")
    with pytest.raises(DicomError, match=r"modality 't1c' of case 'pat1'.*none is DICOM"):
        datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])


def test_a_case_folder_that_is_one_dicom_series_says_how_to_lay_out_modalities(tmp_path):
    case = tmp_path / "d" / "pat1"
    make_series(case, n=5, rows=6, cols=4)
    hint = r"one sub-folder per modality.*pat1/flair/\*\.dcm.*pat1/t1c/\*\.dcm.*--modalities"
    with pytest.raises(InputDataError, match=r"pat1' is a single DICOM series folder.*2 modalities.*" + hint):
        datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])
    with pytest.raises(InputDataError, match="single DICOM series folder"):
        datalist_from_dir(case, modalities=["flair", "t1c"])  # given directly
    with pytest.raises(InputDataError, match="single DICOM series folder"):
        datalist_from_dir([case], modalities=["flair", "t1c"])  # in a list
    # both modalities' series mixed in one case folder: named, with the same advice
    make_series(case, n=5, rows=6, cols=4, prefix="t1c")
    with pytest.raises(InputDataError, match=r"pat1' holds 2 DICOM series mixed in one folder.*" + hint):
        datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])
    # a single DICOM file cannot hold two modalities either
    one = sorted(case.iterdir())[0]
    with pytest.raises(InputDataError, match="single DICOM file.*2 modalities"):
        datalist_from_dir(one, modalities=["flair", "t1c"])
    # with one modality, a series folder is the case
    make_series(tmp_path / "one" / "ct", n=4, rows=6, cols=4)
    assert datalist_from_dir(tmp_path / "one", modalities=["t1"]) == [
        {"image": [str(tmp_path / "one" / "ct")], "case": "ct"}
    ]


def test_spatial_dims_refuses_inputs_of_the_other_kind(tmp_path):
    flat = _nifti(tmp_path / "d3" / "slice.nii.gz", (64, 48))
    with pytest.raises(InputDataError, match=r"slice.nii.gz' is a 2D image.*3D bundle"):
        datalist_from_dir(tmp_path / "d3", spatial_dims=3)
    flat.unlink()
    _nifti(tmp_path / "d3" / "thin.nii.gz", (64, 48, 1))
    with pytest.raises(InputDataError, match="is a 2D image"):
        datalist_from_dir(tmp_path / "d3", spatial_dims=3)
    with pytest.raises(InputDataError, match=r"x.png' is a 2D image"):
        datalist_from_dir(_png(tmp_path / "x.png"), spatial_dims=3)
    case = tmp_path / "m" / "pat1"
    _nifti(case / "flair.nii.gz", (64, 48))
    _nifti(case / "t1c.nii.gz", (64, 48))
    with pytest.raises(InputDataError, match=r"flair.nii.gz' is a 2D image"):
        datalist_from_dir(tmp_path / "m", modalities=["flair.nii.gz", "t1c.nii.gz"], spatial_dims=3)
    _nifti(case / "flair.nii.gz", (6, 4, 5, 2))
    with pytest.raises(InputDataError, match=r"modality file .*flair.nii.gz' holds 2 channels"):
        datalist_from_dir(case, modalities=["flair.nii.gz", "t1c.nii.gz"])
    # a 2D bundle: 3D volumes are refused, a sub-folder with one image is that case
    vol = _nifti(tmp_path / "d2" / "ct.nii.gz", (8, 8, 5))
    with pytest.raises(InputDataError, match=r"ct.nii.gz' is a 3D volume.*2D images"):
        datalist_from_dir(vol, spatial_dims=2)
    make_series(tmp_path / "d2b" / "series", n=3, rows=6, cols=4)
    with pytest.raises(InputDataError, match=r"series' is a DICOM series of 3 slice\(s\) \(a 3D volume\)"):
        datalist_from_dir(tmp_path / "d2b", spatial_dims=2)
    (tmp_path / "d2c" / "patient9").mkdir(parents=True)
    _png(tmp_path / "d2c" / "patient9" / "pa.png")
    assert datalist_from_dir(tmp_path / "d2c", spatial_dims=2) == [
        {"image": str(tmp_path / "d2c" / "patient9" / "pa.png"), "case": "patient9"}
    ]
    with pytest.raises(ValueError, match="spatial_dims must be 2, 3 or None"):
        datalist_from_dir(tmp_path / "d2c", spatial_dims=1)


def test_dicom_without_image_or_with_frames_is_refused_from_its_header(tmp_path):
    ct = pydicom.dcmread(require_shared("dicom/ct_512.dcm"))
    for kw in ("PixelData", "Rows", "Columns"):
        delattr(ct, kw)
    ct.save_as(tmp_path / "report.dcm")
    with pytest.raises(InputDataError, match=r"report.dcm' holds no image"):
        datalist_from_dir(tmp_path, spatial_dims=2)
    (tmp_path / "report.dcm").unlink()
    shutil.copy(require_shared("dicom/enhanced_mr_multiframe.dcm"), tmp_path / "cine.dcm")
    with pytest.raises(InputDataError, match=r"cine.dcm' is a multi-frame object \(10 frames"):
        datalist_from_dir(tmp_path, spatial_dims=2)
    assert [c["case"] for c in datalist_from_dir(tmp_path)] == ["cine"]  # without spatial_dims: accepted


def test_dicomdir_and_a_single_slice_for_a_3d_bundle(tmp_path):
    case = _series_case(tmp_path / "d", "pat1")
    save(make_image(np.zeros((6, 4))), tmp_path / "d" / "DICOMDIR")  # an index file: never a case
    assert [c["case"] for c in datalist_from_dir(tmp_path / "d", modalities=["flair", "t1c"])] == ["pat1"]
    one = sorted((case / "flair").iterdir())[0]
    with pytest.raises(InputDataError, match="single DICOM file, but this is a 3D bundle"):
        datalist_from_dir(one, spatial_dims=3)
