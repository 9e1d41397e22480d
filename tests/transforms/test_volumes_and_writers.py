"""Volume loading (NIfTI / NRRD / DICOM), CT and MR presets, NIfTI writer."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage

from monai_peft.errors import InputDataError
from monai_peft.transforms import (
    SaveNiftid,
    ct_transforms,
    load_dicom_series,
    load_volume,
    mr_transforms,
    volume_format,
    write_nifti,
)
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),  # highdicom on source names
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),  # MONAI: no GPU codec here
]


def test_nifti_round_trip_keeps_the_dicom_affine(tmp_path):
    make_series(tmp_path / "ct", n=4, orientation=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0))
    ct = load_dicom_series(tmp_path / "ct")
    path = write_nifti(ct, tmp_path / "out" / "ct.nii.gz")
    nii = nib.load(str(path))
    np.testing.assert_allclose(nii.affine, ct.affine.numpy(), atol=1e-5)
    np.testing.assert_array_equal(nii.get_fdata()[..., :], ct[0].numpy())
    assert int(nii.header["qform_code"]) == 1 and int(nii.header["sform_code"]) == 1
    back = load_volume(path)
    assert torch.equal(back.as_tensor(), ct.as_tensor())
    np.testing.assert_allclose(back.affine.numpy(), ct.affine.numpy(), atol=1e-5)


def test_nifti_writer_dtypes_and_errors(tmp_path):
    label = MetaTensor(torch.zeros((1, 3, 4, 5), dtype=torch.int64), affine=torch.diag(torch.tensor([2.0, 2, 2, 1])))
    label[0, 1, 1, 1] = 3
    path = write_nifti(label, tmp_path / "l.nii.gz")
    assert nib.load(str(path)).get_data_dtype() == np.int32
    assert (
        write_nifti(label.bool(), tmp_path / "b.nii.gz")
        and nib.load(str(tmp_path / "b.nii.gz")).get_data_dtype() == np.uint8
    )
    multi = MetaTensor(torch.rand((2, 3, 4, 5)), affine=torch.eye(4))
    assert nib.load(str(write_nifti(multi, tmp_path / "m.nii.gz"))).shape == (3, 4, 5, 2)
    with pytest.raises(InputDataError, match="needs the affine"):
        write_nifti(torch.zeros((1, 3, 4, 5)), tmp_path / "x.nii.gz")
    write_nifti(np.zeros((3, 4, 5)), tmp_path / "y.nii.gz", affine=np.eye(4))
    with pytest.raises(InputDataError, match="channel-first 3D"):
        write_nifti(MetaTensor(torch.zeros((1, 3, 4))), tmp_path / "z.nii.gz")


def test_save_niftid_names_outputs_after_the_source(tmp_path):
    make_series(tmp_path / "case01", n=3)
    img = load_volume(tmp_path / "case01")
    d = SaveNiftid("image", output_dir=tmp_path / "out", output_postfix="ct")({"image": img})
    assert d["image"].meta["saved_to"] == str(tmp_path / "out" / "case01_ct.nii.gz")
    reread = LoadImage(image_only=True, ensure_channel_first=True)(d["image"].meta["saved_to"])
    np.testing.assert_allclose(reread.affine.numpy(), img.affine.numpy(), atol=1e-5)


def test_volume_format_and_load_errors(tmp_path):
    make_series(tmp_path / "ct", n=2)
    assert volume_format(tmp_path / "ct") == "dicom_series"
    assert volume_format(next((tmp_path / "ct").iterdir())) == "dicom"
    assert volume_format(tmp_path / "a.nii.gz") == "nifti"
    with pytest.raises(InputDataError, match="does not exist"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "broken.nii.gz").write_bytes(b"garbage")
    with pytest.raises(InputDataError, match="could not be read"):
        load_volume(tmp_path / "broken.nii.gz")
    single = load_volume(next((tmp_path / "ct").iterdir()))
    assert single.shape[-1] == 1


def test_ct_preset_on_real_3slice_with_nrrd_and_seg():
    ct_dir = require_shared("dicom/ct_3slice")
    tf = ct_transforms(window="abdomen", pixdim=(1.62, 1.62, 1.0))
    a = tf({"image": ct_dir, "label": require_shared("dicom/ct_3slice_liver_label.nrrd")})
    b = tf({"image": ct_dir, "label": require_shared("dicom/liver_seg.dcm")})
    assert a["image"].shape == a["label"].shape and a["image"].shape[-1] == 3
    assert abs(a["image"].shape[1] - 512 * 0.810547 / 1.62) <= 1
    np.testing.assert_allclose(a["image"].pixdim.numpy(), [1.62, 1.62, 1.0], atol=1e-4)
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) <= 1.0
    assert set(torch.unique(a["label"]).tolist()) == {0.0, 1.0}  # nearest: no interpolated label values
    assert torch.equal(a["label"], b["label"])
    assert torch.allclose(a["image"].affine, a["label"].affine)
    inference = tf({"image": ct_dir})  # the label is optional
    assert "label" not in inference


def test_ct_preset_rejects_a_label_from_another_series():
    tf = ct_transforms(pixdim=None)
    with pytest.raises(InputDataError, match="label geometry does not match image"):
        tf(
            {
                "image": require_shared("dicom/ct_3slice"),
                "label": require_shared("totalseg/ct_dicom_series_label.nii.gz"),
            }
        )


def test_ct_preset_on_real_series_with_nifti_label():
    tf = ct_transforms(window="lung", pixdim=(2.0, 2.0, 2.0))
    d = tf(
        {"image": require_shared("ct_dicom_series"), "label": require_shared("totalseg/ct_dicom_series_label.nii.gz")}
    )
    assert d["image"].shape == d["label"].shape and abs(d["image"].shape[1] - 250) <= 1
    assert d["image"].shape[-1] == 20
    n_labels = len(torch.unique(d["label"]))
    assert n_labels > 20 and torch.equal(d["label"], d["label"].round())


def test_mr_preset_zscore_and_percentile():
    image = require_shared("totalseg/example_mr_sm.nii.gz")
    label = require_shared("totalseg/example_seg_mr.nii.gz")
    z = mr_transforms(norm="zscore")({"image": image, "label": label})
    fg = z["image"][z["image"] != 0]
    assert abs(float(fg.mean())) < 1e-3 and abs(float(fg.std()) - 1.0) < 1e-2
    assert z["image"].shape == z["label"].shape
    p = mr_transforms(norm="percentile", pixdim=(3.0, 3.0, 3.0))({"image": image})
    assert float(p["image"].min()) == 0.0 and float(p["image"].max()) == 1.0


def test_nan_in_volume_is_caught_by_the_preset(tmp_path):
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    data = np.zeros((4, 4, 4), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "nan.nii.gz"))
    with pytest.raises(InputDataError, match="'image' has 1 non-finite"):
        mr_transforms(label_key=None)({"image": tmp_path / "nan.nii.gz"})
    out = mr_transforms(label_key=None, nan_replace=0.0, norm=None)({"image": tmp_path / "nan.nii.gz"})
    assert bool(torch.isfinite(out["image"]).all())
