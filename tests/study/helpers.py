"""Tiny real-data studies for the study tests (a subset of PneumoniaMNIST written to a temporary npz)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import require_shared

TINY_NET = {
    "name": "monai:DenseNet",
    "label": "tinynet",
    "kwargs": {"init_features": 4, "growth_rate": 4, "block_config": [1, 1], "bn_size": 2},
}


def tiny_npz(folder: Path, n_train: int = 40, n_val: int = 30, n_test: int = 30) -> Path:
    """A class-balanced subset of the real PneumoniaMNIST splits (``n`` images per split), as an npz in ``folder``."""
    src = require_shared("medmnist/pneumoniamnist_28.npz")
    out = {}
    with np.load(src, allow_pickle=False) as npz:
        for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
            labels = npz[f"{split}_labels"][:, 0]
            idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[: n // 2] for c in (0, 1)]))
            out[f"{split}_images"] = npz[f"{split}_images"][idx]
            out[f"{split}_labels"] = npz[f"{split}_labels"][idx]
    path = Path(folder) / "tiny_pneumoniamnist.npz"
    np.savez(path, **out)
    return path


def tiny_study(npz: Path, **overrides: Any) -> dict[str, Any]:
    """A study dict: tiny DenseNet from scratch, 2 methods, 1 budget, 1 seed, 1 epoch, fixed lr (no search)."""
    study = {
        "name": "tiny",
        "dataset": {"kind": "medmnist", "path": str(npz)},
        "image_size": 16,
        "backbones": [copy.deepcopy(TINY_NET)],
        "methods": [{"name": "linear_probe"}, {"name": "bitfit"}],
        "budgets": {"fractions": [0.5]},
        "seeds": [0],
        "training": {"epochs": 1, "batch_size": 8},
        "lr_search": {"low": 1e-3, "high": 1e-3},
        "metrics": {"bootstrap": 50},
    }
    for key, value in overrides.items():
        study[key] = value
    return study
