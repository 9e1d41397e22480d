"""Bad input: a clear error before any training starts; earlier results are left intact."""

from __future__ import annotations

import json

import pytest

import monai_peft.study.run as study_run
from monai_peft.errors import ConfigError, InputDataError, MethodNotApplicableError
from monai_peft.study import StudyFolderError, run_study, study_from_dict
from tests.study.helpers import tiny_npz, tiny_study


@pytest.fixture
def no_training(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("training started before the bad input was reported")

    monkeypatch.setattr(study_run, "train_select", fail)


@pytest.fixture
def npz(tmp_path):
    return tiny_npz(tmp_path)


def _run(tmp_path, study):
    return run_study(study_from_dict(study), tmp_path / "out", progress=False)


def test_unknown_method(tmp_path, npz, no_training):
    with pytest.raises(ConfigError, match=r"unknown method 'loraa'.*registered methods: .*lora.*ssf"):
        _run(tmp_path, tiny_study(npz, methods=["loraa"]))


def test_unknown_backbone(tmp_path, npz, no_training):
    with pytest.raises(
        ConfigError,
        match=r"backbone 'resnet_imaginary' is unknown; valid study backbones: .*efficientnet_lite0.*monai:<Net>",
    ):
        _run(tmp_path, tiny_study(npz, backbones=["resnet_imaginary"]))
    with pytest.raises(ConfigError, match="monai.networks.nets has no network 'NoSuchNet'"):
        _run(tmp_path, tiny_study(npz, backbones=["monai:NoSuchNet"]))
    with pytest.raises(ConfigError, match="'swinunetr_ssl' is not a classification backbone"):
        _run(tmp_path, tiny_study(npz, backbones=["swinunetr_ssl"]))


def test_unknown_dataset(tmp_path, no_training):
    with pytest.raises(ConfigError, match="unknown dataset kind 'dicomdir'; valid kinds: medmnist, folder, csv"):
        _run(tmp_path, tiny_study("x", dataset={"kind": "dicomdir", "path": "x"}))
    with pytest.raises(InputDataError, match="does not exist"):
        _run(tmp_path, tiny_study(tmp_path / "missing.npz"))


def test_method_not_applicable_names_those_that_do(tmp_path, npz, no_training):
    study = tiny_study(npz, backbones=["efficientnet_lite0"], methods=["lora", "vpt"])
    with pytest.raises(
        MethodNotApplicableError,
        match=r"method 'vpt' \(vpt\) does not apply to backbone 'efficientnet_lite0'.*Methods that apply .*: .*bitfit.*lora",
    ):
        _run(tmp_path, study)


def test_wrong_method_field_keeps_the_library_message(tmp_path, npz, no_training):
    with pytest.raises(ConfigError, match=r"unknown argument\(s\) \['rank'\] for method 'lora'"):
        _run(tmp_path, tiny_study(npz, methods=[{"name": "lora", "kwargs": {"rank": 4}}]))


def test_fraction_that_empties_a_class(tmp_path, npz, no_training):
    # 20 images per class: round(0.01 x 20) = 0
    with pytest.raises(
        ConfigError, match="training fraction 0.01 leaves a class with no images .*class '0' has 20 training images"
    ):
        _run(tmp_path, tiny_study(npz, budgets={"fractions": [0.5, 0.01]}))
    with pytest.raises(ConfigError, match="25-shot training needs 25 images of every class"):
        _run(tmp_path, tiny_study(npz, budgets={"k_shots": [25]}))
    assert not (tmp_path / "out").exists()


def test_results_folder_of_another_study_is_refused_and_left_intact(tmp_path, npz, no_training):
    out = tmp_path / "out"
    out.mkdir()
    other = {"config_hash": "0123456789abcdef", "study": {"name": "someone_else"}}
    (out / "study.json").write_text(json.dumps(other))
    (out / "cells").mkdir()
    (out / "cells" / "a.json").write_text('{"keep": true}')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(StudyFolderError, match="holds the results of another study \\('someone_else'.*left intact"):
        _run(tmp_path, tiny_study(npz))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_foreign_folder_is_refused(tmp_path, npz, no_training):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    with pytest.raises(StudyFolderError, match="holds no study.json"):
        _run(tmp_path, tiny_study(npz))
    assert (tmp_path / "out" / "notes.txt").read_text() == "mine"
