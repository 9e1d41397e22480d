"""MONAI bundle integration: after ``import monai_peft`` short ``_target_`` names resolve."""

from __future__ import annotations

import inspect

import torch
from monai.bundle import ConfigParser
from monai.bundle.config_item import ComponentLocator

import monai_peft as mp

CONFIG = {
    "imports": ["$import monai_peft"],
    "base": {
        "_target_": "ViT",
        "in_channels": 1,
        "img_size": [32, 32],
        "patch_size": 8,
        "spatial_dims": 2,
        "hidden_size": 48,
        "mlp_dim": 96,
        "num_layers": 2,
        "num_heads": 4,
        "classification": True,
        "num_classes": 2,
    },
    "peft_config": {"_target_": "LoraConfig", "r": 4, "alpha": 32},
    "network": {
        "_target_": "get_peft_model",
        "model": "@base",
        "peft_config": "@peft_config",
        "modules_to_save": ["classification_head"],
    },
    "method_from_registry": "$monai_peft.get_config('bitfit')",
}


def test_bundle_config_builds_a_peft_model():
    parser = ConfigParser(CONFIG)
    net = parser.get_parsed_content("network")
    assert isinstance(net, mp.PeftModel)
    assert net.trainable_parameters()[0] == 2 * 2 * (48 * 4 + 4 * 48) + 48 * 2 + 2
    assert net(torch.randn(1, 1, 32, 32))[0].shape == (1, 2)
    assert isinstance(parser.get_parsed_content("method_from_registry"), mp.BitFitConfig)


def test_public_names_are_unique_against_monai():
    locator = ComponentLocator()
    for name in mp.__all__:
        obj = getattr(mp, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)) or name.startswith("_"):
            continue
        found = locator.get_component_module_name(name)
        assert isinstance(found, str) and found.startswith("monai_peft"), f"{name} resolves to {found}"
