"""Predictions back on the input's grid: exact affine and shape after Orientation / Spacing / crop / pad, on real
non-square anisotropic volumes (TotalSegmentator MR 117x91x20 at 3 mm, BraTS 240x240x155 with two modalities)."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureChannelFirstd,
    LoadImaged,
    NormalizeIntensityd,
    Orientationd,
    Spacingd,
    SpatialPadd,
)

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.inference import InvertToOriginald, PeftSlidingWindowInferer, SavePredictiond, invert_prediction
from tests.conftest import require_shared
from tests.inference import nets as tn

MR = "totalseg/example_mr_sm.nii.gz"
MR_SEG = "totalseg/example_seg_mr.nii.gz"
BRATS = "brats/brats_2013_pat0003_1"


def _mr_pipeline(resample: bool) -> Compose:
    keys = ["image", "label"]
    steps = [LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS")]
    if resample:  # anisotropic target spacing, different from the 3 mm source on every axis
        steps.append(Spacingd(keys, pixdim=(2.0, 2.5, 1.7), mode=("bilinear", "nearest")))
    steps += [
        CropForegroundd(keys, source_key="image", margin=2, allow_smaller=True),
        SpatialPadd(keys, spatial_size=(96, 80, 48)),
    ]
    return Compose(steps)


def _read(path) -> tuple[np.ndarray, np.ndarray]:
    img = nib.load(str(path))
    return np.asanyarray(img.dataobj), img.affine


@pytest.mark.parametrize("resample", [False, True])
def test_mr_label_inverted_and_written_on_the_exact_input_grid(resample: bool, tmp_path) -> None:
    mr, seg = require_shared(MR), require_shared(MR_SEG)
    pre = _mr_pipeline(resample)
    d = pre({"image": str(mr), "label": str(seg)})
    assert tuple(d["image"].shape[1:]) != (117, 91, 20)  # the preprocessing really changed the grid
    # the "prediction": the preprocessed label map, as a plain tensor (what a network head gives)
    d["pred"] = d["label"].as_tensor().clone()
    out = InvertToOriginald("pred", pre, orig_key="image")(d)
    pred = out["pred"]
    assert isinstance(pred, MetaTensor) and tuple(pred.shape) == (1, 117, 91, 20)
    SavePredictiond("pred", tmp_path, output_postfix="seg")(out)
    written = tmp_path / "example_mr_sm_seg.nii.gz"
    arr, aff = _read(written)
    src_arr, src_aff = _read(mr)
    ref_lab, _ = _read(seg)
    assert arr.shape == src_arr.shape == (117, 91, 20)
    assert np.array_equal(aff, src_aff)  # exactly, not approximately
    assert arr.dtype == np.uint8
    if resample:  # nearest-neighbour round trip through a finer anisotropic grid
        assert np.mean(arr == ref_lab) > 0.98
        assert set(np.unique(arr)) <= set(np.unique(ref_lab))
    else:  # flips, crop and pad only: the round trip is exact
        assert np.array_equal(arr, ref_lab)


def test_brats_two_modalities_network_prediction_on_the_input_grid(tmp_path) -> None:
    case = require_shared(BRATS)
    flair, t1c = case / "Flair_subtrMeanDivStd.nii.gz", case / "T1c_subtrMeanDivStd.nii.gz"
    pre = Compose(
        [
            LoadImaged(["image", "label"], image_only=True),
            EnsureChannelFirstd(["image", "label"]),
            Orientationd(["image", "label"], axcodes="RAS"),
            Spacingd(["image", "label"], pixdim=(3.0, 3.0, 4.0), mode=("bilinear", "nearest")),
            CropForegroundd(["image", "label"], source_key="image", margin=4, allow_smaller=True),
            NormalizeIntensityd("image", nonzero=True, channel_wise=True),
        ]
    )
    d = pre({"image": [str(flair), str(t1c)], "label": str(case / "OTMultiClass.nii.gz")})
    image = d["image"]
    assert image.shape[0] == 2 and tuple(image.shape[1:]) != (240, 240, 155)
    net = tn.swinunetr(3, in_channels=2, out_channels=5).eval()
    inferer = PeftSlidingWindowInferer((64, 64, 32), sw_batch_size=2, overlap=0.25, amp=False)
    logits = inferer(image[None], net)[0]
    assert tuple(logits.shape) == (5, *image.shape[1:])
    d["pred"] = torch.argmax(logits, dim=0, keepdim=True)
    pred = invert_prediction(d, pre, pred_key="pred", orig_key="image")
    assert tuple(pred.shape) == (1, 240, 240, 155)
    SavePredictiond("pred", tmp_path, output_postfix="", case_key="case")({**d, "pred": pred, "case": case.name})
    arr, aff = _read(tmp_path / f"{case.name}.nii.gz")
    _, src_aff = _read(flair)
    assert arr.shape == (240, 240, 155) and np.array_equal(aff, src_aff)
    # the label map goes through the same inversion and comes back where it was (nearest round trip)
    d["pred"] = d["label"].as_tensor().clone()
    lab = invert_prediction(d, pre, pred_key="pred", orig_key="image")
    ref, _ = _read(case / "OTMultiClass.nii.gz")
    tumour = ref > 0
    assert np.mean(lab[0].numpy()[tumour] == ref[tumour]) > 0.85
    assert np.mean(lab[0].numpy() == ref) > 0.99


def test_invert_refuses_batched_or_off_grid_predictions() -> None:
    mr = require_shared(MR)
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    d = pre({"image": str(mr)})
    inv = InvertToOriginald("pred", pre)
    with pytest.raises(InputDataError, match="batch axis"):
        inv({**d, "pred": torch.zeros(1, *d["image"].shape)})
    with pytest.raises(InputDataError, match="must be on the\\s+preprocessed grid"):
        inv({**d, "pred": torch.zeros(1, 10, 10, 10)})
    with pytest.raises(InputDataError, match="preprocessed MetaTensor"):
        inv({"image": d["image"].as_tensor(), "pred": torch.zeros(d["image"].shape)})
    with pytest.raises(ConfigError, match="invertible"):
        InvertToOriginald("pred", preprocessing=lambda x: x)


def test_invert_detects_a_grid_that_does_not_come_back() -> None:
    mr = require_shared(MR)
    pre = Compose([LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS")])
    d = pre({"image": str(mr)})
    d["image"].meta["original_affine"] = np.diag([1.0, 1.0, 1.0, 1.0])  # a reader that reoriented the image
    with pytest.raises(InputDataError, match="affine that differs"):
        InvertToOriginald("pred", pre)({**d, "pred": torch.zeros(d["image"].shape)})
