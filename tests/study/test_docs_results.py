"""docs/study.md quotes the committed study results exactly (python -m monai_peft.study.docs --check)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from monai_peft.study.docs import render_block, update_doc
from monai_peft.study.report import expected_cells

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "study.md"
PUBLISHED = ROOT / "docs" / "study" / "pneumoniamnist_cpu_reduced"


def test_docs_study_md_matches_the_committed_results():
    assert "<!-- study-results: docs/study/pneumoniamnist_cpu_reduced -->" in DOC.read_text()
    assert update_doc(DOC, ROOT, check=True) == []


def test_a_changed_figure_is_detected_and_rewritten(tmp_path):
    (tmp_path / "docs" / "study").mkdir(parents=True)
    shutil.copytree(PUBLISHED, tmp_path / "docs" / "study" / PUBLISHED.name)
    body = render_block(PUBLISHED)
    doc = tmp_path / "docs" / "study.md"
    figure = next(tok for tok in body.split() if tok.startswith("0.") and len(tok) == 5)
    tampered = body.replace(figure, "0.999", 1)
    doc.write_text(f"intro\n<!-- study-results: docs/study/{PUBLISHED.name} -->\n{tampered}<!-- /study-results -->\n")
    assert update_doc(doc, tmp_path, check=True) == [f"docs/study/{PUBLISHED.name}"]
    assert update_doc(doc, tmp_path) == [f"docs/study/{PUBLISHED.name}"]
    assert update_doc(doc, tmp_path, check=True) == [] and body in doc.read_text()


def test_published_summary_counts_the_restricted_grid():
    import json

    head = json.loads((PUBLISHED / "study.json").read_text())
    summary = json.loads((PUBLISHED / "summary.json").read_text())
    assert summary["expected_cells"] == expected_cells(head["study"]) == summary["finished_cells"]
    assert {r["n_seeds"] for r in summary["rows"]} == {len(head["study"]["seeds"])}


def test_render_refuses_mismatched_files(tmp_path):
    import json

    shutil.copytree(PUBLISHED, tmp_path / "p")
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    summary["config_hash"] = "0123456789abcdef"
    (tmp_path / "p" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(Exception, match="different studies"):
        render_block(tmp_path / "p")


def test_claims_are_checked_against_the_summary(tmp_path):
    import json

    from monai_peft.study.docs import render_claims

    text = render_claims(PUBLISHED)
    assert text.count("| mae_vit |") == 7 and "not tested (no 100 % budget in this grid)" in text
    assert "| mae_vit | LoRA matches or beats full fine-tuning | 1%: lora 0.524 ± 0.001 (1.38 %) vs" in text
    # make EPT clearly better than VPT at 5-shot: the verdict follows the numbers
    shutil.copytree(PUBLISHED, tmp_path / "p")
    summary = json.loads((tmp_path / "p" / "summary.json").read_text())
    for row in summary["rows"]:
        if row["budget"] == "k5" and row["method_name"] in ("ept", "vpt"):
            row["test_auroc_mean"], row["test_auroc_std"] = (0.9, 0.01) if row["method_name"] == "ept" else (0.6, 0.01)
    (tmp_path / "p" / "summary.json").write_text(json.dumps(summary))
    assert "5-shot: supported" in render_claims(tmp_path / "p")
    # LoRA within the seed std of full fine-tuning at 1 %, far below it at 10 %: "not supported at 10%" only
    for row in summary["rows"]:
        if row["method_name"] in ("lora", "full_finetune"):
            lora = row["method_name"] == "lora"
            row["test_auroc_mean"], row["test_auroc_std"] = {
                "f0.01": (0.80 if lora else 0.81, 0.02),
                "f0.1": (0.70 if lora else 0.90, 0.01),
            }.get(row["budget"], (row["test_auroc_mean"], row["test_auroc_std"]))
    (tmp_path / "p" / "summary.json").write_text(json.dumps(summary))
    line = next(x for x in render_claims(tmp_path / "p").splitlines() if "LoRA matches" in x)
    assert line.endswith("| **not supported** at 10% (gap within the seed std at 1%) |"), line


@pytest.mark.parametrize("folder, norm_pix", [("mae_pneumoniamnist", False), ("mae_e80_npl", True)])
def test_pretraining_figures_in_the_doc_come_from_its_json(folder, norm_pix):
    import json

    meta = json.loads((ROOT / "docs" / "study" / folder / "mae_vit.json").read_text())
    history = json.loads((ROOT / "docs" / "study" / folder / "history.json").read_text())
    text = " ".join(DOC.read_text().split())
    arch, pre = meta["architecture"], meta["pretraining"]
    assert f"{meta['encoder_parameters']:,d} encoder parameters" in text and arch["img_size"] == [28, 28]
    assert f"{pre['epochs']} epochs of {history['steps_per_epoch']} steps" in text
    assert f"final epoch loss {pre['epoch_loss'][-1]:.4f}" in text
    assert pre["images"] == 4708 and pre["data"].endswith("pneumoniamnist_28.npz [train_images]")
    assert pre["norm_pix_loss"] is norm_pix
    flags = f"--out runs/{folder} --epochs {pre['epochs']}" + (" --norm-pix-loss" if norm_pix else "")
    assert flags in text


def test_brats_3d_arm_table_in_study_md_is_the_generated_one():
    """docs/study.md's 3D-arm table is exactly what benchmarks/brats_bundle_compare.py --table writes."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    text = (root / "docs" / "study.md").read_text()
    block = re.search(r"<!-- brats-compare-table:.*?-->\n(.*?)\n<!-- /brats-compare-table -->", text, flags=re.S)
    assert block, "docs/study.md lost its generated 3D-arm table"
    generated = (root / "benchmarks" / "results" / "brats_compare.md").read_text().strip()
    assert block.group(1).strip() == generated, "regenerate: python benchmarks/brats_bundle_compare.py --table"


def test_claims_pool_a_companion_study_and_compare_with_the_full_finetune_best_on_validation(tmp_path):
    """Two folders pooled ("a+b" in the doc): the full fine-tuning reference is the one with the higher validation
    AUROC, whichever its test AUROC; the verdict follows."""
    import json

    from monai_peft.study.docs import render_claims

    shutil.copytree(PUBLISHED, tmp_path / "a")
    summary = json.loads((PUBLISHED / "summary.json").read_text())
    full = [r for r in summary["rows"] if r["method_name"] == "full_finetune" and r["budget"] == "f0.01"][0]
    better_on_val = {**full, "method": "full_lowlr", "val_auroc_mean": 0.99, "test_auroc_mean": 0.2}
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "summary.json").write_text(json.dumps({**summary, "rows": [better_on_val]}))
    alone = render_claims(tmp_path / "a")
    pooled = render_claims(tmp_path / "a", tmp_path / "b")
    first = next(line for line in pooled.splitlines() if "at 1 %, the best PEFT" in line)
    assert "vs full_lowlr 0.200" in first and "(best on validation) |" in first and first.endswith("| supported |")
    assert "vs full_finetune 0.577" in alone and "**not supported**" in alone.splitlines()[2]


def test_the_cpu_study_reading_quotes_only_figures_of_its_tables():
    """Every AUROC/accuracy the prose under "Which claims these data support" quotes is in the rendered tables of
    the two published folders (or is MedMNIST v2's baseline), so a rerun that changes them fails here."""
    import re

    from monai_peft.study.docs import MEDMNIST_V2_RESNET18_28

    text = DOC.read_text()
    reading = text[text.index("**Reading.** Three seeds") : text.index("- **Not tested on this CNN:**")]
    tables = render_block(ROOT / "docs/study/pneumoniamnist_cpu_effnet") + render_block(
        ROOT / "docs/study/pneumoniamnist_cpu_effnet_full_lowlr"
    )
    known = set(re.findall(r"\d\.\d{3}", tables)) | {f"{v:.3f}" for v in MEDMNIST_V2_RESNET18_28.values()}
    quoted = [v for v in re.findall(r"(?<![\d.])\d\.\d{3}(?!\d)", reading) if float(v) > 0.1]
    assert len(quoted) >= 15
    assert [v for v in quoted if v not in known] == []
    shares = set(re.findall(r"\d+\.\d{2} %", reading))  # trainable shares, e.g. "1.32 %"
    assert len(shares) >= 4 and shares <= set(re.findall(r"\d+\.\d{2} %", tables))


def test_linear_probe_table_in_study_md_is_the_benchmark_output():
    """The encoder table under the reduced study quotes benchmarks/results/mae_linear_probe.txt (the output of
    benchmarks/mae_linear_probe.py) row by row: |mu|, sigma, val and test AUROC."""
    rows = (ROOT / "benchmarks" / "results" / "mae_linear_probe.txt").read_text().splitlines()[1:]
    text = DOC.read_text()
    assert len(rows) == 3
    for row in rows:
        mu, sigma, _c, val, test = row.split()[-6:-1]
        assert f"| {mu} | {sigma} | {val} | {test} |" in text, row


VIT = ROOT / "docs" / "study" / "pneumoniamnist_cpu_vit"


def test_the_13_method_vit_study_is_published_whole_and_from_its_packaged_file():
    """docs/study/pneumoniamnist_cpu_vit holds every cell of the packaged study file (same config hash), and its
    result and claims blocks are on the page."""
    import json

    from monai_peft.study import load_study

    head = json.loads((VIT / "study.json").read_text())
    summary = json.loads((VIT / "summary.json").read_text())
    assert load_study("pneumoniamnist_cpu_vit").config_hash() == head["config_hash"] == summary["config_hash"]
    assert summary["expected_cells"] == expected_cells(head["study"]) == summary["finished_cells"] == 153
    assert {r["n_seeds"] for r in summary["rows"]} == {3} and len({r["method"] for r in summary["rows"]}) == 13
    text = DOC.read_text()
    assert "<!-- study-results: docs/study/pneumoniamnist_cpu_vit -->" in text
    assert "<!-- study-claims: docs/study/pneumoniamnist_cpu_vit -->" in text


def test_the_vit_study_reading_quotes_only_figures_of_its_tables():
    """Every AUROC the prose after the 13-method study's claims quotes is in its rendered tables (or is MedMNIST
    v2's baseline), and every trainable share it quotes is one of the table's."""
    import re

    from monai_peft.study.docs import MEDMNIST_V2_RESNET18_28, render_claims

    text = DOC.read_text()
    reading = text[text.index("**Reading of the 13-method study.**") : text.index("<!-- /vit-study-reading -->")]
    tables = render_block(VIT) + render_claims(VIT)
    known = set(re.findall(r"\d\.\d{3}", tables)) | {f"{v:.3f}" for v in MEDMNIST_V2_RESNET18_28.values()}
    quoted = [v for v in re.findall(r"(?<![\d.])\d\.\d{3}(?!\d)", reading) if float(v) > 0.1]
    assert len(quoted) >= 8
    assert [v for v in quoted if v not in known] == []
    shares = set(re.findall(r"\d+\.\d{2} %", reading))
    assert shares <= set(re.findall(r"\d+\.\d{2} %", tables))


def test_vit_erf_table_in_study_md_is_the_benchmark_output():
    """The ERF table of the 13-method study is summary_table() of benchmarks/results/vit_study_erf.json (written by
    benchmarks/vit_study_erf.py), whose cells are the published study's (same learning rates and test AUROC)."""
    import csv
    import importlib.util
    import json
    import re

    spec = importlib.util.spec_from_file_location("vit_study_erf", ROOT / "benchmarks" / "vit_study_erf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    data = json.loads((ROOT / "benchmarks" / "results" / "vit_study_erf.json").read_text())
    methods = list(dict.fromkeys(r["method"] for r in data["rows"]))
    block = re.search(r"<!-- vit-erf-table -->\n(.*?)\n<!-- /vit-erf-table -->", DOC.read_text(), flags=re.S)
    assert block and block.group(1) == mod.summary_table(data["rows"], methods)
    with open(VIT / "results.csv", newline="") as f:
        published = {(r["method"], r["budget"], int(r["seed"])): r for r in csv.DictReader(f)}
    for row in data["rows"]:
        cell = published[(row["method"], data["budget"], row["seed"])]
        assert row["lr"] == float(cell["lr"]) and row["test_auroc"] == float(cell["test_auroc"])
        assert abs(row["val_auroc"] - float(cell["val_auroc"])) < 1e-9
