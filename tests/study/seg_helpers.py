"""A tiny synthetic, anisotropic, non-cubic 3D segmentation datalist (NIfTI via nibabel) for the study tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np

SHAPE = (24, 20, 12)
SPACING = (1.0, 1.5, 3.0)
TINY_UNET = {
    "name": "monai:UNet",
    "label": "unet",
    "kwargs": {"channels": [4, 8], "strides": [2], "num_res_units": 0},
}


def write_case(folder: Path, name: str, seed: int, channels: int = 2) -> dict[str, Any]:
    """One case: ``channels`` modality files and a label map with values 0, 1, 2 (two boxes in a 'head')."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    affine = np.diag([*SPACING, 1.0])
    label = np.zeros(SHAPE, np.int16)
    x0, y0 = 6 + seed % 4, 5 + seed % 3
    label[x0 : x0 + 8, y0 : y0 + 7, 3:9] = 1
    label[x0 + 2 : x0 + 5, y0 + 2 : y0 + 5, 4:7] = 2
    head = np.zeros(SHAPE, bool)
    head[2:-2, 2:-2, 1:-1] = True
    case = folder / name
    case.mkdir(parents=True)
    images = []
    for c in range(channels):
        img = np.where(head, 1.0 + 0.1 * rng.standard_normal(SHAPE), 0.0) + (c + 1.0) * (label > 0) + 1.5 * (label == 2)
        nib.save(nib.Nifti1Image(img.astype(np.float32), affine), case / f"mod{c}.nii.gz")
        images.append(f"{name}/mod{c}.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), case / "seg.nii.gz")
    return {"case": name, "image": images, "label": f"{name}/seg.nii.gz"}


def tiny_datalist(folder: Path, n: tuple[int, int, int] = (2, 1, 1), channels: int = 2) -> Path:
    """``datalist.json`` with ``n = (train, val, test)`` cases in ``folder``; returns its path."""
    folder = Path(folder)
    entries = [write_case(folder, f"case{i}", i, channels) for i in range(sum(n))]
    data = {
        "training": entries[: n[0]],
        "validation": entries[n[0] : n[0] + n[1]],
        "test": entries[n[0] + n[1] :],
    }
    path = folder / "datalist.json"
    path.write_text(json.dumps(data, indent=1))
    return path


def tiny_seg_study(datalist: Path, **overrides: Any) -> dict[str, Any]:
    """A segmentation study dict: tiny UNet from scratch, full_finetune + bitfit + scratch, 1 budget, 1 epoch."""
    study = {
        "name": "tiny_seg",
        "task": "segmentation",
        "dataset": {
            "kind": "segmentation_datalist",
            "path": str(datalist),
            "channels": 2,
            "num_classes": 3,
            "roi_size": [16, 12, 8],
            "spacing": [2.0, 2.0, 3.0],
            "class_names": ["background", "outer", "inner"],
        },
        "backbones": [copy.deepcopy(TINY_UNET)],
        "methods": [{"name": "full_finetune"}, {"name": "bitfit"}, {"name": "scratch"}],
        "budgets": {"k_shots": [2]},
        "seeds": [0],
        "training": {"epochs": 1, "batch_size": 2},
        "lr_search": {"low": 1e-2, "high": 1e-2},
    }
    study.update(overrides)
    return study
