"""The packaged 3D study `brats_3d_cpu` on the real BraTS cases (skipped when ../shared/data/brats is absent)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from monai_peft.study import load_study
from monai_peft.study.data import TestAccessError
from monai_peft.study.execute import preflight
from monai_peft.study.seg_data import load_case, load_seg_splits
from monai_peft.study.segmentation import dice_per_class
from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks" / "results"


def test_brats_3d_cpu_study_on_the_real_cases(monkeypatch):
    require_shared("brats/brats_2013_pat0006_1/OTMultiClass.nii.gz")
    monkeypatch.chdir(ROOT)  # the base weights' path is relative to the repository root
    study = load_study("brats_3d_cpu")
    checks = preflight(study)
    assert checks.split_counts == {"train": {0: 2}, "val": {0: 1}, "test": {0: 1}}
    assert checks.classes == ("background", "necrosis", "edema", "non-enhancing", "enhancing")
    # the same network, methods and head as benchmarks/brats_bundle_compare.py: the same trainable parameters
    variant = {"full_finetune": "full", "lora": "lora", "dka": "dka", "decoder": "decoder", "scratch": "scratch"}
    for method, name in variant.items():
        bench = json.loads((BENCH / f"brats_compare_{name}.json").read_text())
        assert checks.trainable["swinunetr_base"][method] == bench["trainable_params"], method
    data = load_seg_splits(study.dataset)
    with pytest.raises(TestAccessError):
        data.test()
    assert data.read_log == []  # preflight and the guard read no volume
    item = data.items["test"][0]
    assert item.case == "pat0006" and item.image[0].endswith("Flair_subtrMeanDivStd.nii.gz")
    case = load_case(item, study.dataset)
    # 240 x 240 x 155 at 1 mm -> 3 mm, FLAIR + T1c, labels 0-4
    assert case.image.shape[0] == 2 and tuple(case.image.shape[1:]) == tuple(case.label.shape[1:]) == (81, 81, 52)
    assert set(torch.unique(case.label).tolist()) <= {0, 1, 2, 3, 4} and int((case.label > 0).sum()) > 100
    dice = dice_per_class(case.label, case.label, 5)
    assert all(v == 1.0 or math.isnan(v) for v in dice) and any(v == 1.0 for v in dice)
