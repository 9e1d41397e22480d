"""Per-class Dice between two integer label maps, for bundle scripts and their model-card tables."""

from __future__ import annotations

import torch

__all__ = ["label_map_dice"]


def label_map_dice(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class ``c = 1..num_classes-1``: ``2 |P_c & G_c| / (|P_c| + |G_c|)``.

    Args:
        pred, label: integer label maps of equal shape (any shape, e.g. ``(1, X, Y, Z)``).
        num_classes: number of classes including the background 0.

    Returns:
        ``num_classes - 1`` values; NaN for a class absent from both maps (not 0 or 1: nothing to score).

    Raises:
        ValueError: the two maps differ in shape.
    """
    if tuple(pred.shape) != tuple(label.shape):
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(label.shape)} differ in shape")
    out = []
    for c in range(1, num_classes):
        p, g = pred == c, label == c
        denom = int(p.sum()) + int(g.sum())
        out.append(float("nan") if denom == 0 else 2.0 * int((p & g).sum()) / denom)
    return out
