"""Small MONAI transformer segmentation networks (CPU-fast) shared by the inference tests."""

from __future__ import annotations

import copy

import torch
from monai.networks import nets
from torch import nn

import monai_peft as mp
from tests import helpers as h


def swinunetr(spatial_dims: int, in_channels: int = 2, out_channels: int = 3) -> nets.SwinUNETR:
    """SwinUNETR, feature_size 12, one block per stage: windows must be multiples of 32 voxels."""
    return nets.SwinUNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        feature_size=12,
        spatial_dims=spatial_dims,
        depths=(1, 1, 1, 1),
        num_heads=(1, 1, 1, 1),
    )


def unetr(spatial_dims: int, img_size: tuple[int, ...], in_channels: int = 1, out_channels: int = 2) -> nets.UNETR:
    """UNETR with a 48-wide, 12-layer ViT (16-voxel patches): ``img_size`` is the (non-cubic) window size."""
    return nets.UNETR(
        in_channels=in_channels,
        out_channels=out_channels,
        img_size=img_size,
        feature_size=4,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
        spatial_dims=spatial_dims,
        qkv_bias=True,
    )


def with_lora(base: nn.Module, r: int = 4) -> mp.PeftModel:
    """A LoRA PeftModel on a copy of ``base`` whose adapter weights are non-zero (a fresh LoRA is an identity)."""
    model = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(r=r, alpha=2 * r))
    h.randomize_adapter_params(model, std=0.05)
    return model.eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float() - b.detach().float()).abs().max())
