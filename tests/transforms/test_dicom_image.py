"""Single DICOM images: modality LUT, VOI LUT, MONOCHROME1, multi-frame, overlays, geometry."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import EnhancedMRImageStorage

from monai_peft.errors import DicomError
from monai_peft.transforms import (
    LoadDicomImage,
    LoadDicomImaged,
    dicom_overlays,
    read_chest_xray,
    read_dicom_image,
)
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_image, save

STORED = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 80).astype(np.uint16)  # 0 .. 3760, non-square


def test_stored_values_without_rescale_are_returned_as_float(tmp_path):
    path = save(make_image(STORED), tmp_path / "a.dcm")
    img = read_dicom_image(path)
    assert img.shape == (1, 6, 8)  # (C, rows, cols): row-major, not transposed
    assert img.dtype == torch.float32
    np.testing.assert_array_equal(img[0].numpy(), STORED)
    assert tuple(img.meta["value_range"]) == (0.0, 4095.0)
    assert img.meta["voi_applied"] is False


def test_rescale_slope_intercept_is_applied(tmp_path):
    path = save(make_image(STORED, slope=2.0, intercept=-1024.0), tmp_path / "a.dcm")
    img = read_dicom_image(path)
    np.testing.assert_allclose(img[0].numpy(), STORED * 2.0 - 1024.0)
    assert tuple(img.meta["value_range"]) == (-1024.0, 4095 * 2.0 - 1024.0)
    raw = read_dicom_image(path, modality_lut=False)
    np.testing.assert_array_equal(raw[0].numpy(), STORED)


def test_window_matches_pydicom_and_clips(tmp_path):
    ds = make_image(STORED, slope=1.0, intercept=-1000.0, window=(500.0, 1000.0))
    path = save(ds, tmp_path / "a.dcm")
    img = read_dicom_image(path, voi_lut=True)
    ref = apply_voi_lut(apply_modality_lut(STORED, ds), ds)
    np.testing.assert_allclose(img[0].numpy(), ref, rtol=1e-6)
    lo, hi = img.meta["value_range"]
    assert img.meta["voi_applied"] is True
    hu = STORED - 1000.0
    assert np.all(img[0].numpy()[hu <= 0] == lo)  # below the window -> bottom of the output range
    assert np.all(img[0].numpy()[hu > 1000] == hi)  # above the window -> top
    unit = read_chest_xray(path, scaling="range")
    assert float(unit.min()) == 0.0 and float(unit.max()) == 1.0


def test_voi_lut_sequence_is_preferred_over_window(tmp_path):
    ds = make_image(STORED, window=(2000.0, 4000.0))
    item = Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUTDescriptor: 4096 entries from 0, 16 bits
    item.add_new(0x00283006, "US", [v // 16 for v in range(4096)])  # LUTData: divides by 16
    ds.VOILUTSequence = DicomSequence([item])
    path = save(ds, tmp_path / "a.dcm")
    img = read_dicom_image(path, voi_lut=True)
    np.testing.assert_array_equal(img[0].numpy(), STORED // 16)
    assert tuple(img.meta["value_range"]) == (0.0, 255.0)
    win = read_dicom_image(path, voi_lut=True, prefer_voi_sequence=False)
    np.testing.assert_allclose(win[0].numpy(), apply_voi_lut(STORED, ds, prefer_lut=False), rtol=1e-6)


def test_monochrome1_is_inverted_inside_the_output_range(tmp_path):
    m2 = read_dicom_image(save(make_image(STORED, photometric="MONOCHROME2"), tmp_path / "m2.dcm"))
    m1_path = save(make_image(STORED, photometric="MONOCHROME1"), tmp_path / "m1.dcm")
    m1 = read_dicom_image(m1_path)
    lo, hi = m1.meta["value_range"]
    np.testing.assert_allclose(m1[0].numpy(), lo + hi - m2[0].numpy())
    raw = read_dicom_image(m1_path, invert_monochrome1=False)
    np.testing.assert_array_equal(raw[0].numpy(), STORED)
    # in [0, 1]: MONOCHROME1 display equals 1 - MONOCHROME2 display of the same stored values
    u1 = read_chest_xray(m1_path, scaling="range")
    u2 = read_chest_xray(tmp_path / "m2.dcm", scaling="range")
    np.testing.assert_allclose(u1.numpy(), 1.0 - u2.numpy(), atol=1e-6)


def test_monochrome_fixture_with_rescale_and_window(monochrome_file):
    path, photometric, stored = monochrome_file
    img = read_dicom_image(path, voi_lut=True)
    hu = stored - 1024.0
    lo, hi = img.meta["value_range"]
    assert img.meta["photometric_interpretation"] == photometric
    # output follows "bright = high value": MONOCHROME1 shows high stored values dark, so they end low
    displayed_bright = hi if photometric == "MONOCHROME2" else lo
    assert np.all(img[0].numpy()[hu > 1500] == displayed_bright)
    assert np.all(img[0].numpy()[hu <= -500] == lo + hi - displayed_bright)
    raw = read_dicom_image(path, voi_lut=True, invert_monochrome1=False)  # window only: high stays high
    assert np.all(raw[0].numpy()[hu > 1500] == hi)


def test_monochrome1_with_rescale_and_window(tmp_path):
    kwargs = dict(slope=1.0, intercept=-1024.0, window=(0.0, 2000.0))
    m1 = read_chest_xray(save(make_image(STORED, photometric="MONOCHROME1", **kwargs), tmp_path / "1.dcm"))
    m2 = read_chest_xray(save(make_image(STORED, photometric="MONOCHROME2", **kwargs), tmp_path / "2.dcm"))
    assert m1.meta["scaling"] == "range"  # auto: a VOI was applied
    np.testing.assert_allclose(m1.numpy(), 1.0 - m2.numpy(), atol=1e-6)


def test_affine_from_position_orientation_spacing(tmp_path):
    ds = make_image(STORED, position=(10.0, -20.0, 5.0), pixel_spacing=(0.5, 0.75))
    img = read_dicom_image(save(ds, tmp_path / "a.dcm"))
    aff = img.affine.numpy()
    # voxel (row i, col j) -> LPS = IPP + i * 0.5 * (0,1,0) + j * 0.75 * (1,0,0); RAS flips x and y
    i, j = 3, 5
    lps = np.array([10.0 + j * 0.75, -20.0 + i * 0.5, 5.0])
    np.testing.assert_allclose((aff @ np.array([i, j, 0, 1.0]))[:3], lps * np.array([-1, -1, 1]))
    np.testing.assert_allclose(img.meta["spacing"], [0.5, 0.75])


def _enhanced_multiframe(frames: np.ndarray, slopes: list[float]) -> Dataset:
    ds = make_image(frames[0], sop_class=EnhancedMRImageStorage, modality="MR", position=None, orientation=None)
    ds.NumberOfFrames = len(frames)
    ds.PixelData = frames.astype(np.uint16).tobytes()
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing = [0.8, 0.8]
    measures.SliceThickness = 3.0
    shared.PixelMeasuresSequence = DicomSequence([measures])
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame = []
    for k, slope in enumerate(slopes):
        group = Dataset()
        pvt = Dataset()
        pvt.RescaleSlope, pvt.RescaleIntercept, pvt.RescaleType = slope, 10.0 * k, "US"
        group.PixelValueTransformationSequence = DicomSequence([pvt])
        pos = Dataset()
        pos.ImagePositionPatient = [0.0, 0.0, 3.0 * k]
        group.PlanePositionSequence = DicomSequence([pos])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    return ds


def test_enhanced_multiframe_uses_per_frame_rescale(tmp_path):
    frames = np.stack([STORED, STORED + 1, STORED + 2])
    path = save(_enhanced_multiframe(frames, [1.0, 2.0, 0.5]), tmp_path / "mf.dcm")
    img = read_dicom_image(path)
    assert img.shape == (1, 3, 6, 8)
    for k, slope in enumerate([1.0, 2.0, 0.5]):
        np.testing.assert_allclose(img[0, k].numpy(), frames[k] * slope + 10.0 * k)
    one = read_dicom_image(path, frame=2)
    assert one.shape == (1, 6, 8)
    np.testing.assert_allclose(one[0].numpy(), frames[2] * 0.5 + 20.0)
    np.testing.assert_allclose(one.meta["spacing"], [0.8, 0.8])
    with pytest.raises(DicomError, match="3 frame"):
        read_dicom_image(path, frame=3)


def test_real_enhanced_mr_multiframe():
    path = require_shared("dicom/enhanced_mr_multiframe.dcm")
    with pytest.warns(UserWarning, match="no PixelSpacing"):  # functional groups stripped by an anonymiser
        img = read_dicom_image(path)
    assert img.shape == (1, 10, 64, 64)
    ref = pydicom.dcmread(path).pixel_array
    np.testing.assert_array_equal(img[0].numpy(), ref)
    with pytest.warns(UserWarning, match="no PixelSpacing"):
        np.testing.assert_array_equal(read_dicom_image(path, frame=4)[0].numpy(), ref[4])


def test_real_mr_with_overlays():
    path = require_shared("dicom/mr_overlays.dcm")
    ds = pydicom.dcmread(path)
    img, overlays = LoadDicomImage(voi_lut=False, return_overlays=True)(path)
    assert img.shape == (1, 484, 484)
    np.testing.assert_array_equal(img[0].numpy(), ds.pixel_array)  # overlay bits do not leak into the image
    assert overlays.shape == (1, 484, 484)
    assert int(overlays.sum()) == int(ds.overlay_array(0x6000).sum()) > 0
    d = LoadDicomImaged("image", overlay_postfix="overlays")({"image": path})
    assert torch.equal(d["image_overlays"], torch.as_tensor(overlays))
    windowed = read_dicom_image(path, voi_lut=True)  # two windows in the file: the first (450/790) is used
    assert windowed.meta["voi_applied"] is True
    assert read_dicom_image(path).meta["voi_applied"] is False  # the window is opt-in


def test_overlay_origin_is_respected(tmp_path):
    ds = make_image(STORED)
    ds.add_new(0x60000010, "US", 2)  # OverlayRows
    ds.add_new(0x60000011, "US", 3)  # OverlayColumns
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [2, 4])  # origin row 2, column 4 (1-based)
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", bytes([0b00111111, 0]))  # 6 bits set = the whole 2x3 overlay
    overlays = dicom_overlays(pydicom.dcmread(save(ds, tmp_path / "ov.dcm")))
    expected = np.zeros((6, 8), np.uint8)
    expected[1:3, 3:6] = 1
    np.testing.assert_array_equal(overlays[0], expected)


def test_real_ct_slice_in_hounsfield_units():
    path = require_shared("dicom/ct_512.dcm")
    ds = pydicom.dcmread(path)
    img = read_dicom_image(path, voi_lut=False)
    np.testing.assert_allclose(img[0].numpy(), ds.pixel_array * 1.0 - 1024.0)
    np.testing.assert_allclose(img.meta["spacing"], [0.478516, 0.478516])


def test_dataset_input_and_missing_pixel_data(tmp_path):
    img = read_dicom_image(make_image(STORED))
    assert img.shape == (1, 6, 8)
    path = save(make_image(STORED, with_pixels=False), tmp_path / "nopix.dcm")
    with pytest.raises(DicomError, match="no Pixel Data") as err:
        read_dicom_image(path)
    assert "nopix.dcm" in str(err.value)
