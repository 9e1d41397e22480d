"""Base weights that a bundle builds itself (``scripts/train_base.py``) and ships small.

A bundle whose base is not a published checkpoint trains it with a seeded script and ships it as float16
safetensors (the adapter was trained on exactly that file, so the bundle records its sha256). These helpers write
and read such a file; the bundle keeps only what is specific to its network (how the tensors map onto it).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monai_peft.checkpoint import file_sha256, load_safetensors, save_safetensors
from monai_peft.errors import CheckpointError

__all__ = ["file_sha256", "read_base_weights", "save_base_weights"]


def save_base_weights(network: nn.Module, path: str | os.PathLike, info: Mapping[str, Any]) -> str:
    """Write ``network``'s state dict as float16 safetensors (atomically) with ``info`` (JSON) in the header.

    Returns:
        the file's sha256 (what the bundle's configs and the adapter's provenance record).
    """
    tensors = {k: v.detach().to(torch.float16).contiguous() for k, v in network.state_dict().items()}
    save_safetensors(tensors, path, metadata={"info": json.dumps(dict(info), sort_keys=True)})
    return file_sha256(path)


def read_base_weights(path: str | os.PathLike, sha256: str | None = None, rebuild: str = "") -> dict[str, torch.Tensor]:
    """The float32 tensors of a base-weights file written by :func:`save_base_weights`.

    Args:
        path: ``models/base/base_model.safetensors``.
        sha256: when given, the file's sha256 must equal it (the base the shipped adapter was trained on).
        rebuild: how to rebuild the file (e.g. ``python scripts/train_base.py``), quoted in the errors.

    Raises:
        CheckpointError: the file is missing, unreadable, or has another sha256.
    """
    p = Path(path)
    how = f" Rebuild it with `{rebuild}` (see the model card, 'Base weights'), or pass --base_file." if rebuild else ""
    if not p.is_file():
        raise CheckpointError(f"base weights '{p}' not found.{how}")
    digest = file_sha256(p)
    if sha256 and digest != sha256:
        raise CheckpointError(
            f"base weights '{p}' have sha256 {digest}, not the {sha256} the shipped adapter was trained on. "
            "Use the shipped file, or retrain the adapter on yours and override --base_sha256."
        )
    tensors, _ = load_safetensors(p)
    return {k: v.to(torch.float32) for k, v in tensors.items()}
