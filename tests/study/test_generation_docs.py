"""docs/study.md's generation arm quotes the committed results (python -m monai_peft.study.generation --check)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from monai_peft.errors import ConfigError
from monai_peft.study.generation import render_generation_block, update_generation_doc

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "study.md"
PUBLISHED = ROOT / "docs" / "study" / "diffusion_brats_to_pneumoniamnist"


def test_study_md_generation_block_matches_the_committed_results():
    text = DOC.read_text()
    assert "<!-- generation-results: docs/study/diffusion_brats_to_pneumoniamnist -->" in text
    assert update_generation_doc(DOC, ROOT, check=True) == []
    for figure in ("fid_params.png", "samples.png"):
        assert f"study/diffusion_brats_to_pneumoniamnist/{figure}" in text and (PUBLISHED / figure).is_file()


def test_published_generation_results_are_complete_small_and_weight_free():
    head = json.loads((PUBLISHED / "study.json").read_text())
    summary = json.loads((PUBLISHED / "summary.json").read_text())
    assert head["config_hash"] == summary["config_hash"]
    assert summary["finished_cells"] == summary["expected_cells"]
    assert {r["n_seeds"] for r in summary["rows"]} == {len(head["study"]["seeds"])}
    # the packaged config is the one that produced the committed results
    from monai_peft.study.generation import load_generation_study

    assert load_generation_study("diffusion_brats_to_pneumoniamnist").config_hash() == head["config_hash"]
    files = [p for p in PUBLISHED.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert not [p for p in files if p.suffix in (".pt", ".pth", ".safetensors")]
    methods = {r["method"] for r in summary["rows"]}
    assert {"real_target", "pretrained", "scratch", "full_finetune", "lora", "svdiff", "difffit"} <= methods
    assert all((PUBLISHED / "samples" / f"{m}__s{head['study']['seeds'][0]}.png").is_file() for m in methods - {
        "real_target", "real_source"})  # fmt: skip


def test_a_changed_figure_is_detected_and_mismatched_files_refused(tmp_path):
    shutil.copytree(PUBLISHED, tmp_path / "docs" / "study" / PUBLISHED.name)
    body = render_generation_block(PUBLISHED)
    summary = json.loads((PUBLISHED / "summary.json").read_text())
    figure = f"{summary['rows'][-1]['fid_mean']:.2f}"
    assert figure in body
    doc = tmp_path / "study.md"
    doc.write_text(
        f"<!-- generation-results: docs/study/{PUBLISHED.name} -->\n{body.replace(figure, '0.01')}"
        "<!-- /generation-results -->\n"
    )
    assert update_generation_doc(doc, tmp_path, check=True) == [f"docs/study/{PUBLISHED.name}"]
    summary["config_hash"] = "0123456789abcdef"
    (tmp_path / "docs" / "study" / PUBLISHED.name / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ConfigError, match="different studies"):
        render_generation_block(tmp_path / "docs" / "study" / PUBLISHED.name)
