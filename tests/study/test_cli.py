"""`monai-peft study` end to end on a tiny grid (in process)."""

from __future__ import annotations

import json

import yaml

from monai_peft.cli import main
from tests.study.helpers import tiny_npz, tiny_study


def test_cli_study_end_to_end(tmp_path, capsys):
    cfg = tmp_path / "tiny.yaml"
    study = tiny_study(tiny_npz(tmp_path), lr_search={"low": 1e-3, "high": 3e-2, "n_trials": 2, "epochs": 1})
    cfg.write_text(yaml.safe_dump(study))
    out = tmp_path / "res"
    assert main(["study", str(cfg), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "2 learning-rate searches, 2 runs" in text and "budget f0.5: training images per seed {0: 20}" in text
    assert not out.exists()
    assert main(["study", str(cfg), "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "2 searches and 2 runs done, 0 skipped" in text and "table.md" in text
    tune = json.loads((out / "tune" / "tinynet__bitfit__f0.5.json").read_text())
    assert len(tune["trials"]) == 2 and tune["search"].startswith("optuna")
    assert main(["study", str(cfg), "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "0 searches and 0 runs done, 2 skipped" in capsys.readouterr().out
    # bad input: exit code 2 with the message, nothing trained
    study["methods"] = ["nonsense"]
    cfg.write_text(yaml.safe_dump(study))
    assert main(["study", str(cfg), "--out", str(tmp_path / "other")]) == 2
    assert "unknown method 'nonsense'" in capsys.readouterr().err
