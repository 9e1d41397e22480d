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


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """One intra-op thread (override with MONAI_PEFT_TEST_THREADS).

    The test networks are tiny: extra threads buy nothing, and on a 2-core machine where another process
    holds a core, OpenMP threads spin-wait on each other and small ops become 10-100x slower.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("MONAI_PEFT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
