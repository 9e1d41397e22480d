"""Grid expansion: every (backbone, method, budget, seed) once, in file order; one search per (b, m, budget)."""

from __future__ import annotations

from monai_peft.study.grid import budget_label, budget_names, expand_grid, expand_tuning
from monai_peft.study.schema import study_from_dict

STUDY = {
    "name": "g",
    "dataset": {"kind": "medmnist", "path": "x.npz"},
    "backbones": ["efficientnet_lite0", {"name": "monai:DenseNet121", "label": "scratch"}],
    "methods": ["lora", "bitfit", {"name": "lora", "label": "lora_r8", "kwargs": {"r": 8}}],
    "budgets": {"fractions": [0.01, 0.1, 1.0], "k_shots": [1, 5]},
    "seeds": [0, 1, 2],
}


def test_expand_grid_counts_order_and_ids():
    study = study_from_dict(STUDY)
    assert budget_names(study) == ["f0.01", "f0.1", "f1", "k1", "k5"]
    cells = expand_grid(study)
    assert len(cells) == 2 * 3 * 5 * 3
    assert len({c.cell_id for c in cells}) == len(cells)
    assert cells[0].cell_id == "efficientnet_lite0__lora__f0.01__s0"
    assert cells[-1].cell_id == "scratch__lora_r8__k5__s2"
    assert [c.seed for c in cells[:4]] == [0, 1, 2, 0]
    tunes = expand_tuning(study)
    assert len(tunes) == 2 * 3 * 5
    assert {c.tune for c in cells} == set(tunes)
    assert {(c.backbone, c.method, c.budget, c.seed) for c in cells} == {
        (b, m, bud, s)
        for b in ("efficientnet_lite0", "scratch")
        for m in ("lora", "bitfit", "lora_r8")
        for bud in ("f0.01", "f0.1", "f1", "k1", "k5")
        for s in (0, 1, 2)
    }


def test_budget_labels():
    assert [budget_label(b) for b in ("f0.01", "f0.1", "f1", "k5")] == ["1%", "10%", "100%", "5-shot"]
