"""`dataset.kind: segmentation_datalist`: schema errors, preprocessing, Dice, the test guard, resume, CLI end to end.

Data: a tiny synthetic datalist (tests/study/seg_helpers.py) of 24 x 20 x 12 voxels at (1, 1.5, 3) mm with two
modalities, written as NIfTI in tmp_path.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from monai_peft.errors import ConfigError, InputDataError, MethodNotApplicableError
from monai_peft.study import run_study, study_from_dict
from monai_peft.study.data import TestAccessError
from monai_peft.study.execute import preflight
from monai_peft.study.grid import RunCell
from monai_peft.study.seg_data import case_budget, load_case, load_seg_splits, read_datalist
from monai_peft.study.segmentation import dice_per_class, run_seg_cell
from monai_peft.study.store import StudyFolderError
from tests.study.seg_helpers import SHAPE, tiny_datalist, tiny_seg_study


@pytest.fixture
def datalist(tmp_path):
    return tiny_datalist(tmp_path / "data")


def _study(datalist, **kw):
    return study_from_dict(tiny_seg_study(datalist, **kw))


# --- schema and input errors ---------------------------------------------------------------------------------


def test_schema_needs_the_segmentation_keys(datalist):
    raw = tiny_seg_study(datalist)
    for key, match in (("num_classes", "needs num_classes"), ("roi_size", "needs roi_size")):
        bad = json.loads(json.dumps(raw))
        del bad["dataset"][key]
        with pytest.raises(ConfigError, match=match):
            study_from_dict(bad)
    bad = json.loads(json.dumps(raw))
    bad["dataset"]["class_names"] = ["a", "b"]
    with pytest.raises(ConfigError, match="class_names has 2 names but num_classes is 3"):
        study_from_dict(bad)
    bad = json.loads(json.dumps(raw))
    bad["task"] = "classification"
    with pytest.raises(ConfigError, match="task: segmentation goes with dataset kind segmentation_datalist"):
        study_from_dict(bad)
    bad = json.loads(json.dumps(raw))
    bad["dataset"]["datalist"] = {"training": []}
    with pytest.raises(ConfigError, match="exactly one of path"):
        study_from_dict(bad)


def test_missing_label_is_named(datalist):
    data = json.loads(datalist.read_text())
    del data["validation"][0]["label"]
    datalist.write_text(json.dumps(data))
    with pytest.raises(InputDataError, match=r"validation\[0\].*has no 'label'"):
        preflight(_study(datalist))


def test_wrong_channel_count_is_named(datalist):
    with pytest.raises(InputDataError, match="lists 2 image files but dataset.channels is 3"):
        preflight(study_from_dict({**tiny_seg_study(datalist), "dataset": {
            **tiny_seg_study(datalist)["dataset"], "channels": 3}}))  # fmt: skip
    # one file per case: the channel count is seen when the volume is read
    data = json.loads(datalist.read_text())
    for entries in data.values():
        for e in entries:
            e["image"] = e["image"][0]
    datalist.write_text(json.dumps(data))
    study = _study(datalist)
    splits, _ = read_datalist(study.dataset)
    with pytest.raises(InputDataError, match="has 1 channel.*dataset.channels is 2"):
        load_case(splits["train"][0], study.dataset)


def test_label_values_outside_num_classes_are_refused(datalist):
    raw = tiny_seg_study(datalist)
    raw["dataset"] = {**raw["dataset"], "num_classes": 2, "class_names": None}
    study = study_from_dict(raw)
    splits, _ = read_datalist(study.dataset)
    with pytest.raises(InputDataError, match=r"values \[2\] outside 0..1"):
        load_case(splits["train"][0], study.dataset)


def test_unknown_and_inapplicable_methods(datalist):
    with pytest.raises(ConfigError, match="unknown method 'nonsense'.*'scratch'"):
        preflight(_study(datalist, methods=[{"name": "nonsense"}]))
    with pytest.raises(MethodNotApplicableError, match="'vpt'.*does not apply.*Methods that apply.*full_finetune"):
        preflight(_study(datalist, methods=[{"name": "vpt"}]))
    with pytest.raises(ConfigError, match="takes monai:<Net>"):
        preflight(_study(datalist, backbones=[{"name": "efficientnet_lite0"}]))


def test_budget_of_more_cases_than_the_training_split(datalist):
    with pytest.raises(ConfigError, match="3 training cases.*has 2"):
        preflight(_study(datalist, budgets={"k_shots": [3]}))
    with pytest.raises(ConfigError, match="leaves no case"):
        case_budget(2, "f0.1", study_from_dict(tiny_seg_study(datalist)).budgets, 0)
    assert case_budget(4, "f0.5", _study(datalist).budgets, 3) == case_budget(4, "k2", _study(datalist).budgets, 3)


# --- data ----------------------------------------------------------------------------------------------------


def test_case_is_resampled_to_the_spacing_and_normalised(datalist):
    study = _study(datalist)
    item = read_datalist(study.dataset)[0]["train"][0]
    case = load_case(item, study.dataset)
    # (24, 20, 12) voxels at (1, 1.5, 3) mm -> (2, 2, 3) mm: (12, 15, 12)
    assert tuple(case.image.shape) == (2, 12, 15, 12) and tuple(case.label.shape) == (1, 12, 15, 12)
    assert case.image.dtype == torch.float32 and case.label.dtype == torch.int64
    assert set(torch.unique(case.label).tolist()) == {0, 1, 2}
    head = (case.image != 0).any(0)
    assert 0 < int(head.sum()) < head.numel()  # background is exactly 0
    for c in range(2):
        v = case.image[c][head]
        assert abs(float(v.mean())) < 1e-4 and abs(float(v.std()) - 1.0) < 1e-3


def test_training_only_datalist_uses_the_split_rule(tmp_path):
    path = tiny_datalist(tmp_path / "d", n=(5, 0, 0))
    data = json.loads(path.read_text())
    path.write_text(json.dumps({"training": data["training"]}))
    study = _study(path)
    splits, _ = read_datalist(study.dataset)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 1, 1]
    names = [it.case for s in splits.values() for it in s]
    assert sorted(names) == [f"case{i}" for i in range(5)]
    assert read_datalist(study.dataset)[0] == splits  # deterministic
    data = {"training": data["training"][:2]}
    path.write_text(json.dumps(data))
    with pytest.raises(InputDataError, match="split rule needs at least 3"):
        read_datalist(study.dataset)


# --- Dice ----------------------------------------------------------------------------------------------------


def test_dice_per_class_on_known_cases():
    label = torch.zeros(1, 9, 7, 5, dtype=torch.long)
    label[0, 1:4, 1:4, 1:3] = 1  # 18 voxels
    label[0, 5:8, 2:5, 2:4] = 2  # 18 voxels
    assert dice_per_class(label, label, 4)[:2] == [1.0, 1.0]
    assert math.isnan(dice_per_class(label, label, 4)[2])  # class 3 in neither map
    disjoint = torch.zeros_like(label)
    disjoint[0, 1:4, 1:4, 1:3] = 2
    disjoint[0, 5:8, 2:5, 2:4] = 1
    assert dice_per_class(disjoint, label, 3) == [0.0, 0.0]
    half = label.clone()
    half[0, 1:4, 1:4, 2] = 0  # class 1 predicted on 9 of its 18 voxels: 2 * 9 / (9 + 18)
    assert dice_per_class(half, label, 3) == pytest.approx([2 * 9 / 27, 1.0])
    with pytest.raises(ValueError, match="differ in shape"):
        dice_per_class(label[..., :4], label, 3)


# --- guard, resume, CLI --------------------------------------------------------------------------------------


def test_nothing_reads_test_before_selection(datalist, monkeypatch):
    import monai_peft.study.seg_data as sd

    study = _study(datalist)
    data = load_seg_splits(study.dataset)
    with pytest.raises(TestAccessError):
        data.test()
    events: list[str] = []
    real = sd.load_case

    def spy(item, spec):
        events.append(f"read:{item.case}")
        return real(item, spec)

    monkeypatch.setattr(sd, "load_case", spy)
    sd._CACHE.clear()
    real_final = data.finalize_selection
    monkeypatch.setattr(data, "finalize_selection", lambda s: (events.append("selection_final"), real_final(s)))
    record = run_seg_cell(study, RunCell("unet", "full_finetune", "k2", 0), 1e-2, data)
    test_case = data.items["test"][0].case
    assert events.index(f"read:{test_case}") > events.index("selection_final")
    assert [e for e in events if e.startswith("read:")][:3] == ["read:case0", "read:case1", "read:case2"]
    assert data.access_log == ["train", "val", "selection_final", "test"]
    assert data.read_log == ["train", "val", "test"]
    assert set(record["test"]["dice"]) == {"outer", "inner"}
    assert record["train_cases"] == ["case0", "case1"]


def test_resume_skips_finished_cells(datalist, tmp_path):
    study = _study(datalist, methods=[{"name": "full_finetune"}, {"name": "scratch"}])
    out = tmp_path / "out"
    first = run_study(study, out, progress=False)
    assert first["ran"] == 2 and first["skipped"] == 0
    cell = out / "cells" / "unet__scratch__k2__s0.json"
    before = cell.read_text()
    with pytest.raises(StudyFolderError, match="--resume"):
        run_study(study, out, progress=False)
    cell.unlink()
    again = run_study(study, out, resume=True, progress=False)
    assert again["ran"] == 1 and again["skipped"] == 1
    assert json.loads(cell.read_text())["test"] == json.loads(before)["test"]  # same seed, same result


def test_cli_segmentation_study_writes_the_report(datalist, tmp_path, capsys):
    from monai_peft.cli import main

    raw = tiny_seg_study(datalist, seeds=[0, 1], lr_search={"low": 1e-3, "high": 3e-2, "n_trials": 2, "epochs": 1})
    cfg = tmp_path / "seg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    out = tmp_path / "res"
    assert main(["study", str(cfg), "--out", str(out), "--dry-run"]) == 0
    assert "3 learning-rate searches, 6 runs" in capsys.readouterr().out and not out.exists()
    assert main(["study", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "3 searches and 6 runs done, 0 skipped" in capsys.readouterr().out
    for name in ("results.csv", "summary.csv", "summary.json", "table.md", "params.png"):
        assert (out / name).is_file(), name
    tune = json.loads((out / "tune" / "unet__bitfit__k2.json").read_text())
    assert len(tune["trials"]) == 2 and tune["search"].startswith("optuna")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_cells"] == summary["expected_cells"] == 6
    rows = {r["method"]: r for r in summary["rows"]}
    cells = [json.loads((out / "cells" / f"unet__bitfit__k2__s{s}.json").read_text()) for s in (0, 1)]
    inner = [c["test"]["dice"]["inner"] for c in cells]
    assert rows["bitfit"]["test_dice_inner_mean"] == pytest.approx(np.mean(inner))
    assert rows["bitfit"]["test_dice_inner_std"] == pytest.approx(np.std(inner, ddof=1))
    assert rows["bitfit"]["trainable_parameters"] < rows["full_finetune"]["trainable_parameters"]
    table = (out / "table.md").read_text()
    assert "| outer | inner | mean Dice |" in table and "| bitfit | 2 cases |" in table
    from monai_peft.study.docs import render_block

    assert "### unet: test Dice" in render_block(out)
    # a tuned cell's trials were scored on validation Dice; test scores differ from them
    assert all("val_dice" in t for t in tune["trials"])


def test_classification_hash_ignores_the_segmentation_keys():
    from tests.study.helpers import TINY_NET

    raw = {"name": "h", "dataset": {"kind": "medmnist", "path": "x.npz"}, "backbones": [TINY_NET],
           "methods": ["lora"], "budgets": {"fractions": [0.5]}, "seeds": [0]}  # fmt: skip
    spec = study_from_dict(raw)
    assert study_from_dict(spec.to_dict()).config_hash() == spec.config_hash()
    text = json.dumps(spec.to_dict())
    assert '"spacing": null' in text  # filled in by to_dict, but left out of the hash:
    assert spec.config_hash() == study_from_dict(raw).config_hash()
    assert SHAPE == (24, 20, 12)


def test_min_steps_lengthens_small_segmentation_budgets(datalist):
    """training.min_steps applies to segmentation as to classification: 2 cases in batches of 2 make one step per
    epoch, so min_steps 3 trains 3 epochs (and a 1-epoch trial of a 3-epoch training gets 1 step: 1 epoch)."""
    from monai_peft.study.segmentation import seg_epochs

    study = study_from_dict(tiny_seg_study(datalist, training={"epochs": 1, "batch_size": 2, "min_steps": 3}))
    assert seg_epochs(study, 2, 1) == 3
    data = load_seg_splits(study.dataset)
    record = run_seg_cell(study, RunCell("unet", "bitfit", "k2", 0), 1e-2, data)
    assert len(record["selection"]["history"]) == 3
    plain = study_from_dict(tiny_seg_study(datalist))
    assert seg_epochs(plain, 2, 1) == 1
    longer = study_from_dict(tiny_seg_study(datalist, training={"epochs": 3, "batch_size": 2, "min_steps": 3}))
    assert seg_epochs(longer, 2, 1) == 1 and seg_epochs(longer, 2, 3) == 3
