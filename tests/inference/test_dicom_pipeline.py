"""DICOM series in (real JPEG 2000 CT) -> sliding-window inference -> inverted -> NIfTI + DICOM SEG out; the SEG is
read back with pydicom and highdicom and must sit on the source series' geometry, slice by slice."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import Compose, Orientationd, ScaleIntensityRanged, Spacingd
from torch import nn

from monai_peft.inference import InvertToOriginald, PeftSlidingWindowInferer, SavePredictiond
from tests.conftest import require_shared

HU_THRESHOLD = 300.0  # bone


def _bone_detector() -> nn.Module:
    """A tiny untrained-size network with fixed weights: logit(class 1) - logit(class 0) = 50 (x - t), where x is the
    intensity scaled from [-1000, 1000] HU to [0, 1] and t is the HU threshold on that scale."""
    net = nn.Conv3d(1, 2, kernel_size=1)
    t = (HU_THRESHOLD + 1000.0) / 2000.0
    with torch.no_grad():
        net.weight.zero_()
        net.bias.zero_()
        net.weight[1, 0] = 50.0
        net.bias[1] = -50.0 * t
    return net.eval()


@pytest.mark.filterwarnings("ignore:folder .* InstanceNumbers run:UserWarning")
def test_dicom_series_in_dicom_seg_out(tmp_path) -> None:
    pytest.importorskip("highdicom")
    from monai_peft.transforms import LoadDicomSeriesd, load_dicom_series, read_dicom_seg, sop_uids

    series_dir = require_shared("ct_dicom_series")
    pre = Compose(
        [
            LoadDicomSeriesd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=(2.0, 2.0, 4.0), mode="bilinear"),
            ScaleIntensityRanged("image", a_min=-1000, a_max=1000, b_min=0.0, b_max=1.0, clip=True),
        ]
    )
    d = pre({"image": str(series_dir)})
    assert tuple(d["image"].shape) == (1, 251, 251, 10)  # 512 x 0.977 mm -> 2 mm, 20 x 2 mm -> 4 mm
    logits = PeftSlidingWindowInferer((64, 64, 8), sw_batch_size=4, amp=False)(d["image"][None], _bone_detector())[0]
    d["pred"] = torch.argmax(logits, dim=0, keepdim=True).to(torch.uint8)
    d = InvertToOriginald("pred", pre, orig_key="image")(d)
    saver = SavePredictiond("pred", tmp_path, seg_kwargs={"segment_names": ["bone"]})
    d = saver(d)
    nifti_path, seg_path = tmp_path / "ct_dicom_series_seg.nii.gz", tmp_path / "ct_dicom_series_seg.dcm"
    assert d["pred"].meta["saved_to"] == str(nifti_path) and d["pred"].meta["saved_seg_to"] == str(seg_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([nifti_path.name, seg_path.name])  # no temp files

    ct = load_dicom_series(series_dir)
    label = nib.load(str(nifti_path))
    assert label.shape == (512, 512, 20)
    assert np.allclose(label.affine, ct.affine.numpy(), atol=1e-4)  # NIfTI stores the affine in float32
    lab = np.asanyarray(label.dataobj)
    bone = ct[0].numpy() > HU_THRESHOLD
    assert 0.001 < bone.mean() < 0.5 and np.mean(lab.astype(bool) == bone) > 0.98

    # pydicom: a SEG of the source study / series / frame of reference, frames on the source slices
    seg = pydicom.dcmread(seg_path)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(series_dir.iterdir())]
    sources = {sop_uids(ds)[1]: ds for ds in headers}  # (this anonymised series keeps the UIDs in the file meta)
    assert len(sources) == 20
    first = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert (int(seg.Rows), int(seg.Columns)) == (int(first.Rows), int(first.Columns))
    shared = seg.SharedFunctionalGroupsSequence[0]
    assert np.allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in first.PixelSpacing]
    )
    assert np.allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in first.ImageOrientationPatient],
    )
    n_frames = int(seg.NumberOfFrames)
    assert 0 < n_frames <= 20
    for frame in seg.PerFrameFunctionalGroupsSequence:
        ref_uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        src = sources[str(ref_uid)]
        pos = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert np.allclose(pos, [float(v) for v in src.ImagePositionPatient], atol=1e-3)

    # highdicom reads it, and the label volume it gives on the series grid equals the NIfTI output
    import highdicom as hd

    hd_seg = hd.seg.segread(seg_path)
    assert list(hd_seg.segment_numbers) == [1]
    assert hd_seg.get_segment_description(1).segment_label == "bone"
    assert {uid for _, _, uid in hd_seg.get_source_image_uids()} <= set(sources)
    back = read_dicom_seg(seg_path, series_dir)
    assert tuple(back.shape) == (1, 512, 512, 20)
    assert np.array_equal(back[0].numpy().astype(np.uint8), lab)
