"""Segmentation heads on synthetic features: shapes (2D/3D), equivalence with MONAI UNETR/SwinUNETR, errors."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets import UNETR, SwinUNETR
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads import (
    HierarchicalDecoderHead,
    MonaiViTFeatures,
    ProgressiveUpsamplingHead,
    SegmentationModel,
    SETRPUPHead,
    SwinUNETRFeatures,
    UNETRHead,
    map_to_tokens,
)


def _copy_by_prefix(target: nn.Module, source: nn.Module, mapping: dict[str, str]) -> None:
    """Load ``source``'s weights into ``target`` renaming the first component(s) per ``mapping``."""
    src = source.state_dict()
    new = {}
    for key in target.state_dict():
        prefix = next(p for p in mapping if key.startswith(p + "."))
        new[key] = src[mapping[prefix] + key[len(prefix) :]]
    target.load_state_dict(new)


def test_unetr_head_equals_monai_unetr():
    """With patch 16 the head is MONAI's UNETR decoder: same parameter count, identical logits."""
    unetr = UNETR(1, 3, img_size=32, feature_size=8, hidden_size=48, mlp_dim=96, num_heads=4, spatial_dims=2).eval()
    head = UNETRHead(2, 48, 3, patch_size=16, feature_size=8, image_channels=1)
    decoder_params = sum(p.numel() for p in unetr.parameters()) - sum(p.numel() for p in unetr.vit.parameters())
    assert sum(p.numel() for p in head.parameters()) == decoder_params
    _copy_by_prefix(
        head,
        unetr,
        {
            "image_block": "encoder1",
            "skip_blocks.0": "encoder2",
            "skip_blocks.1": "encoder3",
            "skip_blocks.2": "encoder4",
            "up_blocks.0": "decoder5",
            "up_blocks.1": "decoder4",
            "up_blocks.2": "decoder3",
            "final_up": "decoder2",
            "out": "out",
        },
    )
    # MONAI's UNETR reads hidden_states_out[3, 6, 9] and the normed last block
    model = SegmentationModel(MonaiViTFeatures(unetr, indices=(3, 6, 9, 11)), head).eval()
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(model(x), unetr(x), rtol=0, atol=0)


def test_hierarchical_head_equals_swinunetr_decoder():
    swin = SwinUNETR(1, 2, feature_size=12, spatial_dims=2, depths=(1, 1, 1, 1)).eval()
    encoder = SwinUNETRFeatures(swin)
    head = HierarchicalDecoderHead(
        2,
        encoder.feature_channels,
        encoder.feature_strides,
        2,
        image_channels=1,
        skip_conv=(True, True, True, False, True),
    )
    _copy_by_prefix(
        head,
        swin,
        {
            "image_block": "encoder1",
            "skip_blocks.0": "encoder2",
            "skip_blocks.1": "encoder3",
            "skip_blocks.2": "encoder4",
            "skip_blocks.4": "encoder10",
            "up_blocks.0": "decoder5",
            "up_blocks.1": "decoder4",
            "up_blocks.2": "decoder3",
            "up_blocks.3": "decoder2",
            "final_up": "decoder1",
            "out": "out",
        },
    )
    model = SegmentationModel(encoder, head).eval()
    x = torch.randn(1, 1, 64, 64)
    torch.testing.assert_close(model(x), swin(x), rtol=0, atol=0)


def test_unetr_head_tokens_and_maps_agree_2d():
    head = UNETRHead(2, 32, 4, patch_size=16, feature_size=4, image_channels=3).eval()
    maps = [torch.randn(2, 32, 3, 5) for _ in range(4)]
    cls = torch.randn(2, 1, 32)
    tokens = [map_to_tokens(m, cls) for m in maps]
    image = torch.randn(2, 3, 48, 80)  # non-square: grid (3, 5) from the image, CLS count inferred
    out = head(tokens, image)
    assert out.shape == (2, 4, 48, 80)
    torch.testing.assert_close(out, head(maps, image))


def test_unetr_head_3d_patch8_and_without_image():
    head = UNETRHead(3, 24, 2, patch_size=8, feature_size=4, image_channels=1)
    assert head.num_features == 3 and len(head.skip_blocks) == 2
    maps = [torch.randn(1, 24, 2, 3, 2) for _ in range(3)]
    assert head(maps, torch.randn(1, 1, 16, 24, 16)).shape == (1, 2, 16, 24, 16)
    no_image = UNETRHead(3, 24, 2, patch_size=8, feature_size=4, image_channels=None)
    assert no_image(maps).shape == (1, 2, 16, 24, 16)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_setr_pup_structure_and_shape(spatial_dims):
    head = SETRPUPHead(spatial_dims, 32, 3, patch_size=16, channels=8)
    stages = list(head.stages)
    assert len(stages) == 4  # 1/16 -> 1/1 in four x2 steps
    for stage in stages:
        conv, up = stage
        assert isinstance(conv, Convolution) and isinstance(up, UpSample)
        kinds = [type(m).__name__ for m in conv.modules()]
        assert f"Conv{spatial_dims}d" in kinds and f"BatchNorm{spatial_dims}d" in kinds and "ReLU" in kinds
        assert conv.conv.kernel_size == (3,) * spatial_dims
    assert isinstance(head.input_norm, nn.LayerNorm)
    grid = (2, 3) if spatial_dims == 2 else (2, 1, 2)
    tokens = torch.randn(2, 1 + torch.Size(grid).numel(), 32)
    image = torch.randn(2, 1, *(16 * g for g in grid))
    assert head(tokens, image).shape == (2, 3, *image.shape[2:])


def test_progressive_head_light_and_anisotropic():
    head = ProgressiveUpsamplingHead(3, 16, 2, patch_size=(16, 16, 4), channels=(8, 4))
    assert head.remaining_scale == (4, 4, 1)
    out = head(torch.randn(1, 16, 2, 2, 3))
    assert out.shape == (1, 2, 32, 32, 12)
    light = ProgressiveUpsamplingHead(2, 768, 2)
    setr = SETRPUPHead(2, 768, 2)
    assert sum(p.numel() for p in light.parameters()) < sum(p.numel() for p in setr.parameters()) / 5


def test_hierarchical_head_anisotropic_and_equal_strides():
    strides = ((2, 2, 1), (4, 4, 2), (8, 8, 2))  # the last two share the z resolution
    head = HierarchicalDecoderHead(3, (4, 8, 16), strides, 3, image_channels=2)
    image = torch.randn(1, 2, 16, 16, 8)
    feats = [torch.randn(1, c, *(s // t for s, t in zip(image.shape[2:], st))) for c, st in zip((4, 8, 16), strides)]
    assert head(feats, image).shape == (1, 3, 16, 16, 8)
    # TinyViT-like: two maps at the same stride, finest at full resolution, no image skip
    head = HierarchicalDecoderHead(2, (8, 12, 16), (1, 4, 4), 2)
    out = head([torch.randn(2, 8, 32, 32), torch.randn(2, 12, 8, 8), torch.randn(2, 16, 8, 8)])
    assert out.shape == (2, 2, 32, 32)


def test_segmentation_head_errors():
    head = UNETRHead(2, 32, 2, patch_size=16, feature_size=4, image_channels=1)
    maps = [torch.randn(1, 32, 2, 2) for _ in range(4)]
    with pytest.raises(InputDataError, match="mismatched number of skips"):
        head(maps[:3], torch.randn(1, 1, 32, 32))
    with pytest.raises(InputDataError, match="not divisible by the patch size"):
        head(maps, torch.randn(1, 1, 40, 32))
    with pytest.raises(InputDataError, match="does not match image size"):
        head(maps, torch.randn(1, 1, 64, 64))
    with pytest.raises(InputDataError, match="needs the input image"):
        head(maps)
    with pytest.raises(InputDataError, match="wrong token count"):
        head([torch.randn(1, 5, 32)] * 4, torch.randn(1, 1, 48, 48))
    with pytest.raises(InputDataError, match="width 16"):
        head([torch.randn(1, 5, 16)] * 4, torch.randn(1, 1, 32, 32))
    with pytest.raises(ConfigError, match="power of two"):
        UNETRHead(2, 32, 2, patch_size=14)
    with pytest.raises(ConfigError, match="isotropic"):
        UNETRHead(3, 32, 2, patch_size=(16, 16, 8))
    with pytest.raises(ConfigError, match="do not divide the patch size"):
        ProgressiveUpsamplingHead(2, 32, 2, patch_size=8, channels=(4, 4, 4, 4))
    hier = HierarchicalDecoderHead(2, (4, 8), (2, 4), 2)
    with pytest.raises(InputDataError, match="mismatched number of skips"):
        hier([torch.randn(1, 4, 8, 8)])
    with pytest.raises(InputDataError, match="expected"):
        hier([torch.randn(1, 4, 8, 8), torch.randn(1, 8, 3, 3)])
    with pytest.raises(InputDataError, match="tokens_to_map"):
        hier([torch.randn(1, 64, 4), torch.randn(1, 16, 8)])
    with pytest.raises(ConfigError, match="finest first"):
        HierarchicalDecoderHead(2, (4, 8), (4, 2), 2)
    with pytest.raises(ConfigError, match="skip_conv"):
        HierarchicalDecoderHead(2, (4, 8), (2, 4), 2, decoder_channels=(4, 4), skip_conv=(True, False))
    with pytest.raises(InputDataError, match="MonaiViTFeatures"):
        head((torch.randn(1, 4, 32), [torch.randn(1, 4, 32)]), torch.randn(1, 1, 32, 32))


def test_segmentation_model_wrapping_and_output_check():
    proj = nn.Conv2d(1, 8, kernel_size=4, stride=4)  # a toy "encoder" with patch 4
    head = ProgressiveUpsamplingHead(2, 8, 2, patch_size=4, channels=(4,), dropout=0.2)
    assert isinstance(head.dropout, nn.Dropout2d)
    model = SegmentationModel(lambda x: [proj(x)], head)
    assert isinstance(model.encoder, nn.Module) and not list(model.encoder.parameters())  # callable wrapped
    assert all(n.startswith("decoder.") for n, _ in model.named_parameters())
    assert model(torch.randn(2, 1, 16, 12)).shape == (2, 2, 16, 12)
    wrong = SegmentationModel(
        lambda x: [proj(x)], ProgressiveUpsamplingHead(2, 8, 2, patch_size=8, channels=(4,)), pass_image=False
    )
    with pytest.raises(InputDataError, match="do not match the encoder"):
        wrong(torch.randn(1, 1, 16, 16))
