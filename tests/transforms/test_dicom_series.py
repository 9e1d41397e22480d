"""DICOM series -> volume: geometry on synthetic and real data."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.transforms import Orientation

from monai_peft.errors import InputDataError
from monai_peft.transforms import (
    CheckGeometryd,
    LoadDicomSeriesd,
    find_dicom_series,
    load_dicom_series,
)
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")  # MONAI: no GPU codec here

SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # rows along +y (A->P in LPS), columns along -z


def _read_nrrd(path):
    nrrd = pytest.importorskip("nrrd")  # pynrrd: optional (MONAI's NrrdReader)
    return nrrd.read(path)


def _world(affine: np.ndarray, ijk) -> np.ndarray:
    return (affine @ np.array([*ijk, 1.0]))[:3]


def test_axial_series_voxels_and_affine(synthetic_series):
    folder, stored = synthetic_series
    vol = load_dicom_series(folder)
    assert vol.shape == (1, 4, 6, 5)  # (C, X=cols, Y=rows, Z=slices)
    # voxel (x, y, z) is stored[z, row=y, col=x] after the rescale (intercept -1024)
    expected = stored.transpose(2, 1, 0).astype(np.float32) - 1024.0
    np.testing.assert_array_equal(vol[0].numpy(), expected)
    aff = vol.affine.numpy()
    lps = np.array([-10.0 + 3 * 0.75, 20.0 + 5 * 0.5, 30.0 + 4 * 2.0])  # x=3, y=5, z=4
    np.testing.assert_allclose(_world(aff, (3, 5, 4)), lps * [-1, -1, 1])
    np.testing.assert_allclose(vol.meta["spacing"], [0.75, 0.5, 2.0])
    assert vol.meta["modality"] == "CT"


def test_oblique_series_is_sorted_along_the_normal(tmp_path):
    _, stored = make_series(tmp_path, n=4, orientation=SAGITTAL, spacing_z=1.5, origin=(5.0, -3.0, 40.0))
    series = find_dicom_series(tmp_path)
    normal = np.cross(SAGITTAL[:3], SAGITTAL[3:])  # (-1, 0, 0)
    proj = [np.dot(ds.ImagePositionPatient, normal) for ds in series.datasets]
    assert proj == sorted(proj)
    vol = series.load()
    np.testing.assert_array_equal(vol[0].numpy(), stored.transpose(2, 1, 0).astype(np.float32) - 1024.0)
    lps = np.array([5.0, -3.0, 40.0]) + 2 * 0.75 * np.array(SAGITTAL[:3]) + 1 * 0.5 * np.array(SAGITTAL[3:])
    lps = lps + 3 * 1.5 * normal
    np.testing.assert_allclose(_world(vol.affine.numpy(), (2, 1, 3)), lps * [-1, -1, 1])


def test_list_of_files_and_dict_transform(tmp_path):
    paths, _ = make_series(tmp_path / "s", n=3)
    a = load_dicom_series([str(p) for p in paths])
    b = LoadDicomSeriesd("image")({"image": tmp_path / "s"})["image"]
    assert torch.equal(a, b) and torch.equal(a.affine, b.affine)
    assert b.meta["filename_or_obj"] == str(tmp_path / "s")


def test_non_dicom_files_in_the_folder_are_skipped(tmp_path):
    make_series(tmp_path, n=3)
    (tmp_path / "README.txt").write_text("not dicom")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 200)
    series = find_dicom_series(tmp_path)
    assert len(series.datasets) == 3
    assert sorted(p.name for p in series.skipped_files) == ["DICOMDIR", "README.txt"]


def test_real_ct_series_matches_nifti_label_geometry():
    series_dir = require_shared("ct_dicom_series")
    label_path = require_shared("totalseg/ct_dicom_series_label.nii.gz")
    from monai_peft.transforms.dicom_series import MissingSliceWarning

    with pytest.warns(MissingSliceWarning, match=r"267\.\.286"):  # 20 slices cut out of a longer series
        ct = load_dicom_series(series_dir)
    assert ct.shape == (1, 512, 512, 20)
    nii = nib.load(str(label_path))
    assert ct.shape[1:] == nii.shape
    np.testing.assert_allclose(ct.meta["spacing"], [0.9765625, 0.9765625, 2.0])
    np.testing.assert_allclose(nib.affines.voxel_sizes(nii.affine), ct.meta["spacing"], atol=1e-4)
    # same grid once the label's axis order/flips match the image's (LPS-derived vs LAS)
    from monai.data import MetaTensor

    label = MetaTensor(torch.zeros((1, *nii.shape)), affine=torch.as_tensor(nii.affine))
    CheckGeometryd(("image", "label"), match_orientation=True)({"image": ct, "label": label})
    with pytest.raises(InputDataError, match="axis directions differ"):
        CheckGeometryd(("image", "label"))({"image": ct, "label": label})
    ct_ras = Orientation(axcodes="RAS", labels=None)(ct)
    lab_ras = Orientation(axcodes="RAS", labels=None)(label)
    assert ct_ras.shape == lab_ras.shape
    np.testing.assert_allclose(ct_ras.affine.numpy(), lab_ras.affine.numpy(), atol=1e-3)
    assert float(ct.min()) > -1100 and float(ct.max()) < 4000  # Hounsfield units (rescale applied)


def test_real_3slice_ct_matches_nrrd_label_geometry():
    ct = load_dicom_series(require_shared("dicom/ct_3slice"))
    data, header = _read_nrrd(str(require_shared("dicom/ct_3slice_liver_label.nrrd")))
    assert ct.shape[1:] == data.shape == (512, 512, 3)
    # NRRD is LPS: affine = [space directions | space origin]; ours is RAS
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(header["space directions"]).T
    lps[:3, 3] = header["space origin"]
    np.testing.assert_allclose(ct.affine.numpy(), np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)


def test_missing_end_slice_is_found_from_images_in_acquisition(tmp_path):
    """The slice at the top end (InstanceNumber 6) is missing: positions show no gap, the header count does."""
    from monai_peft.transforms.dicom_series import MissingSliceWarning

    make_series(tmp_path / "s", n=6, skip=(0,), images_in_acquisition=6)  # k=0 has InstanceNumber 6
    with pytest.warns(MissingSliceWarning, match="ImagesInAcquisition=6, but 5 slice") as rec:
        vol = load_dicom_series(tmp_path / "s")
    assert vol.shape[-1] == 5
    msg = str(rec[0].message)
    assert "InstanceNumbers 1..5" in msg and "InstanceNumber(s) 6" in msg
    assert "ImagesInAcquisition=6" in vol.meta["warnings"]


def test_missing_first_instance_is_found_from_instance_numbers(tmp_path):
    """InstanceNumber 1 (slice k=5) is missing and there is no count in the header: the numbering starts at 2."""
    from monai_peft.transforms.dicom_series import MissingSliceWarning

    make_series(tmp_path / "s", n=6, skip=(5,))
    with pytest.warns(MissingSliceWarning, match=r"InstanceNumbers run 2\.\.6 without a gap but do not start at 1"):
        series = find_dicom_series(tmp_path / "s")
    assert len(series.warnings) == 1


def test_complete_series_gives_no_slice_count_warning(tmp_path):
    import warnings

    make_series(tmp_path / "s", n=6, images_in_acquisition=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vol = load_dicom_series(tmp_path / "s")
    assert vol.meta["warnings"] == ""
