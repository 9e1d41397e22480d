"""monai_peft.bundle.label_map_dice against hand-counted values (3D, non-cubic)."""

from __future__ import annotations

import math

import pytest
import torch

from monai_peft.bundle.label_metrics import label_map_dice


def test_dice_per_class_counts_and_nan_for_absent_classes():
    label = torch.zeros(1, 4, 3, 2, dtype=torch.long)
    pred = torch.zeros_like(label)
    label[0, :2, 0, 0] = 1  # 2 voxels of class 1
    pred[0, 1:3, 0, 0] = 1  # 2 voxels, 1 overlapping: Dice 2*1/4
    pred[0, 3, 2, 1] = 2  # class 2 only predicted: Dice 0
    scores = label_map_dice(pred, label, num_classes=4)
    assert scores[:2] == [0.5, 0.0]
    assert math.isnan(scores[2])  # class 3 in neither map
    assert label_map_dice(label, label, 2) == [1.0]


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="differ in shape"):
        label_map_dice(torch.zeros(1, 4, 3, 2), torch.zeros(1, 3, 4, 2), 2)
