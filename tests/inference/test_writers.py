"""Atomic writers: no partial file after a failed write, earlier outputs intact, a case gets all its outputs or
none, a bad output folder fails before any work, case names kept."""

from __future__ import annotations

import os
import stat

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_peft.errors import InputDataError
from monai_peft.inference import (
    OutputDirError,
    SavePredictiond,
    atomic_write,
    case_name,
    check_output_dir,
    write_prediction_nifti,
)
from monai_peft.inference import writers as w


def _affine() -> np.ndarray:
    return np.array([[-0.8, 0, 0, 10.5], [0, 0.8, 0, -3.0], [0, 0, 3.0, 7.25], [0, 0, 0, 1]])


def _pred(values: np.ndarray, source: str = "/data/case_007.nii.gz") -> MetaTensor:
    return MetaTensor(torch.as_tensor(values), affine=torch.as_tensor(_affine()), meta={"filename_or_obj": source})


def test_atomic_write_failure_leaves_no_partial_file_and_keeps_the_old_one(tmp_path) -> None:
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous result")

    def broken(tmp):
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.nii.gz"]
    atomic_write(target, lambda tmp: tmp.write_bytes(b"new"))
    assert target.read_bytes() == b"new" and len(list(tmp_path.iterdir())) == 1


def test_temp_file_keeps_the_extension_so_nibabel_compresses(tmp_path, monkeypatch) -> None:
    seen = []
    real_save = nib.Nifti1Image.to_filename

    def spy(img, name):
        seen.append(str(name))
        real_save(img, name)

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", spy)
    out = write_prediction_nifti(_pred(np.ones((1, 6, 5, 4), np.uint8)), tmp_path / "a.nii.gz")
    assert seen[0].endswith(".nii.gz") and os.path.dirname(seen[0]) == str(tmp_path)
    with open(out, "rb") as f:
        assert f.read(2) == b"\x1f\x8b"  # gzip
    img = nib.load(str(out))
    assert np.allclose(img.affine, _affine(), atol=1e-6) and img.shape == (6, 5, 4)  # NIfTI stores float32


def test_save_prediction_names_after_the_case_and_stores_labels_compactly(tmp_path) -> None:
    labels = np.zeros((1, 7, 5, 3), np.int64)
    labels[0, 2:4, 1:3, 1] = 4
    saver = SavePredictiond("pred", tmp_path / "new" / "folder", output_postfix="seg")
    d = saver({"pred": _pred(labels)})
    out = tmp_path / "new" / "folder" / "case_007_seg.nii.gz"
    assert d["pred"].meta["saved_to"] == str(out) and d["pred"].meta["saved_seg_to"] is None
    img = nib.load(str(out))
    assert img.get_data_dtype() == np.uint8 and np.array_equal(np.asanyarray(img.dataobj), labels[0])
    # probabilities stay float32, several channels go last
    probs = np.random.default_rng(0).random((3, 7, 5, 3)).astype(np.float32)
    SavePredictiond("pred", tmp_path, output_postfix="prob")({"pred": _pred(probs)})
    back = nib.load(str(tmp_path / "case_007_prob.nii.gz"))
    assert back.shape == (7, 5, 3, 3) and np.allclose(np.asanyarray(back.dataobj), np.moveaxis(probs, 0, -1))


def test_case_names() -> None:
    assert case_name("/x/BraTS_001.nii.gz") == "BraTS_001"
    assert case_name("/x/scan.v2.nrrd") == "scan.v2"
    assert case_name(["/d/pat3/Flair.nii.gz", "/d/pat3/T1c.nii.gz"]) == "pat3"
    assert case_name(["/d/a.nii.gz"]) == "a"
    assert case_name(None) == "case"


def test_case_name_of_a_folder(tmp_path) -> None:
    series = tmp_path / "ct_series.v1"
    series.mkdir()
    assert case_name(series) == "ct_series.v1"  # a folder keeps its full name (no extension stripping)


def test_failed_case_writes_nothing_and_keeps_earlier_outputs(tmp_path, monkeypatch) -> None:
    saver = SavePredictiond("pred", tmp_path)
    labels = np.ones((1, 4, 4, 4), np.uint8)
    saver({"pred": _pred(labels)})
    out = tmp_path / "case_007_seg.nii.gz"
    before = out.read_bytes()

    def fail_midway(self, filename):
        with open(filename, "wb") as f:
            f.write(b"\x1f\x8b partial")
        raise OSError("no space left on device")

    monkeypatch.setattr(nib.Nifti1Image, "to_filename", fail_midway)
    with pytest.raises(OSError, match="nothing was written for this case"):
        saver({"pred": _pred(labels * 2)})
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case_007_seg.nii.gz"]


def test_second_output_failing_removes_the_first(tmp_path) -> None:
    calls = []

    def ok(tmp):
        calls.append(tmp)
        tmp.write_bytes(b"nifti")

    def bad(tmp):
        tmp.write_bytes(b"seg...")
        raise RuntimeError("highdicom refused the frames")

    with pytest.raises(OSError, match="case 'c1'"):
        SavePredictiond._commit([(tmp_path / "c1.nii.gz", ok), (tmp_path / "c1.dcm", bad)], "c1")
    assert calls and list(tmp_path.iterdir()) == []


def test_output_folder_problems_fail_at_construction(tmp_path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(OutputDirError, match="cannot create the output folder"):
        SavePredictiond("pred", a_file / "sub")
    with pytest.raises(OutputDirError, match="not a folder"):
        check_output_dir(a_file)


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can write to read-only folders")
def test_read_only_output_folder(tmp_path) -> None:  # pragma: no cover - not run as root
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(OutputDirError, match="not writable"):
            SavePredictiond("pred", ro)
    finally:
        ro.chmod(stat.S_IRWXU)


def test_probe_failure_is_reported(tmp_path, monkeypatch) -> None:
    """A folder where creating files fails (read-only mount, quota) is reported with the folder's name."""
    real_open = open

    def deny(path, *args, **kwargs):
        if ".write-probe-" in str(path):
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(OutputDirError, match=f"output folder {tmp_path} is not writable"):
        check_output_dir(tmp_path)


def test_refuses_to_overwrite_the_input(tmp_path) -> None:
    src = tmp_path / "scan.nii.gz"
    src.write_bytes(b"input")
    pred = _pred(np.ones((1, 3, 3, 3), np.uint8), source=str(tmp_path / "scan.nii.gz"))
    with pytest.raises(InputDataError, match="overwrite the input"):
        SavePredictiond("pred", tmp_path, output_postfix="")({"pred": pred})
    assert src.read_bytes() == b"input"


def test_bad_predictions(tmp_path) -> None:
    saver = SavePredictiond("pred", tmp_path)
    with pytest.raises(InputDataError, match="batch axis"):
        saver({"pred": _pred(np.ones((1, 1, 3, 3, 3), np.uint8))})
    with pytest.raises(InputDataError, match="MetaTensor"):
        saver({"pred": torch.ones(1, 3, 3, 3)})
    with pytest.raises(InputDataError, match="dicom_seg=True needs a DICOM series"):
        SavePredictiond("pred", tmp_path, dicom_seg=True)({"pred": _pred(np.ones((1, 3, 3, 3), np.uint8))})
    assert list(tmp_path.iterdir()) == []


def test_2d_prediction_is_written_as_one_slice(tmp_path) -> None:
    pred = MetaTensor(torch.ones(1, 6, 4, dtype=torch.uint8), affine=torch.eye(4), meta={"filename_or_obj": "x.png"})
    SavePredictiond("pred", tmp_path, output_postfix="mask")({"pred": pred})
    img = nib.load(str(tmp_path / "x_mask.nii.gz"))
    assert img.shape == (6, 4, 1)


def test_storage_dtype_rules() -> None:
    assert w._storage(np.array([0.0, 2.0, 300.0]), None).dtype == np.int16
    assert w._storage(np.array([0, 1], bool), None).dtype == np.uint8
    assert w._storage(np.array([0.5, 1.0]), None).dtype == np.float32
    assert w._storage(np.array([-1, 70000]), None).dtype == np.int32
