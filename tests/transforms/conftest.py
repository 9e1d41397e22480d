"""Fixtures writing small synthetic DICOM inputs (pydicom) for the transform tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid

from tests.transforms.dicom_factory import make_image, make_series, save


@pytest.fixture
def synthetic_series(tmp_path) -> tuple[Path, np.ndarray]:
    """5 axial slices 6x4, 2 mm apart from (-10, 20, 30) LPS, pixel spacing 0.5 x 0.75, intercept -1024."""
    folder = tmp_path / "series"
    _, stored = make_series(folder, n=5, rows=6, cols=4, spacing_z=2.0, origin=(-10.0, 20.0, 30.0))
    return folder, stored


@pytest.fixture
def two_series_folder(tmp_path) -> tuple[Path, str, str]:
    """One folder holding a 3-slice and a 4-slice series."""
    uid_a, uid_b = generate_uid(), generate_uid()
    make_series(tmp_path / "mixed", n=3, series_uid=uid_a, prefix="a")
    make_series(tmp_path / "mixed", n=4, series_uid=uid_b, prefix="b", origin=(0, 0, 100))
    return tmp_path / "mixed", uid_a, uid_b


@pytest.fixture
def gap_series_folder(tmp_path) -> Path:
    """6-slice series, 2 mm spacing, with slice 3 missing."""
    make_series(tmp_path / "gap", n=6, spacing_z=2.0, skip=(3,))
    return tmp_path / "gap"


@pytest.fixture(params=["MONOCHROME1", "MONOCHROME2"])
def monochrome_file(request, tmp_path) -> tuple[Path, str, np.ndarray]:
    """A rescaled, windowed radiograph-like image in both photometric interpretations."""
    stored = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 80).astype(np.uint16)
    ds = make_image(stored, photometric=request.param, slope=1.0, intercept=-1024.0, window=(500.0, 2000.0))
    return save(ds, tmp_path / f"{request.param}.dcm"), request.param, stored


@pytest.fixture
def truncated_file(tmp_path) -> Path:
    """A valid file with its last 40 bytes of pixel data cut off."""
    path = save(make_image(np.arange(64, dtype=np.uint16).reshape(8, 8)), tmp_path / "full.dcm")
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-40])
    return cut
