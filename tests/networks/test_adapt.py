"""In-channel adaptation, position-embedding and patch-embedding resampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from monai_peft.errors import ConfigError
from monai_peft.networks.adapt import adapt_input_channels, resample_patch_embed, resample_pos_embed


def test_grayscale_sum_is_exact_for_replicated_images() -> None:
    w = torch.randn(8, 3, 5, 5, dtype=torch.float64)
    gray = torch.randn(2, 1, 20, 20, dtype=torch.float64)
    w1 = adapt_input_channels(w, 1)
    assert w1.shape == (8, 1, 5, 5)
    assert torch.allclose(F.conv2d(gray, w1), F.conv2d(gray.repeat(1, 3, 1, 1), w), atol=1e-12)


def test_more_channels_tile_and_rescale_3d() -> None:
    w = torch.randn(4, 1, 2, 2, 2, dtype=torch.float64)  # SwinUNETR-style 3D kernel, 1 CT channel
    w4 = adapt_input_channels(w, 4)
    assert w4.shape == (4, 4, 2, 2, 2)
    x = torch.randn(1, 1, 6, 6, 6, dtype=torch.float64)
    # an image replicated to the 4 channels gives the original response
    assert torch.allclose(F.conv3d(x.repeat(1, 4, 1, 1, 1), w4), F.conv3d(x, w), atol=1e-12)
    assert torch.equal(adapt_input_channels(w, 1), w)
    with pytest.raises(ConfigError):
        adapt_input_channels(torch.randn(3, 3), 1)


def test_pos_embed_same_grid_is_identity_and_matches_timm() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert torch.equal(resample_pos_embed(pos, 14, num_prefix_tokens=1), pos)
    for new in [(7, 7), (20, 20), (10, 16)]:
        ours = resample_pos_embed(pos, new, num_prefix_tokens=1)
        ref = timm_layers.resample_abs_pos_embed(pos, list(new), num_prefix_tokens=1)
        assert ours.shape == (1, 1 + new[0] * new[1], 32)
        assert torch.allclose(ours, ref, atol=1e-6)
        assert torch.equal(ours[:, :1], pos[:, :1])  # CLS position untouched
    with pytest.raises(ConfigError, match="square"):
        resample_pos_embed(torch.randn(1, 10, 4), 3)


def test_patch_embed_upsampling_preserves_tokens_exactly() -> None:
    """FlexiViT PI-resize: <resize(x), w'> == <x, w> for every patch x when the patch grows."""
    w = torch.randn(6, 3, 4, 4, dtype=torch.float64)
    w8 = resample_patch_embed(w, 8)
    assert w8.shape == (6, 3, 8, 8)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    x8 = F.interpolate(x, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(torch.einsum("bchw,ochw->bo", x8, w8), torch.einsum("bchw,ochw->bo", x, w), atol=1e-9)


def test_patch_embed_matches_timm() -> None:
    timm_layers = pytest.importorskip("timm.layers")
    w = torch.randn(16, 3, 16, 16)
    for new in (8, 24):
        ours = resample_patch_embed(w, new)
        ref = timm_layers.resample_patch_embed(w, [new, new])
        assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)
