"""DICOM SEG: reading aligned to the source series, writing with highdicom, exact round trips."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImage, Orientation

from monai_peft.errors import DicomError, InputDataError
from monai_peft.transforms import (
    LoadVolumed,
    SaveDicomSegd,
    find_dicom_series,
    load_dicom_series,
    read_dicom_seg,
    write_dicom_seg,
)
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_series

pytestmark = [
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),  # highdicom on source names
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),  # MONAI: no GPU codec here
]


def _read_nrrd(path):
    nrrd = pytest.importorskip("nrrd")  # pynrrd: optional (MONAI's NrrdReader)
    return nrrd.read(path)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _referenced_instances(ds: pydicom.Dataset) -> set[str]:
    return {str(i.ReferencedSOPInstanceUID) for i in ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence}


def test_real_seg_agrees_with_nrrd_label():
    ct_dir = require_shared("dicom/ct_3slice")
    seg_path = require_shared("dicom/liver_seg.dcm")
    ref, _ = _read_nrrd(str(require_shared("dicom/ct_3slice_liver_label.nrrd")))
    ct = load_dicom_series(ct_dir)
    seg = read_dicom_seg(seg_path, ct_dir)
    assert seg.shape == ct.shape == (1, 512, 512, 3)
    assert torch.equal(seg.affine, ct.affine)
    assert _dice(seg[0].numpy(), ref) == 1.0
    np.testing.assert_array_equal(seg[0].numpy(), ref)
    assert seg.meta["segment_labels"] == "Liver"
    own = read_dicom_seg(seg_path)  # geometry from the SEG's own plane positions
    np.testing.assert_array_equal(own[0].numpy(), ref)
    np.testing.assert_allclose(own.affine.numpy(), ct.affine.numpy(), atol=1e-3)


def test_real_seg_through_load_volumed():
    d = LoadVolumed(("image", "label"), reference_key="image")(
        {"image": require_shared("dicom/ct_3slice"), "label": require_shared("dicom/liver_seg.dcm")}
    )
    ref, _ = _read_nrrd(str(require_shared("dicom/ct_3slice_liver_label.nrrd")))
    np.testing.assert_array_equal(d["label"][0].numpy(), ref)


def test_write_seg_from_real_3slice_ct_round_trips(tmp_path):
    ct_dir = require_shared("dicom/ct_3slice")
    label = read_dicom_seg(require_shared("dicom/liver_seg.dcm"), ct_dir)
    series = find_dicom_series(ct_dir)
    out = write_dicom_seg(
        label, ct_dir, tmp_path / "out" / "liver.dcm", segment_names={1: "liver"}, segment_colors={1: (200, 30, 30)}
    )
    assert out.segment_values == {1: 1}
    back = read_dicom_seg(out.path, ct_dir)
    assert torch.equal(back.as_tensor(), label.as_tensor())
    ds = pydicom.dcmread(out.path)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.SegmentSequence[0].SegmentLabel == "liver"
    assert ds.FrameOfReferenceUID == series.datasets[0].FrameOfReferenceUID
    assert ds.StudyInstanceUID == series.datasets[0].StudyInstanceUID
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == series.series_instance_uid
    assert _referenced_instances(ds) == set(series.sop_instance_uids)
    seg = hd.seg.segread(out.path)  # highdicom reads it and resolves every source instance
    frames = seg.get_pixels_by_source_instance(
        series.sop_instance_uids, combine_segments=True, ignore_spatial_locations=True
    )
    np.testing.assert_array_equal(frames.transpose(2, 1, 0), label[0].numpy())


@pytest.mark.filterwarnings("ignore::monai_peft.transforms.dicom_series.MissingSliceWarning")  # a 20-slice subset
def test_write_seg_from_real_ct_series_and_nifti_label(tmp_path):
    ct_dir = require_shared("ct_dicom_series")
    nifti = LoadImage(reader="NibabelReader", ensure_channel_first=True)(
        str(require_shared("totalseg/ct_dicom_series_label.nii.gz"))
    )
    with pytest.warns(UserWarning, match="empty StudyInstanceUID"):  # this test series is anonymised
        out = write_dicom_seg(nifti, ct_dir, tmp_path / "multi.dcm")  # label is LAS: moved to the series grid
    values = sorted(int(v) for v in np.unique(nifti.numpy()) if v)
    assert list(out.segment_values.values()) == values and len(values) == 31
    back = read_dicom_seg(out.path, ct_dir, label_values=out.segment_values)
    orient = Orientation(axcodes="RAS", labels=None)
    assert torch.equal(orient(back).as_tensor(), orient(nifti).as_tensor())
    ds = pydicom.dcmread(out.path)
    series = find_dicom_series(ct_dir)
    assert _referenced_instances(ds) == set(series.sop_instance_uids)  # from the file meta (dataset UIDs blank)
    assert len(ds.SegmentSequence) == 31


def test_synthetic_round_trip_with_non_consecutive_labels(tmp_path):
    make_series(tmp_path / "ct", n=4, rows=6, cols=5)
    ct = load_dicom_series(tmp_path / "ct")
    label = torch.zeros_like(ct)
    label[0, 1:3, 2:4, 1] = 2
    label[0, 0, 0, 3] = 7
    res = write_dicom_seg(label, tmp_path / "ct", tmp_path / "seg.dcm", segment_names=["a", "b"])
    assert res.segment_values == {1: 2, 2: 7}
    ds = pydicom.dcmread(res.path)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["b", "label 7"]  # names[i] names value i + 1
    numbers = read_dicom_seg(res.path, tmp_path / "ct")
    assert set(np.unique(numbers.numpy())) == {0, 1, 2}
    values = read_dicom_seg(res.path, tmp_path / "ct", label_values=res.segment_values)
    assert torch.equal(values.as_tensor(), label.as_tensor())
    ras = Orientation(axcodes="RAS", labels=None)(label)  # flipped axes are moved back before writing
    res2 = write_dicom_seg(ras, tmp_path / "ct", tmp_path / "seg2.dcm")
    assert torch.equal(read_dicom_seg(res2.path, tmp_path / "ct", label_values=res2.segment_values), label)


def test_save_dicom_segd_pipeline(tmp_path):
    make_series(tmp_path / "ct", n=3)
    d = LoadVolumed("image")({"image": tmp_path / "ct"})
    pred = torch.zeros_like(d["image"])
    pred[0, 1, 1, 1] = 1
    d["pred"] = pred
    d = SaveDicomSegd("pred", output_dir=tmp_path / "out", source_key="image")(d)
    saved = d["pred"].meta["saved_to"]
    assert saved.endswith("_seg.dcm")
    back = LoadVolumed(("image", "label"))({"image": tmp_path / "ct", "label": saved})
    assert torch.equal(back["label"].as_tensor(), pred.as_tensor())


def test_write_errors(tmp_path):
    make_series(tmp_path / "ct", n=3, rows=6, cols=4)
    ct = load_dicom_series(tmp_path / "ct")
    with pytest.raises(InputDataError, match="empty"):
        write_dicom_seg(torch.zeros_like(ct), tmp_path / "ct", tmp_path / "x.dcm")
    with pytest.raises(InputDataError, match=r"does not match the source series"):
        write_dicom_seg(np.ones((4, 6, 2), np.uint8), tmp_path / "ct", tmp_path / "x.dcm")
    shifted = MetaTensor(torch.ones_like(ct.as_tensor()), affine=ct.affine.clone())
    shifted.affine[2, 3] += 5.0
    with pytest.raises(InputDataError, match="origin"):
        write_dicom_seg(shifted, tmp_path / "ct", tmp_path / "x.dcm")
    with pytest.raises(InputDataError, match="non-integer"):
        write_dicom_seg(ct * 0 + 0.5, tmp_path / "ct", tmp_path / "x.dcm")
    with pytest.raises(InputDataError, match="channels"):
        write_dicom_seg(torch.zeros((2, 4, 6, 3)), tmp_path / "ct", tmp_path / "x.dcm")


def test_read_errors(tmp_path):
    paths, _ = make_series(tmp_path / "a", n=3)
    make_series(tmp_path / "b", n=3)
    ct = load_dicom_series(tmp_path / "a")
    lab = torch.zeros_like(ct)
    lab[0, 0, 0, 0] = 1
    res = write_dicom_seg(lab, tmp_path / "a", tmp_path / "seg.dcm")
    with pytest.raises(DicomError, match="not a DICOM SEG"):
        read_dicom_seg(paths[0], tmp_path / "a")
    with pytest.raises(DicomError, match="references series .* another series"):
        read_dicom_seg(res.path, tmp_path / "b")


def test_seg_without_source_references_is_placed_by_position(tmp_path):
    ct_dir = require_shared("dicom/ct_3slice")
    ds = pydicom.dcmread(require_shared("dicom/liver_seg.dcm"))
    for item in ds.PerFrameFunctionalGroupsSequence:  # frames keep their positions, lose their source links
        del item.DerivationImageSequence
    ds.save_as(tmp_path / "noref.dcm")
    ref, _ = _read_nrrd(str(require_shared("dicom/ct_3slice_liver_label.nrrd")))
    np.testing.assert_array_equal(read_dicom_seg(tmp_path / "noref.dcm", ct_dir)[0].numpy(), ref)
    ds.PerFrameFunctionalGroupsSequence[0].PlanePositionSequence[0].ImagePositionPatient[2] += 0.5
    ds.save_as(tmp_path / "moved.dcm")
    with pytest.raises(DicomError, match="not on"):
        read_dicom_seg(tmp_path / "moved.dcm", ct_dir)


def _two_series_same_grid(tmp_path):
    """Series A and B: same frame of reference, same grid (7 rows x 5 columns x 4 slices), different UIDs;
    a SEG written for A with 1 + 2 * 3 labelled voxels."""
    frame_uid, study_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    for name in ("a", "b"):
        make_series(tmp_path / name, n=4, rows=7, cols=5, spacing_z=2.5, frame_uid=frame_uid, study_uid=study_uid)
    ct_a = load_dicom_series(tmp_path / "a")
    label = torch.zeros_like(ct_a)
    label[0, 1, 2, 0] = 1
    label[0, 2:4, 3:6, 2] = 1
    res = write_dicom_seg(label, tmp_path / "a", tmp_path / "seg_a.dcm")
    return res.path, label


def test_series_meta_carries_series_and_instance_uids(tmp_path):
    make_series(tmp_path / "ct", n=3)
    series = find_dicom_series(tmp_path / "ct")
    vol = series.load()
    assert vol.meta["series_instance_uid"] == series.series_instance_uid
    assert vol.meta["sop_instance_uids"].split("\\") == series.sop_instance_uids


@pytest.mark.parametrize("path", ["load_volume_metatensor", "load_volumed", "ct_transforms", "dicom_series", "uid"])
def test_seg_of_another_series_is_refused_on_every_path(tmp_path, path):
    from monai_peft.transforms.presets import ct_transforms
    from monai_peft.transforms.volume_io import load_volume

    seg_path, label = _two_series_same_grid(tmp_path)
    good = load_volume(seg_path, reference=load_volume(tmp_path / "a"))  # control: A gives the label back
    assert int(good.sum()) == int(label.sum()) == 7
    b = tmp_path / "b"
    calls = {
        "load_volume_metatensor": lambda: load_volume(seg_path, reference=load_volume(b)),
        "load_volumed": lambda: LoadVolumed(("image", "label"))({"image": b, "label": seg_path}),
        "ct_transforms": lambda: ct_transforms(pixdim=None, window=None)({"image": b, "label": seg_path}),
        "dicom_series": lambda: read_dicom_seg(seg_path, find_dicom_series(b)),
        "uid": lambda: read_dicom_seg(seg_path, b, series_uid=find_dicom_series(b).series_instance_uid),
    }
    with pytest.raises(DicomError, match="references series") as err:
        calls[path]()
    assert find_dicom_series(b).series_instance_uid in str(err.value)


def test_seg_frames_referencing_instances_outside_the_series_are_refused(tmp_path):
    """Same SeriesInstanceUID, new SOPInstanceUIDs (a re-export): frames would silently drop out."""
    seg_path, label = _two_series_same_grid(tmp_path)
    uid_a = find_dicom_series(tmp_path / "a").series_instance_uid
    for f in (tmp_path / "b").iterdir():
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = uid_a
        ds.save_as(f)
    with pytest.raises(DicomError, match="not in the series") as err:
        read_dicom_seg(seg_path, tmp_path / "b")
    assert "2 of 2" in str(err.value) and "check_references=False" in str(err.value)
    by_position = read_dicom_seg(seg_path, tmp_path / "b", check_references=False)  # same grid: placed by position
    assert torch.equal(by_position.as_tensor(), label.as_tensor())


def test_seg_with_a_nifti_image_says_what_to_do(tmp_path):
    from monai.data import NibabelWriter

    from monai_peft.transforms.volume_io import load_volume

    seg_path, _ = _two_series_same_grid(tmp_path)
    ct = load_volume(tmp_path / "a")
    writer = NibabelWriter()
    writer.set_data_array(ct, channel_dim=0)
    writer.set_metadata({"affine": ct.affine, "original_affine": ct.affine})
    writer.write(str(tmp_path / "ct.nii.gz"))
    with pytest.raises(DicomError, match="not a DICOM series") as err:
        load_volume(seg_path, reference=load_volume(tmp_path / "ct.nii.gz"))
    assert "ct.nii.gz" in str(err.value)


def test_seg_writer_is_atomic(tmp_path, monkeypatch):
    make_series(tmp_path / "ct", n=3, rows=6, cols=4)
    ct = load_dicom_series(tmp_path / "ct")
    label = torch.zeros_like(ct)
    label[0, 1, 1, 1] = 1
    out = tmp_path / "out" / "seg.dcm"
    write_dicom_seg(label, tmp_path / "ct", out)
    before = out.read_bytes()

    def failing_dcmwrite(filename, dataset, *args, **kwargs):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 300)  # some bytes reach the disk, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom, "dcmwrite", failing_dcmwrite)
    label[0, 2, 2, 2] = 1
    with pytest.raises(OSError, match="No space"):
        write_dicom_seg(label, tmp_path / "ct", out)
    assert out.read_bytes() == before  # the old file is intact, not overwritten by a partial one
    with pytest.raises(OSError):
        write_dicom_seg(label, tmp_path / "ct", tmp_path / "out" / "new.dcm")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["seg.dcm"]  # no partial file, no temp left


def test_write_seg_rotated_label_message_has_no_unknown_argument(tmp_path):
    make_series(tmp_path / "ct", n=3, rows=6, cols=4)
    ct = load_dicom_series(tmp_path / "ct")
    rot = ct.affine.clone()
    rot[:3, :3] = rot[:3, :3] @ torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=rot.dtype)
    lab = MetaTensor(torch.ones_like(ct.as_tensor()), affine=rot)
    with pytest.raises(InputDataError, match="axis directions differ") as err:
        write_dicom_seg(lab, tmp_path / "ct", tmp_path / "x.dcm")
    assert "match_orientation" not in str(err.value)
    assert "ResampleToMatch" in str(err.value)
