"""The generation study end to end on the real shared data: data loading, `monai-peft study`, resume, refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from monai_peft.errors import ConfigError
from tests.conftest import require_shared

ROOT = Path(__file__).resolve().parents[2]


def _tiny(tmp_path: Path, **over) -> Path:
    brats = require_shared("brats")
    npz = require_shared("medmnist/pneumoniamnist_28.npz")
    study = {
        "name": "tiny_generation",
        "task": "generation",
        "source": {"path": str(brats)},
        "target": {"path": str(npz), "train_images": 16},
        "image_size": 16,
        "unet": {"channels": [8, 16], "attention_levels": [False, True], "num_head_channels": 8, "norm_num_groups": 8},
        "scheduler": {"num_train_timesteps": 100, "sample_steps": 3},
        "pretrain": {"steps": 2, "batch_size": 4},
        "adaptation": {"steps": 2, "batch_size": 4},
        "evaluation": {"samples": 48, "layer": "reduction_3", "feature_size": 32},
        "seeds": [0],
        "methods": ["pretrained", "scratch", {"name": "lora", "lr": 0.01, "kwargs": {"r": 2, "alpha": 2}}, "svdiff"],
    }
    study.update(over)
    path = tmp_path / "tiny_generation.json"
    path.write_text(json.dumps(study))
    return path


def test_source_and_target_images():
    import nibabel as nib

    from monai_peft.study.generation_data import load_source_images, load_target_split, target_train_subset
    from monai_peft.study.generation_schema import SourceImagesSpec, TargetImagesSpec

    brats = require_shared("brats")
    npz = require_shared("medmnist/pneumoniamnist_28.npz")
    src = load_source_images(SourceImagesSpec(path=str(brats), min_brain_fraction=0.1), 24)
    expected = sum(
        int(((nib.load(str(m)).get_fdata() > 0).mean(axis=(0, 1)) >= 0.1).sum())
        for m in sorted(brats.glob("*/brainmask.nii.gz"))
    )
    assert src.shape == (expected, 1, 24, 24) and src.dtype == torch.float32
    assert float(src.min()) >= 0.0 and float(src.max()) <= 1.0 and float(src.mean()) > 0.05
    tgt = load_target_split(TargetImagesSpec(path=str(npz)), "test", 32)
    assert tgt.shape == (624, 1, 32, 32) and 0.2 < float(tgt.mean()) < 0.8
    a, b = target_train_subset(tgt, 50, 0), target_train_subset(tgt, 50, 1)
    assert torch.equal(a, target_train_subset(tgt, 50, 0)) and not torch.equal(a, b)
    with pytest.raises(ConfigError, match="exceeds the 624 training images"):
        target_train_subset(tgt, 1000, 0)
    with pytest.raises(ConfigError, match="holds no BraTS case"):
        load_source_images(SourceImagesSpec(path=str(npz.parent)), 16)


def test_monai_peft_study_runs_a_tiny_generation_study_and_resumes(tmp_path, capsys):
    from monai_peft.cli import main

    cfg = _tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["study", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "generation study 'tiny_generation'" in text and "lora: trainable" in text and not out.exists()

    assert main(["study", str(cfg), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "6 cells done, 0 skipped" in text and "pretrained in" in text
    for name in ("results.csv", "summary.csv", "summary.json", "table.md", "fid_params.png", "samples.png"):
        assert (out / name).is_file(), name
    assert (out / "pretrain" / "base.pt").is_file() and (out / "samples" / "lora__s0.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["method"]: r for r in summary["rows"]}
    assert list(rows) == ["real_target", "real_source", "pretrained", "scratch", "lora", "svdiff"]
    assert summary["finished_cells"] == summary["expected_cells"] == 6
    assert rows["pretrained"]["trainable_parameters"] == 0 and rows["scratch"]["trainable_percent"] == 100.0
    assert 0 < rows["lora"]["trainable_parameters"] < rows["scratch"]["trainable_parameters"]
    # the floor (real target images) is far below the brain MRI slices against chest X-rays
    assert rows["real_target"]["fid_mean"] < rows["real_source"]["fid_mean"]
    table = (out / "table.md").read_text()
    assert "| lora |" in table and "FIDMetric" in table and "EfficientNet-Lite0" in table

    # without --resume the finished folder is refused; with it nothing reruns and the base is loaded
    assert main(["study", str(cfg), "--out", str(out), "--no-progress"]) != 0
    assert "pass --resume" in capsys.readouterr().err
    assert main(["study", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "0 cells done, 6 skipped; base loaded from cache" in capsys.readouterr().out
    (out / "cells" / "svdiff__s0.json").unlink()
    assert main(["study", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "1 cells done, 5 skipped" in capsys.readouterr().out

    # a different study's folder is refused and left intact
    other = _tiny(tmp_path, name="other", seeds=[1])
    before = sorted(p.name for p in (out / "cells").iterdir())
    assert main(["study", str(other), "--out", str(out), "--resume", "--no-progress"]) != 0
    assert "holds the results of another study" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "cells").iterdir()) == before
    assert main(["study", str(cfg), "--out", str(tmp_path / "o2"), "--workers", "2"]) != 0
    assert "one process" in capsys.readouterr().err

    # publish + render: the docs block is the table of the published files
    from monai_peft.study.generation import publish_generation, render_generation_block, update_generation_doc

    published = publish_generation(out, tmp_path / "docs" / "study" / "tiny")
    assert {p.name for p in published} >= {"summary.json", "study.json", "samples.png", "lora__s0.png"}
    assert not any(p.suffix == ".pt" for p in published)
    doc = tmp_path / "study.md"
    doc.write_text("x\n<!-- generation-results: docs/study/tiny -->\nstale\n<!-- /generation-results -->\n")
    assert update_generation_doc(doc, tmp_path, check=True) == ["docs/study/tiny"]
    update_generation_doc(doc, tmp_path)
    assert render_generation_block(tmp_path / "docs" / "study" / "tiny") in doc.read_text()
    assert update_generation_doc(doc, tmp_path, check=True) == []


def test_other_tasks_still_go_to_the_classification_schema(tmp_path, capsys):
    """The dispatch on task: leaves every non-generation file to the classification schema."""
    from monai_peft.cli import main

    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"name": "c", "task": "segmentation"}))
    assert main(["study", str(path), "--dry-run"]) != 0
    assert "missing required key" in capsys.readouterr().err
