"""Shared pytest fixtures.

Real data lives outside the project in ``../shared/data`` (see ``docs/data.md``); set
``MONAI_PEFT_SHARED_DATA`` to point elsewhere. Tests that need it skip with a reason when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Folder with the real DICOM / NIfTI / MedMNIST files (never committed to the project)."""
    return Path(os.environ.get("MONAI_PEFT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    root = shared_data_dir()
    if not root.is_dir():
        pytest.skip(f"real data folder {root} is absent (set MONAI_PEFT_SHARED_DATA to use another)")
    return root


def require_shared(relative: str) -> Path:
    """Path of one file/folder under the shared data folder, or skip the test with the reason."""
    path = shared_data_dir() / relative
    if not path.exists():
        pytest.skip(f"real data {path} is absent (set MONAI_PEFT_SHARED_DATA to use another folder)")
    return path


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
