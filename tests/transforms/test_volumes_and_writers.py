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
    LoadVolumed,
    SaveNiftid,
    ct_transforms,
    load_dicom_series,
    load_volume,
    mr_transforms,
    volume_format,
    write_nifti,
)
from tests.conftest import REPO_ROOT, require_shared
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


def _nan_label(tmp_path, name="seg_nan.nii.gz", n_nan=3):
    aff = np.diag([0.8, 1.2, 3.0, 1.0])
    image = np.random.default_rng(0).normal(100.0, 10.0, (6, 5, 4)).astype(np.float32)
    label = np.zeros((6, 5, 4), np.float32)
    label[1:3, 1:3, 1:3] = 1.0
    label.reshape(-1)[:n_nan] = np.nan
    nib.save(nib.Nifti1Image(image, aff), str(tmp_path / "img.nii.gz"))
    nib.save(nib.Nifti1Image(label, aff), str(tmp_path / name))
    return tmp_path / "img.nii.gz", tmp_path / name


@pytest.mark.parametrize("preset", ["ct", "mr"])
def test_nan_in_label_is_refused_with_count_and_file(tmp_path, preset):
    image, label = _nan_label(tmp_path)
    make = {"ct": lambda **kw: ct_transforms(pixdim=None, **kw), "mr": mr_transforms}[preset]
    for kwargs in ({}, {"nan_replace": 0.0}):  # replacing image NaNs never silently repairs a label
        with pytest.raises(InputDataError, match=r"'label' has 3 non-finite voxel\(s\) out of 120") as err:
            make(**kwargs)({"image": image, "label": label})
        assert f"'{label}'" in str(err.value)
    inf_label = tmp_path / "seg_inf.nii.gz"
    data = np.zeros((6, 5, 4), np.float32)
    data[0, 0, 0] = np.inf
    nib.save(nib.Nifti1Image(data, np.diag([0.8, 1.2, 3.0, 1.0])), str(inf_label))
    with pytest.raises(InputDataError, match=r"1 \+Inf.*seg_inf\.nii\.gz"):
        make()({"image": image, "label": inf_label})


def _fail_midway(monkeypatch, after_bytes=2048):
    """Make the gzip stream nibabel writes fail with ENOSPC once ``after_bytes`` have gone through."""
    import errno
    import gzip

    written = {"n": 0}
    real_write = gzip.GzipFile.write

    def write(self, data):
        if written["n"] >= after_bytes:
            raise OSError(errno.ENOSPC, "No space left on device")
        written["n"] += len(memoryview(data).cast("B"))
        return real_write(self, data)

    monkeypatch.setattr(gzip.GzipFile, "write", write)
    return written


def test_write_nifti_is_atomic_when_the_write_fails_midway(tmp_path, monkeypatch):
    aff = np.diag([0.8, 1.2, 3.0, 1.0])
    big = MetaTensor(torch.rand((1, 40, 30, 20)), affine=torch.as_tensor(aff))
    target = tmp_path / "out" / "pred.nii.gz"
    with monkeypatch.context() as m:
        written = _fail_midway(m)
        with pytest.raises(OSError, match="No space left"):
            write_nifti(big, target)
        assert written["n"] >= 2048  # it really failed in the middle of the data
    assert not target.exists() and list(target.parent.iterdir()) == []  # no partial file, no temp left
    earlier = MetaTensor(torch.ones((1, 4, 3, 2)), affine=torch.as_tensor(aff))
    write_nifti(earlier, target)
    before = target.read_bytes()
    with monkeypatch.context() as m:
        _fail_midway(m)
        with pytest.raises(OSError):
            write_nifti(big, target)
    assert target.read_bytes() == before and list(target.parent.iterdir()) == [target]
    assert torch.equal(load_volume(target).as_tensor(), earlier.as_tensor())
    # SaveNiftid goes through the same path
    with monkeypatch.context() as m:
        _fail_midway(m)
        big.meta["filename_or_obj"] = str(tmp_path / "case07.nii.gz")
        with pytest.raises(OSError):
            SaveNiftid("pred", output_dir=tmp_path / "saved", output_postfix="seg")({"pred": big})
    assert not (tmp_path / "saved" / "case07_seg.nii.gz").exists()
    assert list((tmp_path / "saved").iterdir()) == []
    # a normal write still gives the right file (an uncompressed one too)
    write_nifti(big, tmp_path / "plain.nii")
    np.testing.assert_array_equal(nib.load(str(tmp_path / "plain.nii")).get_fdata(), big[0].numpy())


def test_write_nifti_killed_midway_leaves_no_partial_file(tmp_path):
    """A process killed while writing (SIGKILL) leaves at most a hidden temp file, never the final name."""
    import os
    import signal
    import subprocess
    import sys
    import time

    target = tmp_path / "killed.nii.gz"
    code = (
        "import gzip, time, torch\n"
        "from monai.data import MetaTensor\n"
        "from monai_peft.transforms.nifti_writer import write_nifti\n"
        "real = gzip.GzipFile.write\n"
        "def slow(self, data):\n"
        "    real(self, data); self.flush(); print('writing', flush=True); time.sleep(60)\n"
        "gzip.GzipFile.write = slow\n"
        f"write_nifti(MetaTensor(torch.rand((1, 40, 30, 20)), affine=torch.eye(4)), {str(target)!r})\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=str(REPO_ROOT), env=env)
    try:
        line = proc.stdout.readline()
        assert b"writing" in line
        time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not target.exists()
    # at most a hidden '.killed.nii.gz.<random>.tmp', never the final name nor anything a '*.nii.gz' glob finds
    assert all(p.name.startswith(".killed.nii.gz.") and p.suffix == ".tmp" for p in tmp_path.iterdir())
    assert list(tmp_path.glob("*.nii.gz")) == [] and list(tmp_path.glob("*.nii")) == []


def _truncated_copy(src, dst, fraction=0.5):
    raw = src.read_bytes()
    dst.write_bytes(raw[: int(len(raw) * fraction)])
    return dst


def test_truncated_nifti_gives_an_error_naming_the_file(tmp_path):
    aff = np.diag([0.8, 1.2, 3.0, 1.0])
    data = np.random.default_rng(1).normal(size=(40, 30, 20)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "full.nii.gz"))
    nib.save(nib.Nifti1Image(data, aff), str(tmp_path / "full.nii"))
    cut_gz = _truncated_copy(tmp_path / "full.nii.gz", tmp_path / "cut.nii.gz")
    cut_nii = _truncated_copy(tmp_path / "full.nii", tmp_path / "cut.nii")
    for cut in (cut_gz, cut_nii):
        with pytest.raises(InputDataError, match=rf"'{cut}' is truncated"):
            load_volume(cut)
        with pytest.raises(InputDataError, match=rf"'{cut}' is truncated"):
            LoadVolumed("image")({"image": cut})
        with pytest.raises(InputDataError, match=rf"'{cut}' is truncated"):
            mr_transforms(label_key=None)({"image": cut})
    with pytest.raises(InputDataError, match=r"header describes 96352 bytes .* the file has 48176 bytes"):
        load_volume(cut_nii)  # 352-byte header + 40*30*20 float32, half of it on disk
    with pytest.raises(InputDataError, match=r"cut\.nii\.gz' is truncated"):
        ct_transforms(pixdim=None)({"image": tmp_path / "full.nii.gz", "label": cut_gz})
    damaged = bytearray((tmp_path / "full.nii.gz").read_bytes())
    damaged[len(damaged) // 2 : len(damaged) // 2 + 64] = bytes(64)
    (tmp_path / "damaged.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(InputDataError, match=r"damaged\.nii\.gz' is (corrupt|truncated)"):
        load_volume(tmp_path / "damaged.nii.gz")


def test_real_brats_file_cut_at_2mb_names_the_file(tmp_path):
    """As seen after a failed write: the first 2 MB of a 3.3 MB BraTS FLAIR."""
    src = require_shared("brats/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz")
    cut = tmp_path / "Flair_partial.nii.gz"
    cut.write_bytes(src.read_bytes()[: 2 * 1024 * 1024])
    with pytest.raises(InputDataError, match=r"Flair_partial\.nii\.gz' is truncated.*2097152 bytes"):
        load_volume(cut)
    with pytest.raises(InputDataError, match=r"Flair_partial\.nii\.gz' is truncated"):
        mr_transforms()({"image": cut, "label": src.parent / "OTMultiClass.nii.gz"})
