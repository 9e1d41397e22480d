"""Validation-only selection: the test split is read only after the selection is final, and once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from monai_peft.study.data import TestAccessError, load_splits
from monai_peft.study.grid import RunCell, TuneCell
from monai_peft.study.run import run_cell
from monai_peft.study.schema import study_from_dict
from monai_peft.study.tune import tune_cell
from tests.study.helpers import tiny_npz, tiny_study


def test_guard_refuses_test_before_selection(tmp_path):
    study = study_from_dict(tiny_study(tiny_npz(tmp_path)))
    data = load_splits(study.dataset, study.image_size)
    with pytest.raises(TestAccessError, match="before model selection on validation was final"):
        data.test()
    data.val()
    data.finalize_selection({"epoch": 1})
    assert len(data.test()) == 30
    assert data.access_log == ["val", "selection_final", "test"]


def test_run_cell_reads_test_once_after_selection(tmp_path):
    study = study_from_dict(tiny_study(tiny_npz(tmp_path), training={"epochs": 3, "batch_size": 8}))
    data = load_splits(study.dataset, study.image_size)
    rec = run_cell(study, RunCell("tinynet", "bitfit", "f0.5", 0), 1e-2, data)
    log = data.access_log
    assert log.count("test") == 1 and log.count("selection_final") == 1
    assert log.index("selection_final") < log.index("test")
    assert all(entry != "test" for entry in log[: log.index("selection_final")])
    assert log[-1] == "test"
    history = rec["selection"]["history"]
    assert len(history) == 3
    best = max(history, key=lambda h: h["val_auroc"])
    assert rec["selection"]["best_epoch"] == best["epoch"] and rec["selection"]["val_auroc"] == best["val_auroc"]
    assert rec["train_images"] == 20 and len(rec["test_probs"]) == 30
    probs = np.asarray(rec["test_probs"])
    assert np.allclose(probs.sum(1), 1.0, atol=1e-4)
    lo, hi = rec["test_ci95"]["auroc"]
    assert lo <= rec["test"]["auroc"] <= hi


def test_learning_rate_search_never_reads_test(tmp_path):
    study = study_from_dict(
        tiny_study(
            tiny_npz(tmp_path),
            training={"epochs": 2, "batch_size": 8},
            lr_search={"low": 1e-4, "high": 1e-1, "n_trials": 3, "n_startup_trials": 1, "n_warmup_steps": 0},
        )
    )
    data = load_splits(study.dataset, study.image_size)
    rec = tune_cell(study, TuneCell("tinynet", "linear_probe", "f0.5"), data)
    assert "test" not in data.access_log and "selection_final" not in data.access_log
    assert len(rec["trials"]) == 3 and 1e-4 <= rec["lr"] <= 1e-1
    completed = [t for t in rec["trials"] if t["state"] == "COMPLETE"]
    assert rec["val_auroc"] == max(t["val_auroc"] for t in completed)
    assert rec["lr"] == next(t["lr"] for t in completed if t["val_auroc"] == rec["val_auroc"])
    again = tune_cell(study, TuneCell("tinynet", "linear_probe", "f0.5"), load_splits(study.dataset, study.image_size))
    assert [t["lr"] for t in again["trials"]] == [t["lr"] for t in rec["trials"]]  # seeded sampler


def test_min_steps_lengthens_small_budgets_only(tmp_path):
    """training.min_steps: a 20-image budget (3 batches of 8, the last of 4) trains ceil(10 / 3) = 4 epochs instead
    of 2; the learning-rate search (1 epoch of 2) gets half of the steps; unset, nothing changes."""
    from monai_peft.study.run import batch_starts, epochs_for

    assert batch_starts(20, 8) == [0, 8, 16] and batch_starts(17, 8) == [0, 8]  # a batch of one is folded in
    study = study_from_dict(
        tiny_study(
            tiny_npz(tmp_path),
            training={"epochs": 2, "batch_size": 8, "min_steps": 10},
            lr_search={"low": 1e-3, "high": 1e-2, "n_trials": 1, "epochs": 1, "n_startup_trials": 1},
        )
    )
    assert epochs_for(20, 2, study.training) == 4 and epochs_for(4000, 2, study.training) == 2
    assert epochs_for(20, 1, study.training) == 2  # 10 * 1/2 = 5 steps of 3 per epoch
    data = load_splits(study.dataset, study.image_size)
    rec = run_cell(study, RunCell("tinynet", "bitfit", "f0.5", 0), 1e-2, data)
    assert rec["train_images"] == 20 and len(rec["selection"]["history"]) == 4
    tuned = tune_cell(study, TuneCell("tinynet", "bitfit", "f0.5"), load_splits(study.dataset, study.image_size))
    assert tuned["trials"][0]["epochs"] == 2
    plain = study_from_dict(tiny_study(tiny_npz(tmp_path), training={"epochs": 2, "batch_size": 8}))
    assert epochs_for(20, 2, plain.training) == 2
    assert plain.config_hash() != study_from_dict(plain.to_dict() | {"training": study.training.__dict__}).config_hash()


def test_committed_study_results_keep_their_config_hash():
    """Keys added to the schema later (e.g. training.min_steps) leave the hash of a committed study unchanged."""
    from monai_peft.study.schema import load_study

    committed = json.loads(Path("docs/study/pneumoniamnist_cpu_reduced/study.json").read_text())
    study = study_from_dict(committed["study"])
    assert study.config_hash() == committed["config_hash"]
    assert load_study("pneumoniamnist_cpu_reduced").config_hash() == committed["config_hash"]


def test_a_method_lr_range_overrides_the_study_range_for_that_method_only(tmp_path):
    """methods[i].lr_range: that method's trials sample inside it, the others keep lr_search's range; a fixed
    range (low == high) means no search; unset, the config hash is unchanged; a bad range is a clear error."""
    from monai_peft.errors import ConfigError

    search = {"low": 1e-2, "high": 1e-1, "n_trials": 2, "epochs": 1, "n_startup_trials": 1}
    methods = [{"name": "linear_probe"}, {"name": "bitfit", "lr_range": [1e-5, 1e-4]}]
    study = study_from_dict(tiny_study(tiny_npz(tmp_path), methods=methods, lr_search=search))
    assert study.lr_range("bitfit") == (1e-5, 1e-4) and study.lr_range("linear_probe") == (1e-2, 1e-1)
    data = load_splits(study.dataset, study.image_size)
    low = tune_cell(study, TuneCell("tinynet", "bitfit", "f0.5"), data)
    other = tune_cell(study, TuneCell("tinynet", "linear_probe", "f0.5"), data)
    assert all(1e-5 <= t["lr"] <= 1e-4 for t in low["trials"]) and 1e-5 <= low["lr"] <= 1e-4
    assert all(1e-2 <= t["lr"] <= 1e-1 for t in other["trials"])
    fixed = study_from_dict(
        tiny_study(tiny_npz(tmp_path), methods=[{"name": "bitfit", "lr_range": [3e-4, 3e-4]}], lr_search=search)
    )
    rec = tune_cell(fixed, TuneCell("tinynet", "bitfit", "f0.5"), data)
    assert rec["lr"] == 3e-4 and rec["trials"] == [] and rec["search"] == "fixed"
    plain = tiny_study(tiny_npz(tmp_path), methods=[{"name": "bitfit"}])
    explicit = tiny_study(tiny_npz(tmp_path), methods=[{"name": "bitfit", "lr_range": None}])
    assert study_from_dict(plain).config_hash() == study_from_dict(explicit).config_hash()
    for bad in ([1e-3], [1e-3, 1e-4], [0, 1e-3], ["a", 1e-3]):
        with pytest.raises(ConfigError, match="lr_range must be \\[low, high\\]"):
            study_from_dict(tiny_study(tiny_npz(tmp_path), methods=[{"name": "bitfit", "lr_range": bad}]))


def test_grid_sampler_spreads_the_trials_over_the_range(tmp_path):
    """lr_search.sampler: grid tries the n_trials log-even bin midpoints of each method's own range, in increasing
    order (the default TPE offers every cell the same seeded random rates); sampler: tpe leaves the hash as it was."""
    from monai_peft.errors import ConfigError
    from monai_peft.study.tune import grid_rates

    assert grid_rates(1e-4, 1e-2, 2) == pytest.approx([10**-3.5, 10**-2.5])
    search = {"low": 1e-4, "high": 1e-1, "n_trials": 3, "epochs": 1, "n_startup_trials": 3, "sampler": "grid"}
    methods = [{"name": "linear_probe"}, {"name": "bitfit", "lr_range": [1e-5, 1e-2]}]
    study = study_from_dict(tiny_study(tiny_npz(tmp_path), methods=methods, lr_search=search))
    data = load_splits(study.dataset, study.image_size)
    probe = tune_cell(study, TuneCell("tinynet", "linear_probe", "f0.5"), data)
    bitfit = tune_cell(study, TuneCell("tinynet", "bitfit", "f0.5"), data)
    assert [t["lr"] for t in probe["trials"]] == pytest.approx([10**-3.5, 10**-2.5, 10**-1.5])
    assert [t["lr"] for t in bitfit["trials"]] == pytest.approx([10**-4.5, 10**-3.5, 10**-2.5])
    assert probe["search"] == "optuna-grid-median-pruner" and probe["lr"] in [t["lr"] for t in probe["trials"]]
    plain = tiny_study(tiny_npz(tmp_path))
    assert (
        study_from_dict(plain).config_hash()
        == study_from_dict({**plain, "lr_search": {**plain["lr_search"], "sampler": "tpe"}}).config_hash()
    )
    assert (
        study.config_hash()
        != study_from_dict({**study.to_dict(), "lr_search": {**search, "sampler": "tpe"}}).config_hash()
    )
    with pytest.raises(ConfigError, match="lr_search.sampler must be 'tpe' or 'grid'"):
        study_from_dict(tiny_study(tiny_npz(tmp_path), lr_search={**search, "sampler": "random"}))
