"""docs/study.md quotes the committed 3D study results (docs/study/brats_3d_cpu) exactly, and they add up."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_peft.study.docs import render_block, update_doc
from monai_peft.study.report import expected_cells
from monai_peft.study.seg_report import foreground_names

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "study.md"
PUBLISHED = ROOT / "docs" / "study" / "brats_3d_cpu"


def test_doc_renders_the_committed_3d_results():
    text = DOC.read_text()
    assert "<!-- study-results: docs/study/brats_3d_cpu -->" in text
    assert "monai-peft study brats_3d_cpu" in text
    assert update_doc(DOC, ROOT, check=True) == []
    body = render_block(PUBLISHED)
    assert "#### swinunetr_base: test Dice" in body and "| necrosis | edema | non-enhancing | enhancing |" in body


def test_published_3d_summary_matches_its_cells():
    head = json.loads((PUBLISHED / "study.json").read_text())
    summary = json.loads((PUBLISHED / "summary.json").read_text())
    study = head["study"]
    assert study["task"] == "segmentation" and summary["config_hash"] == head["config_hash"]
    assert summary["finished_cells"] == summary["expected_cells"] == expected_cells(study)
    assert {r["method"] for r in summary["rows"]} == {"full_finetune", "lora", "dka", "decoder", "scratch"}
    with (PUBLISHED / "results.csv").open() as f:
        cells = list(csv.DictReader(f))
    assert len(cells) == summary["finished_cells"]
    for row in summary["rows"]:
        mine = [c for c in cells if c["method"] == row["method"] and c["budget"] == row["budget"]]
        assert len(mine) == row["n_seeds"] == len(study["seeds"])
        for name in foreground_names(study):
            values = [float(c[f"test_dice_{name}"]) for c in mine]
            assert row[f"test_dice_{name}_mean"] == pytest.approx(np.mean(values))
        means = [float(c["test_mean_dice"]) for c in mine]
        assert row["test_mean_dice_std"] == pytest.approx(np.std(means, ddof=1) if len(means) > 1 else 0.0)
    assert sum(float(c["seconds"]) for c in cells) < 25 * 60  # docs/study.md: "under 25 minutes" on one thread
    assert (PUBLISHED / "params.png").stat().st_size > 1000
    assert sum(p.stat().st_size for p in PUBLISHED.iterdir()) < 1_000_000


def test_a_changed_3d_figure_is_detected(tmp_path):
    (tmp_path / "docs" / "study").mkdir(parents=True)
    shutil.copytree(PUBLISHED, tmp_path / "docs" / "study" / PUBLISHED.name)
    body = render_block(PUBLISHED)
    figure = next(tok for tok in body.split() if tok.startswith("0.") and len(tok) == 5)
    doc = tmp_path / "docs" / "study.md"
    doc.write_text(f"<!-- study-results: docs/study/{PUBLISHED.name} -->\n{body.replace(figure, '0.999', 1)}"
                   "<!-- /study-results -->\n")  # fmt: skip
    assert update_doc(doc, tmp_path, check=True) == [f"docs/study/{PUBLISHED.name}"]
    update_doc(doc, tmp_path)
    assert body in doc.read_text()
