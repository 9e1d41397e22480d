"""Fixtures of the MONAI Label tests: the MONAI Label python, real BraTS studies, test adapters.

MONAI Label needs its own environment (its pins on pydicom, dicomweb-client and pynetdicom conflict with
monai_peft's). The tests find its python in ``$MONAI_PEFT_MONAILABEL_PYTHON``, else ``<repo>/.venv-monailabel/bin/python``.
When neither exists they skip, saying how to build it, except in CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, require_shared

BUNDLE = REPO_ROOT / "bundles" / "brats_mri_swinunetr_lora"
BUILD_HINT = (
    "build MONAI Label's environment with `python -m monai_peft.monailabel.env .venv-monailabel` (see "
    "docs/monailabel.md) or point MONAI_PEFT_MONAILABEL_PYTHON at the python of one (monailabel 0.8.5 + monai_peft)"
)


def monailabel_python() -> Path:
    """The python of the MONAI Label environment, or skip (fail in CI) with how to build it."""
    env = os.environ.get("MONAI_PEFT_MONAILABEL_PYTHON")
    candidates = [Path(env)] if env else []
    candidates.append(REPO_ROOT / ".venv-monailabel" / "bin" / "python")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            probe = subprocess.run(
                [str(c), "-c", "import monailabel, monai_peft"], capture_output=True, text=True, timeout=120
            )
            if probe.returncode == 0:
                return c
            msg = f"{c} cannot import monailabel and monai_peft ({probe.stderr.strip()[-300:]}); {BUILD_HINT}"
            break
    else:
        msg = f"no MONAI Label environment ({', '.join(str(c) for c in candidates)} absent); {BUILD_HINT}"
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"CI must run the MONAI Label tests: {msg}")
    pytest.skip(msg)


def bundle_helpers():
    """The BraTS bundle's ``scripts/brats_swinunetr.py`` module."""
    scripts = str(BUNDLE / "scripts")
    if scripts not in sys.path:
        sys.path.insert(0, scripts)
    import brats_swinunetr

    return brats_swinunetr


def write_two_channel(case: Path, out: Path) -> Path:
    """FLAIR + T1c of a real BraTS case as one 4D NIfTI ``(240, 240, 155, 2)`` (full grid, uncompressed)."""
    import nibabel as nib

    flair = nib.load(str(case / "Flair_subtrMeanDivStd.nii.gz"))
    t1c = nib.load(str(case / "T1c_subtrMeanDivStd.nii.gz"))
    data = np.stack([flair.get_fdata(dtype=np.float32), t1c.get_fdata(dtype=np.float32)], axis=-1)
    header = flair.header.copy()
    header.set_data_dtype(np.float32)
    nib.save(nib.Nifti1Image(data, flair.affine, header), str(out))
    return out


def perturbed_adapter(method: str, out: Path, seed: int, base: torch.nn.Module | None = None, **kwargs) -> Path:
    """An adapter of ``method`` on the BraTS base whose trainable tensors get seeded noise (so it changes outputs).

    ``base`` defaults to the bundle's base network; pass another network to make an adapter of another base.
    """
    import monai_peft as mp

    h = bundle_helpers()
    if base is None:
        base = h.load_base_network(BUNDLE / "models" / "base" / "base_model.safetensors", 5)
    model = mp.get_peft_model(base, mp.get_config(method, **kwargs), modules_to_save=["out"])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_adapter(out)
    return out


def dka_bundle(dest: Path, adapter: Path) -> Path:
    """A copy of the BraTS bundle whose ``models/adapter`` is ``adapter`` (a non-mergeable DKA adapter)."""
    dest.mkdir(parents=True)
    for sub in ("configs", "scripts"):
        shutil.copytree(BUNDLE / sub, dest / sub, ignore=shutil.ignore_patterns("__pycache__"))
    (dest / "models").mkdir()
    shutil.copytree(BUNDLE / "models" / "base", dest / "models" / "base")
    shutil.copytree(adapter, dest / "models" / "adapter")
    return dest


@pytest.fixture(scope="session")
def brats_cases() -> dict[str, Path]:
    return {
        "pat0005": require_shared("brats/brats_2013_pat0005_1"),
        "pat0006": require_shared("brats/brats_2013_pat0006_1"),
    }
