"""timm / MAE ViT checkpoints -> MONAI ViT: exact equivalence (1e-5), layouts, adaptations, errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError, MissingDependencyError, StateDictKeyError
from monai_peft.networks.factory import load_backbone_with_report
from monai_peft.networks.vit import (
    MonaiViTBackbone,
    ViTSpec,
    build_monai_vit,
    create_timm_vit,
    infer_vit_spec,
    load_monai_vit,
    load_vit_backbone,
    monai_to_timm_vit_state_dict,
    timm_to_monai_vit_state_dict,
)
from tests.networks.backbone_utils import max_abs_diff, tiny_timm_vit

timm = pytest.importorskip("timm")

TOL = 1e-5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def token_vit() -> nn.Module:
    return tiny_timm_vit(global_pool="token", num_classes=5, depth=2, seed=2)


@pytest.fixture(scope="module")
def avg_vit() -> nn.Module:
    return tiny_timm_vit(global_pool="avg", num_classes=5, depth=2, seed=3)


def _timm_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    with torch.no_grad():
        tokens = model.forward_features(x)
        pooled = model.forward_head(tokens, pre_logits=True)
        logits = model.forward_head(tokens)
        hidden = []
        h = model._pos_embed(model.patch_embed(x))
        for block in model.blocks:
            h = block(h)
            hidden.append(h)
    return logits, pooled, hidden


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_backbone_matches_timm(pool: str, token_vit: nn.Module, avg_vit: nn.Module, images: torch.Tensor) -> None:
    ref = token_vit if pool == "token" else avg_vit
    model, report = load_vit_backbone(state_dict=ref.state_dict(), global_pool=pool, num_classes=5)
    assert report.ok and not report.fresh and not report.ignored
    assert model.spec.global_pool == pool and model.spec.num_heads == 3
    logits, pooled, hidden = _timm_outputs(ref, images)
    with torch.no_grad():
        feats = model.forward_features(images)
        out = model(images)
    assert max_abs_diff(out, logits) < TOL
    assert max_abs_diff(feats["pooled"], pooled) < TOL
    assert len(feats["hidden_states"]) == 2
    for ours, theirs in zip(feats["hidden_states"], hidden):
        assert max_abs_diff(ours, theirs) < TOL
    assert feats["feature_map"].shape == (2, 192, 14, 14)
    assert feats["tokens"].shape == (2, 197, 192)
    assert torch.equal(feats["feature_map"].flatten(2).transpose(1, 2), feats["patch_tokens"])


def test_numerical_details_are_set(token_vit: nn.Module, avg_vit: nn.Module) -> None:
    model, _ = load_vit_backbone(state_dict=avg_vit.state_dict())
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)  # MONAI's default would be 1e-5
    assert isinstance(model.vit.norm, nn.Identity)  # avg pooling: no final norm, fc_norm after pooling
    assert isinstance(model.fc_norm, nn.LayerNorm)
    assert not any("norm_cross_attn" in k for k in model.state_dict())  # dead MONAI params removed
    plain = build_monai_vit(ViTSpec(embed_dim=192, num_heads=3, depth=1, mlp_dim=768, num_classes=4))
    assert isinstance(plain.classification_head, nn.Linear)  # no Tanh post-activation
    with pytest.raises(ConfigError, match="MonaiViTBackbone"):
        build_monai_vit(ViTSpec(global_pool="avg"))


def test_layernorm_eps_is_matched_where_it_matters(images: torch.Tensor) -> None:
    """With low-variance tokens eps=1e-5 vs 1e-6 changes the output a lot; the converted model must still match."""
    ref = tiny_timm_vit(global_pool="token", num_classes=5, depth=2, seed=4)
    with torch.no_grad():
        ref.pos_embed.mul_(0.01)
        ref.cls_token.mul_(0.01)
    x = images * 0.01
    model, _ = load_vit_backbone(state_dict=ref.state_dict())
    with torch.no_grad():
        expected = ref(x)
        assert max_abs_diff(model(x), expected) < TOL
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 1e-5  # MONAI's default
        assert max_abs_diff(model(x), expected) > 1e-3


def test_plain_monai_vit_matches_timm(token_vit: nn.Module, images: torch.Tensor) -> None:
    from monai.networks.nets import ViT

    vit, report = load_monai_vit(state_dict=token_vit.state_dict(), num_classes=5)
    assert isinstance(vit, ViT)
    assert report.ok and report.fresh == [
        f"blocks.{i}.norm_cross_attn.{p}" for i in range(2) for p in ("weight", "bias")
    ]
    logits, _, hidden = _timm_outputs(token_vit, images)
    with torch.no_grad():
        out, hidden_monai = vit(images)
    assert max_abs_diff(out, logits) < TOL
    assert max_abs_diff(hidden_monai[-1], hidden[-1]) < TOL
    features, _ = load_monai_vit(state_dict=token_vit.state_dict(), num_classes=0)
    with torch.no_grad():
        cls_feature = features(images)[0]
    assert max_abs_diff(cls_feature, _timm_outputs(token_vit, images)[1]) < TOL


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_monai_to_timm_round_trip(pool: str, token_vit: nn.Module, avg_vit: nn.Module, images: torch.Tensor) -> None:
    ref = token_vit if pool == "token" else avg_vit
    model, _ = load_vit_backbone(state_dict=ref.state_dict())
    back = tiny_timm_vit(global_pool=pool, num_classes=5, depth=2, seed=99)
    back.load_state_dict(monai_to_timm_vit_state_dict(model.state_dict()), strict=True)
    with torch.no_grad():
        assert max_abs_diff(back(images), ref(images)) < TOL
    # MONAI-layout checkpoints are accepted by the loaders too
    again, report = load_vit_backbone(state_dict=model.state_dict())
    assert report.ok
    with torch.no_grad():
        assert max_abs_diff(again(images), model(images)) < TOL


def test_key_mapping_table(token_vit: nn.Module) -> None:
    sd = token_vit.state_dict()
    monai = timm_to_monai_vit_state_dict(sd)
    assert torch.equal(monai["blocks.1.attn.out_proj.weight"], sd["blocks.1.attn.proj.weight"])
    assert torch.equal(monai["blocks.0.mlp.linear2.bias"], sd["blocks.0.mlp.fc2.bias"])
    assert torch.equal(monai["patch_embedding.patch_embeddings.weight"], sd["patch_embed.proj.weight"])
    assert torch.equal(monai["patch_embedding.position_embeddings"], sd["pos_embed"][:, 1:])
    assert torch.equal(monai["cls_token"], sd["cls_token"] + sd["pos_embed"][:, :1])
    assert torch.equal(monai["classification_head.weight"], sd["head.weight"])
    assert len(monai) == len(sd)  # one MONAI tensor per timm tensor


def _mae_checkpoint(vit: nn.Module) -> dict:
    """An MAE-style pretraining checkpoint: DDP prefix, decoder + mask token, no head, args Namespace-free."""
    encoder = {f"module.{k}": v for k, v in vit.state_dict().items() if not k.startswith(("head.", "fc_norm."))}
    extras = {
        "module.mask_token": torch.zeros(1, 1, 128),
        "module.decoder_embed.weight": torch.zeros(128, 192),
        "module.decoder_pos_embed": torch.zeros(1, 197, 128),
        "module.decoder_blocks.0.attn.qkv.weight": torch.zeros(384, 128),
        "module.decoder_pred.weight": torch.zeros(768, 128),
        "module.bert_encoder.layer.0.weight": torch.zeros(4, 4),  # MRM's text branch
    }
    return {"model": {**encoder, **extras}, "epoch": 799}


def test_mae_checkpoint_file_fine_tuning_protocol(token_vit: nn.Module, images: torch.Tensor, tmp_path: Path) -> None:
    path = tmp_path / "mae_pretrain_vit_tiny.pth"
    torch.save(_mae_checkpoint(token_vit), path)
    model, report = load_vit_backbone(path, global_pool="avg", num_classes=14)
    assert report.source == str(path)
    assert report.ok
    assert set(report.fresh) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert {"mask_token", "decoder_embed.weight", "decoder_pred.weight"} <= set(report.ignored)
    assert report.ignored["norm.weight"].startswith("pooled model has no final norm")
    assert report.ignored["bert_encoder.layer.0.weight"] == "not part of the ViT image encoder"
    assert torch.allclose(model.head.weight.std(), torch.tensor(2e-5), rtol=0.3)  # MAE/MED-PEFT head init
    # the encoder equals timm's MAE fine-tuning model (timm global_pool='avg' + fresh fc_norm)
    ref, ref_report = create_timm_vit(path, global_pool="avg", num_classes=14)
    assert set(ref_report.fresh) == set(report.fresh)
    with torch.no_grad():
        ref_pooled = ref.forward_head(ref.forward_features(images), pre_logits=True)
        assert max_abs_diff(model.forward_features(images)["pooled"], ref_pooled) < TOL
    # with fc_norm_from_norm the pretrained final norm initialises fc_norm
    model2, report2 = load_vit_backbone(path, global_pool="avg", fc_norm_from_norm=True)
    assert "fc_norm.weight" in report2.adapted
    assert torch.equal(model2.fc_norm.weight, token_vit.norm.weight)


def test_fine_tuned_fc_norm_checkpoint_infers_avg_pool(avg_vit: nn.Module, images: torch.Tensor) -> None:
    spec = infer_vit_spec({"model": avg_vit.state_dict()})
    assert (spec.global_pool, spec.use_fc_norm, spec.num_classes, spec.embed_dim, spec.depth) == (
        "avg",
        True,
        5,
        192,
        2,
    )
    model, report = load_vit_backbone(state_dict={"model": avg_vit.state_dict()})
    assert report.ok and not report.fresh
    with torch.no_grad():
        assert max_abs_diff(model(images), avg_vit(images)) < TOL


def test_head_class_count_change(token_vit: nn.Module) -> None:
    model, report = load_vit_backbone(state_dict=token_vit.state_dict(), num_classes=2)
    assert report.ignored["head.weight"] == "checkpoint head has 5 classes, model has 2"
    assert set(report.fresh) == {"head.weight", "head.bias"} and model.head.out_features == 2
    features, report0 = load_vit_backbone(state_dict=token_vit.state_dict(), num_classes=0)
    assert isinstance(features.head, nn.Identity) and "head.weight" in report0.ignored


def test_other_image_size_interpolates_pos_embed(token_vit: nn.Module) -> None:
    from timm.layers import resample_abs_pos_embed

    model, report = load_vit_backbone(state_dict=token_vit.state_dict(), img_size=96)
    assert report.adapted["pos_embed"] == "grid (14, 14) -> (6, 6) (bicubic)"
    ref = tiny_timm_vit(global_pool="token", num_classes=5, depth=2, img_size=96)
    sd = dict(token_vit.state_dict())
    sd["pos_embed"] = resample_abs_pos_embed(sd["pos_embed"], [6, 6], num_prefix_tokens=1)
    ref.load_state_dict(sd)
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x)) < TOL
    assert model.forward_features(x)["feature_map"].shape == (2, 192, 6, 6)


def test_grayscale_in_channels(token_vit: nn.Module) -> None:
    gray, report = load_vit_backbone(state_dict=token_vit.state_dict(), in_channels=1)
    assert "summed over RGB" in report.adapted["patch_embed.proj.weight"]
    x = torch.randn(2, 1, 224, 224)
    rgb, _ = load_vit_backbone(state_dict=token_vit.state_dict())
    with torch.no_grad():
        assert max_abs_diff(gray(x), rgb(x.repeat(1, 3, 1, 1))) < TOL


def test_patch_size_adaptation(token_vit: nn.Module) -> None:
    model, report = load_vit_backbone(state_dict=token_vit.state_dict(), patch_size=8, img_size=112)
    assert "16 -> 8" in report.adapted["patch_embed.proj.weight"]
    assert "pos_embed" not in report.adapted  # 112 / 8 = 224 / 16: same 14 x 14 grid
    assert model.vit.patch_embedding.patch_embeddings.weight.shape == (192, 3, 8, 8)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 112, 112)).shape == (1, 5)


def test_no_embed_class_checkpoint(images: torch.Tensor) -> None:
    ref = tiny_timm_vit(global_pool="token", num_classes=3, depth=1, no_embed_class=True, seed=5)
    assert ref.pos_embed.shape[1] == 196
    model, report = load_vit_backbone(state_dict=ref.state_dict())
    assert model.spec.no_embed_class and report.ok
    with torch.no_grad():
        assert max_abs_diff(model(images), ref(images)) < TOL
    timm_model, _ = create_timm_vit(state_dict=ref.state_dict())
    with torch.no_grad():
        assert max_abs_diff(timm_model(images), ref(images)) < TOL


def test_create_timm_vit_by_name(token_vit: nn.Module, images: torch.Tensor) -> None:
    model, report = create_timm_vit(state_dict=token_vit.state_dict(), model_name="vit_tiny_patch16_224")
    assert report.ok and type(model).__name__ == "VisionTransformer"
    with torch.no_grad():
        assert max_abs_diff(model(images), token_vit(images)) < TOL


def test_strict_errors_name_the_keys(token_vit: nn.Module) -> None:
    sd = dict(token_vit.state_dict())
    del sd["blocks.1.mlp.fc2.weight"]
    with pytest.raises(StateDictKeyError, match=r"missing keys.*vit\.blocks\.1\.mlp\.linear2\.weight") as info:
        load_vit_backbone(state_dict=sd)
    assert info.value.missing == ["vit.blocks.1.mlp.linear2.weight"]
    model, report = load_vit_backbone(state_dict=sd, strict=False)
    assert report.missing == ["vit.blocks.1.mlp.linear2.weight"] and not report.ok

    sd = dict(token_vit.state_dict())
    sd["blocks.0.attn.weird.weight"] = torch.zeros(1)
    with pytest.raises(StateDictKeyError, match=r"unexpected keys.*blocks\.0\.attn\.weird\.weight"):
        load_vit_backbone(state_dict=sd)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("blocks.0.ls1.gamma", "layer scale"),
        ("reg_token", "register tokens"),
        ("norm_pre.weight", "pre-norm"),
    ],
)
def test_unsupported_variants(token_vit: nn.Module, extra: str, message: str) -> None:
    sd = dict(token_vit.state_dict())
    sd[extra] = torch.zeros(1, 1, 192)
    with pytest.raises(ConfigError, match=message):
        load_vit_backbone(state_dict=sd)


def test_not_a_vit_and_expectations(token_vit: nn.Module) -> None:
    with pytest.raises(CheckpointError, match="not a ViT checkpoint"):
        load_vit_backbone(state_dict={"conv.weight": torch.zeros(1)})
    with pytest.raises(ConfigError, match="embed_dim=192, expected 768"):
        load_vit_backbone(state_dict=token_vit.state_dict(), expect={"embed_dim": 768})
    with pytest.raises(ConfigError, match="pass exactly one"):
        load_vit_backbone()
    with pytest.raises(ConfigError, match="unknown ViT options"):
        load_vit_backbone(state_dict=token_vit.state_dict(), pooling="avg")


def test_missing_timm_is_reported(token_vit: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    sd = token_vit.state_dict()
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingDependencyError, match="pip install 'timm>=1.0'"):
        create_timm_vit(state_dict=sd)


def test_vit_b16_shapes_and_outputs() -> None:
    """The real ViT-B/16 architecture: spec inferred, every timm tensor mapped, shapes and outputs equal."""
    ref = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10).eval()
    with torch.no_grad():  # timm initialises these near zero; make the CLS-position fold matter
        ref.cls_token.normal_(std=0.5)
        ref.pos_embed.normal_(std=0.5)
    sd = ref.state_dict()
    spec = infer_vit_spec(sd)
    assert spec == ViTSpec(num_classes=10)  # 224, 16, 768 wide, 12 deep, 12 heads, MLP 3072, qkv bias, CLS pool
    model, report = load_backbone_with_report("vit_b16_in21k", state_dict=sd)  # registry entry checks B/16
    assert report.ok and len(report.loaded) == len(sd)  # every timm tensor used, nothing missing
    assert isinstance(model, MonaiViTBackbone) and model.backbone_name == "vit_b16_in21k"
    assert model.vit.blocks[11].attn.qkv.weight.shape == (2304, 768)
    assert model.vit.patch_embedding.position_embeddings.shape == (1, 196, 768)
    n_timm = sum(p.numel() for p in ref.parameters())
    assert sum(p.numel() for p in model.parameters()) == n_timm - 768  # the CLS position is folded into cls_token
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert max_abs_diff(model(x), ref(x)) < TOL
