"""Execution: resume skips finished cells; a 2-cell grid on a local Ray instance; the report files."""

from __future__ import annotations

import csv
import json

import pytest

import monai_peft.study.execute as execute
from monai_peft.study import StudyFolderError, run_study, study_from_dict
from monai_peft.study.report import load_records
from tests.study.helpers import tiny_npz, tiny_study


def test_resume_skips_finished_cells(tmp_path, monkeypatch):
    study = study_from_dict(tiny_study(tiny_npz(tmp_path), seeds=[0, 1]))
    out = tmp_path / "out"
    calls = []
    real = execute.run_task

    def counting(study_dict, cell, lr):
        calls.append(cell)
        return real(study_dict, cell, lr)

    monkeypatch.setattr(execute, "run_task", counting)
    res = run_study(study, out, progress=False)
    assert res["ran"] == 4 and len(calls) == 4 and res["tuned"] == 2
    first = {p.name: p.read_bytes() for p in (out / "cells").glob("*.json")}
    assert len(first) == 4
    with pytest.raises(StudyFolderError, match="pass --resume"):
        run_study(study, out, progress=False)
    (out / "cells" / "tinynet__bitfit__f0.5__s1.json").unlink()
    calls.clear()
    res = run_study(study, out, resume=True, progress=False)
    assert calls == [("tinynet", "bitfit", "f0.5", 1)]
    assert res["skipped"] == 3 and res["ran"] == 1 and res["tuned"] == 0
    for name, data in first.items():
        if name != "tinynet__bitfit__f0.5__s1.json":
            assert (out / "cells" / name).read_bytes() == data  # finished cells untouched
    # the report covers every cell; the CSV has one row per seed
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 4
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished_cells"] == summary["expected_cells"] == 4
    assert {r["method"] for r in summary["rows"]} == {"linear_probe", "bitfit"}
    table = (out / "table.md").read_text()
    assert "| linear_probe |" in table and "50%" in table
    assert (out / "fraction.png").stat().st_size > 1000 and (out / "params.png").stat().st_size > 1000


def test_ray_local_two_cell_grid(tmp_path):
    ray = pytest.importorskip("ray")
    study = study_from_dict(tiny_study(tiny_npz(tmp_path)))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_study(study, tmp_path / "out", ray_address="auto", progress=False)
    finally:
        ray.shutdown()
    assert res["ran"] == 2
    head, records = load_records(tmp_path / "out")
    assert sorted(r["cell_id"] for r in records) == ["tinynet__bitfit__f0.5__s0", "tinynet__linear_probe__f0.5__s0"]
    assert all(0.0 <= r["test"]["auroc"] <= 1.0 and r["config_hash"] == head["config_hash"] for r in records)
