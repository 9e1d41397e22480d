"""Token sequence <-> feature map conversions (monai_peft.networks.heads.tokens)."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import PatchEmbeddingBlock

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads import (
    grid_from_image,
    infer_grid,
    map_to_tokens,
    split_prefix_tokens,
    tokens_to_map,
)


@pytest.mark.parametrize("grid", [(3, 5), (4, 4), (2, 3, 4), (3, 3, 3)])
@pytest.mark.parametrize("num_prefix", [0, 1, 5])
def test_round_trip_is_exact(grid, num_prefix):
    n = 1
    for g in grid:
        n *= g
    tokens = torch.randn(2, num_prefix + n, 7)
    prefix, fmap = split_prefix_tokens(tokens, grid, num_prefix)
    assert fmap.shape == (2, 7, *grid)
    assert prefix.shape == (2, num_prefix, 7)
    assert torch.equal(map_to_tokens(fmap, prefix), tokens)
    assert torch.equal(tokens_to_map(map_to_tokens(fmap), grid), fmap)


def test_row_major_layout_by_hand():
    grid = (3, 5)
    tokens = torch.randn(1, 1 + 15, 4)
    fmap = tokens_to_map(tokens, grid, num_prefix_tokens=1)
    for i in range(3):
        for j in range(5):
            assert torch.equal(fmap[0, :, i, j], tokens[0, 1 + i * 5 + j])


@pytest.mark.parametrize("spatial_dims,img,patch", [(2, (32, 48), 16), (3, (16, 24, 32), 8)])
def test_matches_monai_patch_embedding(spatial_dims, img, patch):
    """tokens_to_map undoes MONAI's conv patch embedding flattening exactly (also for non-square grids)."""
    pe = PatchEmbeddingBlock(
        in_channels=2,
        img_size=img,
        patch_size=patch,
        hidden_size=12,
        num_heads=2,
        pos_embed_type="none",
        spatial_dims=spatial_dims,
    )
    x = torch.randn(2, 2, *img)
    with torch.no_grad():
        tokens = pe(x)
        conv_map = pe.patch_embeddings(x)
    grid = grid_from_image(img, patch)
    assert torch.equal(tokens_to_map(tokens, grid), conv_map)


def test_inferred_grid_and_prefix():
    assert infer_grid(196, 2) == (14, 14)
    assert infer_grid(27, 3) == (3, 3, 3)
    x = torch.randn(2, 1 + 16, 8)
    assert tokens_to_map(x, num_prefix_tokens=1, spatial_dims=2).shape == (2, 8, 4, 4)
    # the number of prefix tokens (CLS + 3 prompts) is inferred from the grid
    x = torch.randn(2, 4 + 12, 8)
    prefix, fmap = split_prefix_tokens(x, grid=(3, 4), num_prefix_tokens=None)
    assert prefix.shape[1] == 4 and fmap.shape == (2, 8, 3, 4)


def test_map_to_tokens_broadcasts_prefix():
    fmap = torch.randn(3, 6, 2, 2)
    cls = torch.randn(1, 1, 6)
    tokens = map_to_tokens(fmap, cls)
    assert tokens.shape == (3, 5, 6)
    assert torch.equal(tokens[:, 0], cls[0].expand(3, 6))


def test_errors_name_the_problem():
    with pytest.raises(InputDataError, match="perfect square"):
        tokens_to_map(torch.randn(1, 17, 8), num_prefix_tokens=0, spatial_dims=2)
    with pytest.raises(InputDataError, match="perfect cube"):
        tokens_to_map(torch.randn(1, 1 + 9, 8), num_prefix_tokens=1, spatial_dims=3)
    with pytest.raises(InputDataError, match="wrong token count"):
        tokens_to_map(torch.randn(1, 18, 8), grid=(4, 4), num_prefix_tokens=1)
    with pytest.raises(InputDataError, match="wrong token count.*fewer than"):
        tokens_to_map(torch.randn(1, 10, 8), grid=(4, 4), num_prefix_tokens=None)
    with pytest.raises(InputDataError, match=r"not divisible by the patch size"):
        grid_from_image((30, 32), 16)
    with pytest.raises(InputDataError, match=r"\(B, tokens, C\)"):
        tokens_to_map(torch.randn(2, 8, 4, 4), grid=(4, 4))
    with pytest.raises(ConfigError, match="grid"):
        tokens_to_map(torch.randn(1, 16, 8))
    with pytest.raises(InputDataError, match="batch size"):
        map_to_tokens(torch.randn(2, 4, 2, 2), torch.randn(3, 1, 4))
