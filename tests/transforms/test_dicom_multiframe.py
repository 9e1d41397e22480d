"""Multi-frame DICOM geometry: enhanced CT/MR (per-frame PlanePositionSequence) and RT Dose
(GridFrameOffsetVector, DoseGridScaling), read as 2D frames and loaded as 3D volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from monai_peft.errors import DicomError
from monai_peft.transforms import load_dicom_series, read_dicom_image
from monai_peft.transforms.geometry import LPS_TO_RAS
from monai_peft.transforms.volume_io import load_volume
from tests.conftest import require_shared
from tests.transforms.dicom_factory import make_enhanced, make_image, save

pytestmark = [
    pytest.mark.filterwarnings("ignore:NvImgCodecPydicomReader"),  # MONAI: no GPU codec here
    pytest.mark.filterwarnings("ignore:The string .* is unlikely to represent"),  # highdicom on source names
]

ANGLE = np.deg2rad(20.0)
OBLIQUE = (1.0, 0.0, 0.0, 0.0, float(np.cos(ANGLE)), float(-np.sin(ANGLE)))  # tilted about the x axis
NORMAL = np.cross(OBLIQUE[:3], OBLIQUE[3:])
ORIGIN = np.array([-30.0, 12.0, -149.0])
STEP = 2.5  # mm between frame positions; SliceThickness says 4.0 (overlapping reconstruction)
N, ROWS, COLS = 5, 6, 8  # non-square frames


def _stored() -> np.ndarray:
    k, r, c = np.mgrid[0:N, 0:ROWS, 0:COLS]
    return (1000 + 100 * k + 10 * r + c).astype(np.uint16)


def _positions(order) -> np.ndarray:
    return np.asarray([ORIGIN + k * STEP * NORMAL for k in order])


def _ras(p_lps: np.ndarray) -> np.ndarray:
    return (LPS_TO_RAS[:3, :3] @ p_lps.T).T


def _pydicom_test_file(name: str) -> Path:
    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not in this pydicom install")
    return path


@pytest.fixture
def enhanced_ct(tmp_path) -> tuple[Path, np.ndarray, np.ndarray, list[float]]:
    """Enhanced CT, frames stored from the highest position down (as many scanners do), per-frame rescale."""
    order = list(range(N))[::-1]
    stored = _stored()[order]
    slopes = [1.0, 2.0, 1.0, 3.0, 1.0]
    ds = make_enhanced(
        stored,
        _positions(order),
        orientation=OBLIQUE,
        pixel_spacing=(0.6, 0.9),
        slice_thickness=4.0,
        slopes=slopes,
        intercepts=[-1024.0] * N,
    )
    return save(ds, tmp_path / "enhanced_ct.dcm"), stored, _positions(order), slopes


def test_frames_of_enhanced_ct_are_at_their_stated_positions(enhanced_ct):
    path, stored, positions, slopes = enhanced_ct
    img = read_dicom_image(path)  # (1, F, H, W) in file order
    assert img.shape == (1, N, ROWS, COLS)
    aff = img.affine.numpy()
    for k in range(N):
        world = (aff @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        assert np.abs(world - _ras(positions[k])).max() < 0.05, f"frame {k}"
        np.testing.assert_allclose(img[0, k].numpy(), stored[k] * slopes[k] - 1024.0)
    np.testing.assert_allclose(img.meta["spacing"], [STEP, 0.6, 0.9], atol=1e-6)
    one = read_dicom_image(path, frame=3)  # a single frame is placed at its own position
    assert np.abs(one.affine.numpy()[:3, 3] - _ras(positions[3])).max() < 0.05


def test_enhanced_ct_loads_as_a_3d_volume_like_the_same_classic_series(enhanced_ct, tmp_path):
    path, stored, positions, slopes = enhanced_ct
    vol = load_volume(path)
    assert vol.shape == (1, COLS, ROWS, N)  # (C, X=cols, Y=rows, Z=frames sorted along the normal)
    aff = vol.affine.numpy()
    for k in range(N):  # every file frame sits at its stated position, whichever z it got
        z = int(
            np.argmin([np.abs(vol[0, :, :, j].numpy().T - (stored[k] * slopes[k] - 1024.0)).max() for j in range(N)])
        )
        np.testing.assert_allclose(vol[0, :, :, z].numpy().T, stored[k] * slopes[k] - 1024.0)
        world = (aff @ np.array([0.0, 0.0, z, 1.0]))[:3]
        assert np.abs(world - _ras(positions[k])).max() < 0.05, f"frame {k}"
    np.testing.assert_allclose(vol.meta["spacing"], [0.9, 0.6, STEP], atol=1e-6)
    # the same frames as a classic single-frame series give the same array and affine
    uids = {"series_uid": pydicom.uid.generate_uid(), "frame_uid": pydicom.uid.generate_uid()}
    for k in range(N):
        values = (stored[k] * slopes[k] - 1024.0 + 1024).astype(np.uint16)
        ds = make_image(
            values,
            position=positions[k],
            orientation=OBLIQUE,
            pixel_spacing=(0.6, 0.9),
            slope=1.0,
            intercept=-1024.0,
            instance=k + 1,
            **uids,
        )
        save(ds, tmp_path / "classic" / f"{k}.dcm")
    classic = load_dicom_series(tmp_path / "classic")
    np.testing.assert_array_equal(vol.numpy(), classic.numpy())
    np.testing.assert_allclose(aff, classic.affine.numpy(), atol=1e-6)
    assert vol.meta["series_instance_uid"] == str(pydicom.dcmread(path).SeriesInstanceUID)


def test_real_ct_converted_to_enhanced_loads_like_the_series(tmp_path):
    """A real 3-slice CT (positions descending, SliceThickness 1.25 vs 1.0 mm spacing) converted by highdicom's
    legacy converter into one Enhanced CT object."""
    hd = pytest.importorskip("highdicom")
    folder = require_shared("dicom/ct_3slice")
    sources = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        sources, series_instance_uid=hd.UID(), series_number=9, sop_instance_uid=hd.UID(), instance_number=1
    )
    enhanced.save_as(tmp_path / "enhanced.dcm")
    series = load_dicom_series(folder)
    vol = load_volume(tmp_path / "enhanced.dcm")
    np.testing.assert_array_equal(vol.numpy(), series.numpy())
    np.testing.assert_allclose(vol.affine.numpy(), series.affine.numpy(), atol=1e-4)
    img = read_dicom_image(tmp_path / "enhanced.dcm")
    for k, item in enumerate(enhanced.PerFrameFunctionalGroupsSequence):
        stated = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float)
        world = (img.affine.numpy() @ np.array([k, 0.0, 0.0, 1.0]))[:3]
        assert np.abs(world - _ras(stated)).max() < 0.05, f"frame {k}"


def test_unequally_spaced_frames_are_refused(tmp_path):
    pos = _positions(range(N))
    pos[3] += 0.7 * NORMAL  # one frame 0.7 mm off the regular grid
    path = save(make_enhanced(_stored(), pos, orientation=OBLIQUE), tmp_path / "irregular.dcm")
    with pytest.raises(DicomError, match="not equally spaced") as err:
        load_volume(path)
    assert "irregular.dcm" in str(err.value)
    with pytest.raises(DicomError, match="not equally spaced"):
        read_dicom_image(path)
    assert read_dicom_image(path, frame=3).shape == (1, ROWS, COLS)  # one frame still reads


def test_frames_at_repeated_positions_are_refused_as_a_volume(tmp_path):
    pos = np.concatenate([_positions(range(3)), _positions(range(3))])  # two time points of 3 slices
    stored = np.concatenate([_stored()[:3], _stored()[:3]])
    path = save(make_enhanced(stored, pos, modality="MR"), tmp_path / "4d.dcm")
    with pytest.raises(DicomError, match="same position") as err:
        load_volume(path)
    assert "3 distinct positions" in str(err.value)


def test_rt_dose_frame_spacing_and_dose_scaling():
    path = _pydicom_test_file("rtdose.dcm")
    ds = pydicom.dcmread(path)
    offsets = np.asarray(ds.GridFrameOffsetVector, float)
    dose = ds.pixel_array * float(ds.DoseGridScaling)  # (F, rows, cols), Gy
    vol = load_volume(path)
    assert vol.shape == (1, int(ds.Columns), int(ds.Rows), int(ds.NumberOfFrames))
    np.testing.assert_allclose(vol[0].numpy(), dose.transpose(2, 1, 0), rtol=1e-6)
    np.testing.assert_allclose(vol.meta["spacing"], [10.0, 10.0, 5.0])
    ipp = np.asarray(ds.ImagePositionPatient, float)
    for k in range(len(offsets)):
        world = (vol.affine.numpy() @ np.array([0.0, 0.0, k, 1.0]))[:3]
        assert np.abs(world - _ras(ipp + offsets[k] * np.array([0.0, 0.0, 1.0]))).max() < 0.05
    img = read_dicom_image(path)
    np.testing.assert_allclose(img[0].numpy(), dose, rtol=1e-6)
    np.testing.assert_allclose(img.meta["spacing"], [5.0, 10.0, 10.0])


def test_rt_dose_with_irregular_grid_offsets_is_refused(tmp_path):
    ds = pydicom.dcmread(_pydicom_test_file("rtdose.dcm"))
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    offsets[-1] += 3.0
    ds.GridFrameOffsetVector = offsets
    ds.save_as(tmp_path / "dose.dcm")
    with pytest.raises(DicomError, match="not equally spaced"):
        load_volume(tmp_path / "dose.dcm")


def test_real_enhanced_mr_without_plane_geometry():
    """The shared Enhanced MR has no functional groups: no 3D geometry can be built, and 2D reading says what it
    assumed."""
    path = require_shared("dicom/enhanced_mr_multiframe.dcm")
    with pytest.raises(DicomError, match="PlanePositionSequence") as err:
        load_volume(path)
    assert "read_dicom_image" in str(err.value)
    with pytest.warns(UserWarning, match="no PixelSpacing"):
        img = read_dicom_image(path)
    assert img.meta["spacing_assumed"] is True
    assert torch.equal(img[0], torch.as_tensor(pydicom.dcmread(path).pixel_array, dtype=img.dtype))
