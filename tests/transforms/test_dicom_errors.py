"""Every bad DICOM input fails with a specific error type and a message that says what to do."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.pixels import get_decoder
from pydicom.uid import JPEG2000Lossless, generate_uid

from monai_peft.errors import DicomError, MissingDependencyError
from monai_peft.transforms import find_dicom_series, load_dicom_series, read_dicom_file, read_dicom_image
from tests.transforms.dicom_factory import make_image, make_series, save

PIXELS = np.arange(64, dtype=np.uint16).reshape(8, 8) * 50
BIG = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4000).astype(np.uint16)  # J2K needs >= 32x32


def test_non_dicom_file(tmp_path):
    path = tmp_path / "notes.dcm"
    path.write_bytes(b"hello, this is a text file" * 20)
    with pytest.raises(DicomError, match="not a DICOM file") as err:
        read_dicom_image(path)
    assert "notes.dcm" in str(err.value) and "force=True" in str(err.value)


def test_missing_path_and_folder_given_as_file(tmp_path):
    with pytest.raises(DicomError, match="does not exist"):
        read_dicom_file(tmp_path / "nope.dcm")
    with pytest.raises(DicomError, match="is a folder.*load_dicom_series"):
        read_dicom_file(tmp_path)


@pytest.mark.parametrize("cut", ["pixels", "header", "one_byte"])
def test_truncated_file(tmp_path, cut):
    path = save(make_image(PIXELS), tmp_path / "full.dcm")
    raw = path.read_bytes()
    n = {"pixels": len(raw) - 40, "header": 400, "one_byte": len(raw) - 1}[cut]
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(raw[:n])
    with pytest.raises(DicomError, match="truncated") as err:
        read_dicom_image(bad)
    assert "cut.dcm" in str(err.value) and "re-copy" in str(err.value).lower()


def test_truncated_fixture_file(truncated_file):
    with pytest.raises(DicomError, match="truncated"):
        read_dicom_file(truncated_file)


def test_truncated_slice_inside_a_series(tmp_path):
    paths, _ = make_series(tmp_path, n=3)
    raw = paths[1].read_bytes()
    paths[1].write_bytes(raw[:-10])
    with pytest.raises(DicomError, match="truncated") as err:
        load_dicom_series(tmp_path)
    assert paths[1].name in str(err.value)


def test_missing_pixel_data(tmp_path):
    path = save(make_image(PIXELS, with_pixels=False), tmp_path / "header_only.dcm")
    with pytest.raises(DicomError, match="no Pixel Data") as err:
        read_dicom_image(path)
    assert "header_only.dcm" in str(err.value) and "not an image" in str(err.value)
    folder = tmp_path / "series"
    uid = generate_uid()
    make_series(folder, n=2, series_uid=uid)  # slices at z = 30 and 32
    save(make_image(PIXELS[:6, :4], series_uid=uid, with_pixels=False, position=(-10, 20, 34.0)), folder / "x.dcm")
    with pytest.raises(DicomError, match="no Pixel Data") as err:
        load_dicom_series(folder)
    assert "x.dcm" in str(err.value)


def test_empty_folder_and_folder_without_dicom(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DicomError, match="is empty") as err:
        load_dicom_series(empty)
    assert "recursive=True" in str(err.value)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.txt").write_text("x")
    (junk / "b.png").write_bytes(b"\x89PNG....")
    with pytest.raises(DicomError, match="none is DICOM") as err:
        load_dicom_series(junk)
    assert "a.txt" in str(err.value)
    with pytest.raises(DicomError, match="does not exist"):
        load_dicom_series(tmp_path / "missing")


def test_two_series_in_one_folder(two_series_folder):
    folder, uid_a, uid_b = two_series_folder
    with pytest.raises(DicomError, match="2 DICOM series") as err:
        load_dicom_series(folder)
    msg = str(err.value)
    assert uid_a in msg and uid_b in msg and "series_uid=" in msg
    assert "3 file(s)" in msg and "4 file(s)" in msg
    assert load_dicom_series(folder, series_uid=uid_b).shape[-1] == 4
    with pytest.raises(DicomError, match="is not in") as err:
        load_dicom_series(folder, series_uid="1.2.3.4")
    assert uid_a in str(err.value)


def test_missing_slice_gap(gap_series_folder):
    with pytest.raises(DicomError, match="missing slice") as err:
        find_dicom_series(gap_series_folder)
    msg = str(err.value)
    assert "gap of 4.000 mm" in msg and "slice spacing is 2.000 mm" in msg and "about 1 slice" in msg


def test_inconsistent_spacing(tmp_path):
    make_series(tmp_path, n=5, spacing_z=2.0, z_offsets=[0, 0, 0.4, 0.4, 0.4])
    with pytest.raises(DicomError, match="inconsistent slice spacing") as err:
        find_dicom_series(tmp_path)
    assert "2.4000" in str(err.value) and "spacing_tolerance" in str(err.value)
    # a tiny float jitter is accepted
    other = tmp_path / "ok"
    make_series(other, n=5, spacing_z=2.0, z_offsets=[0, 1e-4, 0, -1e-4, 0])
    assert find_dicom_series(other).shape[-1] == 5


def test_duplicate_positions(tmp_path):
    uid = generate_uid()
    make_series(tmp_path, n=3, series_uid=uid, prefix="echo1")
    make_series(tmp_path, n=3, series_uid=uid, prefix="echo2")
    with pytest.raises(DicomError, match="same position") as err:
        find_dicom_series(tmp_path)
    assert "4D" in str(err.value)


def test_mixed_orientation_and_missing_geometry(tmp_path):
    uid = generate_uid()
    make_series(tmp_path / "mix", n=3, series_uid=uid)
    save(
        make_image(PIXELS[:6, :4], series_uid=uid, orientation=(0, 1, 0, 0, 0, -1), position=(0, 0, 50)),
        tmp_path / "mix" / "localizer.dcm",
    )
    with pytest.raises(DicomError, match="mixes orientations"):
        find_dicom_series(tmp_path / "mix")
    save(make_image(PIXELS, position=None), tmp_path / "nogeo" / "a.dcm")
    with pytest.raises(DicomError, match="lacks ImagePositionPatient") as err:
        find_dicom_series(tmp_path / "nogeo")
    assert "read_dicom_image" in str(err.value)


def test_gantry_tilt_is_refused(tmp_path):
    origin = np.array([0.0, 0.0, 0.0])
    paths, _ = make_series(tmp_path, n=4, spacing_z=2.0, origin=origin)
    import pydicom

    for p in paths:  # shear: y drifts 0.5 mm per slice
        ds = pydicom.dcmread(p)
        z = float(ds.ImagePositionPatient[2])
        ds.ImagePositionPatient = [0.0, 0.25 * z, z]
        ds.save_as(p)
    with pytest.raises(DicomError, match="gantry"):
        find_dicom_series(tmp_path)


def _j2k_file(tmp_path):
    pytest.importorskip("openjpeg")
    ds = make_image(BIG)
    ds.compress(JPEG2000Lossless)
    return save(ds, tmp_path / "j2k.dcm")


def test_compressed_without_decoder_names_the_package(tmp_path, monkeypatch):
    path = _j2k_file(tmp_path)
    np.testing.assert_array_equal(read_dicom_image(path)[0].numpy(), BIG)  # decodes when a plugin exists
    decoder = get_decoder(JPEG2000Lossless)
    monkeypatch.setattr(decoder, "_available", {})  # as if no decoder plugin were installed
    with pytest.raises(MissingDependencyError) as err:
        read_dicom_image(path)
    msg = str(err.value)
    assert "JPEG 2000" in msg and "pip install pylibjpeg pylibjpeg-openjpeg" in msg and "j2k.dcm" in msg
    assert isinstance(err.value, ImportError)


def test_compressed_series_without_decoder(tmp_path, monkeypatch):
    path = _j2k_file(tmp_path / "series")
    assert path.exists()
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})
    with pytest.raises(MissingDependencyError, match="pylibjpeg-openjpeg"):
        load_dicom_series(tmp_path / "series")


def _pydicom_test_file(name: str):
    """A file that ships inside pydicom's wheel (never downloaded)."""
    from pathlib import Path

    import pydicom

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom test file {name} is not in this pydicom install")
    return path


def test_deflate_compressed_file_is_read_not_called_truncated():
    import pydicom

    path = _pydicom_test_file("image_dfl.dcm")
    with pytest.warns(UserWarning, match="no PixelSpacing"):  # a secondary capture without pixel spacing
        img = read_dicom_image(path)
    ref = pydicom.dcmread(path).pixel_array
    assert img.shape == (1, *ref.shape)
    np.testing.assert_array_equal(img[0].numpy(), ref)


def test_truncated_deflate_file_is_still_reported(tmp_path):
    raw = _pydicom_test_file("image_dfl.dcm").read_bytes()
    cut = tmp_path / "dfl_cut.dcm"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DicomError, match="truncated|corrupt") as err:
        read_dicom_image(cut)
    assert "dfl_cut.dcm" in str(err.value)


def test_12bit_jpeg_extended_names_the_missing_decoder():
    """Pillow is installed but cannot decode 12-bit JPEG Extended: the fix is a package, not a re-copy."""
    import importlib.util

    if importlib.util.find_spec("libjpeg") or importlib.util.find_spec("gdcm"):
        pytest.skip("a 12-bit JPEG decoder (pylibjpeg-libjpeg / python-gdcm) is installed here")
    path = _pydicom_test_file("JPEG-lossy.dcm")
    with pytest.raises(MissingDependencyError) as err:
        read_dicom_image(path)
    msg = str(err.value)
    assert "pip install pylibjpeg pylibjpeg-libjpeg" in msg and "12-bit" in msg and "JPEG-lossy.dcm" in msg
    assert "corrupt" not in msg


def test_not_dicom_message_names_arguments_that_exist(tmp_path):
    import inspect

    path = tmp_path / "notes.dcm"
    path.write_bytes(b"hello, this is a text file" * 20)
    with pytest.raises(DicomError, match="not a DICOM file") as err:
        read_dicom_image(path)
    assert "read_dicom_image(..., force=True)" in str(err.value)
    assert "force" in inspect.signature(read_dicom_image).parameters
    with pytest.raises(DicomError, match="not a DICOM file"):  # force=True on a text file is still refused
        read_dicom_image(path, force=True)
    import pydicom

    ds = make_image(PIXELS)  # an ACR-NEMA style file: no preamble, no file meta, implicit VR
    del ds.file_meta
    ds.preamble = None
    acr = tmp_path / "acr_nema.dcm"
    pydicom.dcmwrite(acr, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    assert acr.read_bytes()[128:132] != b"DICM"
    with pytest.raises(DicomError, match="not a DICOM file"):
        read_dicom_image(acr)
    np.testing.assert_array_equal(read_dicom_image(acr, force=True)[0].numpy(), PIXELS)


def test_missing_pixel_spacing_is_assumed_and_said(tmp_path):
    path = save(make_image(PIXELS, pixel_spacing=None), tmp_path / "nospacing.dcm")
    with pytest.warns(UserWarning, match="no PixelSpacing.*1.0 mm") as rec:
        img = read_dicom_image(path)
    assert "nospacing.dcm" in str(rec[0].message)
    np.testing.assert_allclose(img.meta["spacing"], [1.0, 1.0])
    assert img.meta["spacing_assumed"] is True
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ok = read_dicom_image(save(make_image(PIXELS), tmp_path / "ok.dcm"))
    assert ok.meta["spacing_assumed"] is False


def test_default_intensities_agree_between_readers(tmp_path):
    """read_dicom_image and load_volume give the same (modality LUT) values by default; the VOI is opt-in."""
    from monai_peft.transforms.volume_io import load_volume

    path = save(make_image(PIXELS, slope=2.0, intercept=-100.0, window=(800.0, 400.0)), tmp_path / "w.dcm")
    img = read_dicom_image(path)
    vol = load_volume(path)
    np.testing.assert_allclose(img[0].numpy(), PIXELS * 2.0 - 100.0)
    np.testing.assert_allclose(vol[0, :, :, 0].numpy().T, img[0].numpy())
    assert img.meta["voi_applied"] is False
    windowed = read_dicom_image(path, voi_lut=True)
    assert windowed.meta["voi_applied"] is True  # display scale: clipped to the window 600..1000
    top = float(windowed.meta["value_range"][1])
    assert int((windowed == top).sum()) == int((img >= 1000).sum()) > 0


def test_default_intensities_agree_on_a_real_mr():
    from monai_peft.transforms.volume_io import load_volume
    from tests.conftest import require_shared

    path = require_shared("dicom/mr_overlays.dcm")
    img, vol = read_dicom_image(path), load_volume(path)
    np.testing.assert_allclose(vol[0, :, :, 0].numpy().T, img[0].numpy())
