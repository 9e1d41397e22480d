"""Tiny MAE pretraining runs on real images for the pretrain and study tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tests.conftest import require_shared

#: A ViT small enough to train a few steps in about a second on one CPU thread.
TINY_MAE: dict[str, Any] = {
    "patch_size": 4,
    "hidden_size": 36,
    "num_layers": 2,
    "num_heads": 2,
    "decoder_hidden_size": 12,
    "decoder_layers": 1,
    "decoder_heads": 2,
    "progress": False,
    "tensorboard": False,
}


def real_npz(folder: Path, n: int = 64) -> Path:
    """The first ``n`` real PneumoniaMNIST training images (``train_images`` only: no labels) as an npz."""
    src = require_shared("medmnist/pneumoniamnist_28.npz")
    with np.load(src, allow_pickle=False) as npz:
        images = npz["train_images"][:n]
    path = Path(folder) / "unlabelled.npz"
    np.savez(path, train_images=images)
    return path


def tiny_pretrained(folder: Path, image_size: tuple[int, ...] = (12, 16), epochs: int = 2, **kw: Any) -> Path:
    """Pretrain the tiny MAE on real images into ``folder/mae`` and return that folder."""
    from monai_peft.pretrain import MAEPretrainConfig, pretrain_mae

    out = Path(folder) / "mae"
    cfg = MAEPretrainConfig(
        data=str(real_npz(folder)),
        out=str(out),
        image_size=image_size,
        epochs=epochs,
        **{**TINY_MAE, "batch_size": 32, **kw},
    )
    pretrain_mae(cfg)
    return out
