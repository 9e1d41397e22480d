"""The study file schema: the packaged quick study, defaults, the config hash, every malformed input."""

from __future__ import annotations

import json

import pytest

from monai_peft.errors import ConfigError
from monai_peft.study.schema import DATASET_KINDS, load_study, packaged_studies, study_from_dict

MINIMAL = {
    "name": "s",
    "dataset": {"kind": "medmnist", "path": "x.npz"},
    "backbones": ["efficientnet_lite0"],
    "methods": [{"name": "lora", "kwargs": {"r": 4}}],
    "budgets": {"fractions": [0.01, 0.1], "k_shots": [5]},
    "seeds": [0, 1],
}


def test_packaged_quick_study_loads_and_is_packaged_data():
    assert "quick_pneumoniamnist" in packaged_studies()
    path = packaged_studies()["quick_pneumoniamnist"]
    assert path.parent.parts[-2:] == ("resources", "studies")  # covered by setup.cfg package_data resources/**/*
    study = load_study("quick_pneumoniamnist")
    assert [m.name for m in study.methods] == ["full_finetune", "linear_probe", "lora", "bitfit", "adapter"]
    assert study.budgets.fractions == (0.01, 0.1) and study.seeds == (0, 1)
    assert study.dataset.path.endswith("medmnist/pneumoniamnist_28.npz") and "${" not in study.dataset.path


def test_defaults_round_trip_and_json_file(tmp_path):
    study = study_from_dict(MINIMAL)
    assert study.backbones[0].name == "efficientnet_lite0" and study.training.epochs == 10 and study.image_size == 64
    again = study_from_dict(study.to_dict())
    assert again == study and again.config_hash() == study.config_hash()
    path = tmp_path / "s.json"
    path.write_text(json.dumps(MINIMAL))
    assert load_study(path) == study


def test_config_hash_ignores_execution_fields_only():
    base = study_from_dict(MINIMAL).config_hash()
    moved = study_from_dict({**MINIMAL, "training": {"device": "cuda", "num_threads": 4}}).config_hash()
    longer = study_from_dict({**MINIMAL, "training": {"epochs": 11}}).config_hash()
    other_seeds = study_from_dict({**MINIMAL, "seeds": [0, 2]}).config_hash()
    assert moved == base
    assert len({base, longer, other_seeds}) == 3


def test_environment_expansion(monkeypatch):
    monkeypatch.setenv("STUDY_DATA", "/data/here")
    study = study_from_dict({**MINIMAL, "dataset": {"kind": "medmnist", "path": "${STUDY_DATA}/a.npz"}})
    assert study.dataset.path == "/data/here/a.npz"
    monkeypatch.delenv("STUDY_DATA")
    study = study_from_dict({**MINIMAL, "dataset": {"kind": "medmnist", "path": "${STUDY_DATA:-fallback}/a.npz"}})
    assert study.dataset.path == "fallback/a.npz"
    with pytest.raises(ConfigError, match="STUDY_DATA is not set"):
        study_from_dict({**MINIMAL, "dataset": {"kind": "medmnist", "path": "${STUDY_DATA}/a.npz"}})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"bogus": 1}, r"unknown key\(s\) \['bogus'\].*valid keys"),
        (
            {"dataset": {"kind": "dicom", "path": "x"}},
            "unknown dataset kind 'dicom'; valid kinds: " + ", ".join(DATASET_KINDS),
        ),
        (
            {"dataset": {"kind": "segmentation_datalist", "path": "d.json"}},
            "task: segmentation goes with dataset kind segmentation_datalist",
        ),
        ({"dataset": {"kind": "medmnist"}}, "needs path: .* or flag:"),
        ({"dataset": {"kind": "medmnist", "path": "x", "colour": 1}}, r"unknown key\(s\) \['colour'\] in dataset"),
        ({"budgets": {"fractions": [0.0]}}, r"fractions must lie in \(0, 1\]"),
        ({"budgets": {"fractions": [1.5]}}, r"fractions must lie in \(0, 1\]"),
        ({"budgets": {"k_shots": [0]}}, "k_shots must be integers >= 1"),
        ({"budgets": {}}, "at least one of fractions"),
        ({"seeds": []}, "at least one seed"),
        ({"seeds": [1, 1]}, "distinct"),
        ({"methods": [{"name": "lora"}, {"name": "lora"}]}, r"method labels must be unique; repeated: \['lora'\]"),
        ({"methods": [{"name": "lora", "label": "a/b"}]}, "may only hold"),
        ({"training": {"epochs": 0}}, "training.epochs must be an integer >= 1"),
        ({"training": {"device": "gpu"}}, "training.device must be"),
        ({"lr_search": {"low": 1e-2, "high": 1e-3}}, "0 < low <= high"),
        ({"lr_search": {"low": "fast"}}, "lr_search.low must be a number"),
        ({"task": "detection"}, "unknown task 'detection'"),
        ({"task": "segmentation"}, "task: segmentation goes with dataset kind segmentation_datalist"),
        ({"image_size": 4}, "image_size must be an integer >= 8"),
    ],
)
def test_bad_study_files(change, match):
    with pytest.raises(ConfigError, match=match):
        study_from_dict({**MINIMAL, **change})


def test_missing_keys_and_files(tmp_path):
    with pytest.raises(ConfigError, match=r"missing required key\(s\) \['methods'\]"):
        study_from_dict({k: v for k, v in MINIMAL.items() if k != "methods"})
    with pytest.raises(
        ConfigError, match="does not exist and is not a packaged study; packaged studies: .*quick_pneumoniamnist"
    ):
        load_study(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_study(bad)
