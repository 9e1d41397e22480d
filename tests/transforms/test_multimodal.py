"""Several modalities as channels (BraTS FLAIR + T1c) and normalisation inside a brain mask."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_peft.errors import InputDataError
from monai_peft.transforms.dicom_series import load_dicom_series
from monai_peft.transforms.nifti_writer import write_nifti
from monai_peft.transforms.presets import mr_transforms
from monai_peft.transforms.volume_io import LoadVolumed, load_volume
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

pytestmark = pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader")

BRATS = "brats/brats_2013_pat0003_1"


def _brats(name: str, case: str = BRATS):
    return require_shared(f"{case}/{name}.nii.gz")


def _write(path, data, affine):
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.asarray(affine, np.float64)), str(path))
    return path


def _aniso_affine(origin=(10.0, -20.0, 5.0), spacing=(0.8, 1.2, 3.0)):
    aff = np.diag([*spacing, 1.0])
    aff[:3, 3] = origin
    return aff


def test_brats_flair_and_t1c_load_as_two_channels():
    flair, t1c = _brats("Flair_subtrMeanDivStd"), _brats("T1c_subtrMeanDivStd")
    img = load_volume([flair, t1c])
    assert isinstance(img, MetaTensor) and tuple(img.shape) == (2, 240, 240, 155)
    one, two = load_volume(flair), load_volume(t1c)
    assert torch.equal(img[0], one[0].as_tensor()) and torch.equal(img[1], two[0].as_tensor())
    assert torch.equal(img.affine, one.affine)
    assert img.meta["filename_or_obj"] == str(flair)
    assert img.meta["channel_files"] == [str(flair), str(t1c)]
    assert img.meta["modalities"] == ["Flair_subtrMeanDivStd", "T1c_subtrMeanDivStd"]
    named = load_volume({"flair": flair, "t1c": t1c})  # a mapping names the channels
    assert named.meta["modalities"] == ["flair", "t1c"] and torch.equal(named.as_tensor(), img.as_tensor())
    assert load_volume([flair, t1c], modalities=("FLAIR", "T1c")).meta["modalities"] == ["FLAIR", "T1c"]


def test_channels_with_different_geometry_are_refused_naming_the_file(tmp_path):
    data = np.random.default_rng(0).normal(size=(5, 7, 4))
    a = _write(tmp_path / "flair.nii.gz", data, _aniso_affine())
    same = _write(tmp_path / "t1.nii.gz", data * 2, _aniso_affine())
    assert tuple(load_volume([a, same]).shape) == (2, 5, 7, 4)
    shifted = _write(tmp_path / "t1c_shifted.nii.gz", data, _aniso_affine(origin=(10.0, -18.0, 5.0)))
    with pytest.raises(InputDataError, match=r"t1c_shifted\.nii\.gz.*origin") as err:
        load_volume([a, shifted])
    assert "flair.nii.gz" in str(err.value)
    spacing = _write(tmp_path / "t2_spacing.nii.gz", data, _aniso_affine(spacing=(0.8, 1.2, 2.0)))
    with pytest.raises(InputDataError, match=r"t2_spacing\.nii\.gz.*spacing"):
        load_volume([a, same, spacing])
    shape = _write(tmp_path / "small.nii.gz", data[:, :, :3], _aniso_affine())
    with pytest.raises(InputDataError, match=r"small\.nii\.gz.*spatial shape"):
        load_volume([a, shape])
    with pytest.raises(InputDataError, match="empty"):
        load_volume([])
    with pytest.raises(InputDataError, match=r"missing\.nii\.gz' does not exist"):
        load_volume([a, tmp_path / "missing.nii.gz"])
    with pytest.raises(InputDataError, match="2 modality names for 3 files"):
        load_volume([a, same, same], modalities=["a", "b"])


def test_load_volumed_and_mr_preset_take_a_list_of_files_per_key():
    files = [_brats("Flair_subtrMeanDivStd"), _brats("T1c_subtrMeanDivStd")]
    label = _brats("OTMultiClass")
    d = LoadVolumed(("image", "label"))({"image": files, "label": label})
    assert tuple(d["image"].shape) == (2, 240, 240, 155) and tuple(d["label"].shape) == (1, 240, 240, 155)
    out = mr_transforms(norm=None)({"image": files, "label": label})
    assert tuple(out["image"].shape) == (2, 240, 240, 155) and tuple(out["label"].shape) == (1, 240, 240, 155)
    assert out["image"].meta["channel_files"] == [str(f) for f in files]
    # RAS: BraTS files are stored with x and y reversed; the preset flips both, channels stay paired
    assert np.all(np.diag(out["image"].affine.numpy())[:3] > 0)
    np.testing.assert_array_equal(out["image"][1].numpy(), d["image"][1].numpy()[::-1, ::-1, :])
    assert set(torch.unique(out["label"]).tolist()) == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_brats_masked_normalisation_in_the_preset():
    files = [_brats("Flair_subtrMeanDivStd"), _brats("T1c_subtrMeanDivStd")]
    mask_file = _brats("brainmask")
    brain = load_volume(mask_file)[0] > 0.5
    # the problem: z-scored BraTS has a non-zero background, so nonzero=True normalises over the whole volume
    with pytest.warns(UserWarning, match=r"constant non-zero background.*norm_mask_key"):
        plain = mr_transforms(axcodes=None, label_key=None, nonzero=True)({"image": files})["image"]
    assert abs(float(plain[0][brain].mean()) - 0.0) > 0.5
    tf = mr_transforms(axcodes=None, label_key=None, norm_mask_key="mask")
    out = tf({"image": files, "mask": mask_file})
    assert "mask" in out and tuple(out["image"].shape) == (2, 240, 240, 155)
    raw = load_volume(files).numpy()
    for c in range(2):
        inside = out["image"][c][brain]
        assert abs(float(inside.mean())) < 1e-4 and abs(float(inside.std(unbiased=False)) - 1.0) < 1e-4
        expected = (raw[c][brain.numpy()] - raw[c][brain.numpy()].mean()) / raw[c][brain.numpy()].std()
        np.testing.assert_allclose(inside.numpy(), expected, atol=1e-4)
        assert float(out["image"][c][~brain].abs().max()) == 0.0  # background set to 0
    # a threshold mask: every voxel above the channel minimum (the BraTS background value)
    thr = mr_transforms(axcodes=None, label_key=None, norm_mask_threshold="min")({"image": files})["image"]
    np.testing.assert_allclose(thr[0].numpy(), out["image"][0].numpy(), atol=1e-5)  # FLAIR: min == outside brain
    with pytest.raises(InputDataError, match="'mask' is not in the data"):
        tf({"image": files})


def test_a_dicom_series_and_a_nifti_on_its_grid_stack_and_a_shifted_series_is_refused(tmp_path):
    make_series(tmp_path / "t1", n=4, rows=6, cols=5, spacing_z=2.5, origin=(-10.0, 20.0, 30.0))
    t1 = load_dicom_series(tmp_path / "t1")
    t2 = write_nifti(t1 * 2.0 + 1.0, tmp_path / "t2.nii.gz")  # another "modality" on the same grid, in NIfTI
    both = load_volume([tmp_path / "t1", t2], modalities=["T1", "T2"])
    assert tuple(both.shape) == (2, *t1.shape[1:]) and both.meta["modalities"] == ["T1", "T2"]
    np.testing.assert_allclose(both[1].numpy(), t1[0].numpy() * 2.0 + 1.0, rtol=1e-6)
    make_series(tmp_path / "flair", n=4, rows=6, cols=5, spacing_z=2.5, origin=(-10.0, 20.0, 35.0))
    with pytest.raises(InputDataError, match=r"modality '.*flair' is not on the grid of '.*t1'"):
        load_volume([tmp_path / "t1", tmp_path / "flair"])
