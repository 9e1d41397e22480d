"""Helpers shared by the backbone / converter tests (tiny timm ViTs with non-trivial random weights)."""

from __future__ import annotations

import torch
from torch import nn


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter a random, non-default value (LayerNorm weights around 1, position/CLS embeddings
    of order 1) so that a wrong key mapping, a missing CLS-position fold or a wrong eps changes the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=gen)
            if "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith(("pos_embed", "cls_token")):
                param.copy_(0.5 * noise)
            else:
                param.copy_(0.05 * noise)
    return model


def tiny_timm_vit(
    *, global_pool: str = "token", num_classes: int = 5, depth: int = 2, seed: int = 0, **kwargs
) -> nn.Module:
    """A randomly initialised timm ViT-Tiny/16 (width 192, 3 heads) with ``depth`` blocks, in eval mode."""
    import timm

    model = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=num_classes,
        global_pool=global_pool,
        depth=depth,
        **kwargs,
    )
    return randomize_(model, seed).eval()


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())
