"""Predictions go back to the original grid through the presets (MONAI ``Invertd``-compatible)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, Invertd

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_series import load_dicom_series
from monai_peft.transforms.nifti_writer import write_nifti
from monai_peft.transforms.presets import ct_transforms, invert_preset, mr_transforms
from monai_peft.transforms.volume_io import load_volume
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")


def _assert_on_original_grid(inverted: MetaTensor, original: MetaTensor) -> None:
    assert tuple(inverted.shape[1:]) == tuple(original.shape[1:])
    assert torch.equal(inverted.affine.to(torch.float64), original.affine.to(torch.float64))  # exactly


def test_real_mr_label_survives_resampling_orientation_crop_and_pad():
    """TotalSegmentator MR (117x91x20, 3 mm, LPS-like) -> RAS, anisotropic 1.5x1.0x1.5 mm, crop, pad to 16."""
    image = require_shared("totalseg/example_mr_sm.nii.gz")
    label = require_shared("totalseg/example_seg_mr.nii.gz")
    original = load_volume(label)
    tf = mr_transforms(pixdim=(1.5, 1.0, 1.5), crop_foreground=True, crop_margin=2, divisible_k=16)
    d = tf({"image": image, "label": label})
    shape = tuple(d["image"].shape[1:])
    assert shape != tuple(original.shape[1:]) and all(s % 16 == 0 for s in shape)
    np.testing.assert_allclose(d["image"].pixdim.numpy(), [1.5, 1.0, 1.5], atol=1e-6)
    d["pred"] = d["label"].clone()  # a perfect prediction on the preset's grid
    out = invert_preset(tf, d, "pred")
    _assert_on_original_grid(out["pred"], original)
    assert torch.equal(out["pred"].as_tensor(), original.as_tensor())  # voxel for voxel
    assert len(torch.unique(original)) > 20  # a real multi-organ label, not a blank
    # the same through MONAI's Invertd in a post-processing Compose (what bundles use)
    d2 = dict(d, pred=d["label"].clone())
    post = Compose([Invertd(keys="pred", transform=tf, orig_keys="image", nearest_interp=True)])
    assert torch.equal(post(d2)["pred"].as_tensor(), original.as_tensor())
    # a multi-channel prediction (one-hot of 3 classes) comes back with the same argmax
    lab = d["label"][0]
    onehot = torch.stack([lab == 0, lab == 5, (lab > 0) & (lab != 5)]).float()
    d3 = dict(d, pred=MetaTensor(onehot))
    back = invert_preset(tf, d3, "pred")["pred"]
    assert tuple(back.shape) == (3, *original.shape[1:])
    o = original[0]
    expected = torch.where(o == 0, 0, torch.where(o == 5, 1, 2))
    assert torch.equal(back.argmax(0), expected)


def test_brats_label_round_trip_with_modalities_mask_and_crop():
    case = "brats/brats_2013_pat0004_1"
    files = [
        require_shared(f"{case}/Flair_subtrMeanDivStd.nii.gz"),
        require_shared(f"{case}/T1c_subtrMeanDivStd.nii.gz"),
    ]
    label = require_shared(f"{case}/OTMultiClass.nii.gz")
    original = load_volume(label)
    tf = mr_transforms(norm_mask_key="mask", crop_foreground=True, divisible_k=32)
    d = tf({"image": files, "label": label, "mask": require_shared(f"{case}/brainmask.nii.gz")})
    assert d["image"].shape[0] == 2 and tuple(d["image"].shape[1:]) == tuple(d["label"].shape[1:])
    assert all(s % 32 == 0 for s in d["image"].shape[1:]) and d["image"].shape[1] < 240  # cropped to the brain
    d["pred"] = d["label"].clone()
    out = invert_preset(tf, d, "pred")["pred"]
    _assert_on_original_grid(out, original)
    assert torch.equal(out.as_tensor(), original.as_tensor())
    assert set(torch.unique(original).tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_synthetic_round_trip_and_refused_predictions(tmp_path):
    aff = np.diag([-3.0, -3.0, 3.0, 1.0])
    vol = np.zeros((9, 7, 5), np.float32)
    vol[2:7, 1:6, 1:4] = 50.0
    seg = np.zeros_like(vol)
    seg[3:6, 2:5, 2] = 2.0
    seg[4, 3, 1] = 1.0
    nib.save(nib.Nifti1Image(vol, aff), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(seg, aff), str(tmp_path / "seg.nii.gz"))
    tf = mr_transforms(pixdim=(1.5, 1.0, 1.5), crop_foreground=True, norm=None, divisible_k=4)
    d = tf({"image": tmp_path / "img.nii.gz", "label": tmp_path / "seg.nii.gz"})
    assert tuple(d["image"].shape) != (1, 9, 7, 5)
    d["pred"] = d["label"].clone()
    out = invert_preset(tf, d, "pred")["pred"]
    assert tuple(out.shape) == (1, 9, 7, 5) and torch.equal(out[0], torch.from_numpy(seg))
    np.testing.assert_array_equal(out.affine.numpy(), aff)  # the file's affine, LPS-like axes restored
    with pytest.raises(InputDataError, match=r"prediction 'pred' has spatial shape \(3, 3, 3\)"):
        invert_preset(tf, dict(d, pred=torch.zeros((1, 3, 3, 3))), "pred")
    with pytest.raises(InputDataError, match="MetaTensor the preset produced"):
        invert_preset(tf, dict(d, image=d["image"].as_tensor()), "pred")
    with pytest.raises(InputDataError, match="'seg' is not in the data"):
        invert_preset(tf, d, "seg")


def test_ct_preset_on_a_dicom_series_inverts_to_the_series_grid(tmp_path):
    """DICOM (LPS, 0.5 x 0.75 mm pixels, 2 mm slices) -> RAS, 0.25 x 0.375 x 1 mm, HU window -> back."""
    make_series(tmp_path / "ct", n=5, rows=6, cols=4, spacing_z=2.0, origin=(-10.0, 20.0, 30.0))
    ct = load_dicom_series(tmp_path / "ct")
    seg = MetaTensor(torch.zeros_like(ct.as_tensor()), affine=ct.affine.clone())
    seg[0, 1:3, 2:5, 1:4] = 1.0
    seg[0, 2, 3, 2] = 3.0
    write_nifti(seg, tmp_path / "seg.nii.gz")
    tf = ct_transforms(pixdim=(0.375, 0.25, 1.0))  # array axes: X along a row (0.75 mm), Y down a column (0.5 mm)
    d = tf({"image": tmp_path / "ct", "label": tmp_path / "seg.nii.gz"})
    assert tuple(d["image"].shape[1:]) != tuple(ct.shape[1:])
    d["pred"] = d["label"].clone()
    out = invert_preset(tf, d, "pred")["pred"]
    _assert_on_original_grid(out, ct)
    assert torch.equal(out.as_tensor(), seg.as_tensor())
