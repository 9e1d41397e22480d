"""Tiny networks and checks shared by the tests (fast on CPU)."""

from __future__ import annotations

import torch
from monai.networks import nets
from torch import nn


def tiny_vit(
    spatial_dims: int = 2,
    img: int | tuple[int, ...] = 32,
    patch: int = 8,
    layers: int = 2,
    classes: int = 3,
    **overrides,
) -> nets.ViT:
    """A tiny MONAI ViT (hidden 48, 4 heads); ``img`` an int (square / cube) or a per-axis size; ``overrides``
    replace any ViT argument (e.g. ``qkv_bias=False``, ``classification=False``)."""
    args = dict(
        in_channels=1,
        img_size=(img,) * spatial_dims if isinstance(img, int) else tuple(img),
        patch_size=patch,
        spatial_dims=spatial_dims,
        hidden_size=48,
        mlp_dim=96,
        num_layers=layers,
        num_heads=4,
        classification=True,
        num_classes=classes,
        qkv_bias=True,
        post_activation=None,
    )
    return nets.ViT(**{**args, **overrides})


#: Non-square (2D) and anisotropic (3D) ViT inputs: 32x16 px -> 4x2 patches, 16x16x8 -> 2x2x1 (patch 8).
ANISO_VIT_IMAGE = {2: (32, 16), 3: (16, 16, 8)}
#: Non-square / anisotropic CNN inputs.
ANISO_CNN_IMAGE = {2: (40, 24), 3: (16, 20, 12)}


def aniso_vit(spatial_dims: int, **overrides) -> nets.ViT:
    """:func:`tiny_vit` on the :data:`ANISO_VIT_IMAGE` grid, in eval mode."""
    return tiny_vit(spatial_dims, img=ANISO_VIT_IMAGE[spatial_dims], **overrides).eval()


def aniso_vit_image(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *ANISO_VIT_IMAGE[spatial_dims])


def aniso_cnn_image(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 1, *ANISO_CNN_IMAGE[spatial_dims])


def tiny_resnet(spatial_dims: int = 2, classes: int = 3) -> nets.ResNet:
    return nets.ResNet(
        block="basic",
        layers=[1, 1, 1, 1],
        block_inplanes=[8, 16, 16, 16],
        spatial_dims=spatial_dims,
        n_input_channels=1,
        num_classes=classes,
    )


def tiny_densenet(spatial_dims: int = 2, classes: int = 3) -> nets.DenseNet:
    return nets.DenseNet(
        spatial_dims=spatial_dims,
        in_channels=1,
        out_channels=classes,
        init_features=8,
        growth_rate=4,
        block_config=(1, 1),
    )


def tiny_unetr(spatial_dims: int = 3, img: int = 32) -> nets.UNETR:
    return nets.UNETR(
        in_channels=1,
        out_channels=2,
        img_size=(img,) * spatial_dims,
        feature_size=4,
        hidden_size=48,
        mlp_dim=96,
        num_heads=4,
        spatial_dims=spatial_dims,
        qkv_bias=True,
    )


def tiny_swinunetr(spatial_dims: int = 3) -> nets.SwinUNETR:
    return nets.SwinUNETR(
        in_channels=1, out_channels=2, feature_size=12, spatial_dims=spatial_dims, depths=(1, 1, 1, 1)
    )


def tiny_mae(spatial_dims: int = 2, img: int = 32) -> nets.MaskedAutoEncoderViT:
    return nets.MaskedAutoEncoderViT(
        in_channels=1,
        img_size=(img,) * spatial_dims,
        patch_size=8,
        hidden_size=48,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        decoder_hidden_size=24,
        decoder_mlp_dim=48,
        decoder_num_layers=1,
        decoder_num_heads=4,
        spatial_dims=spatial_dims,
    )


def tiny_segresnet(spatial_dims: int = 3) -> nets.SegResNet:
    return nets.SegResNet(
        spatial_dims=spatial_dims, init_filters=8, in_channels=1, out_channels=2, blocks_down=(1, 1), blocks_up=(1,)
    )


def tiny_basicunet(spatial_dims: int = 2) -> nets.BasicUNet:
    return nets.BasicUNet(spatial_dims=spatial_dims, in_channels=1, out_channels=2, features=(4, 4, 8, 8, 8, 4))


def first(out):
    """Networks like MONAI's ViT return (logits, hidden_states)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def randomize_adapter_params(model: nn.Module, std: float = 0.05) -> None:
    """Give trainable (adapter) parameters non-trivial values, deterministically."""
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def grad_report(model: nn.Module) -> tuple[set[str], set[str], set[str]]:
    """(trainable names, names with a gradient, trainable names without gradient)."""
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    return trainable, with_grad, trainable - with_grad


def toy_loss(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A learnable loss for any tiny network: voxel-wise (bright voxels are foreground) or fixed batch labels."""
    import torch.nn.functional as F

    if out.dim() > 2:
        return F.cross_entropy(out, (x[:, 0] > 0.5).long())
    return F.cross_entropy(out, torch.arange(out.shape[0]) % out.shape[1])


def train_and_check_loss_drops(model: nn.Module, x: torch.Tensor, steps: int = 8, lr: float = 1e-2) -> None:
    """A few Adam steps on :func:`toy_loss` lower the eval-mode loss; frozen parameters do not move."""
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = toy_loss(first(model(x)), x)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        final = toy_loss(first(model(x)), x).item()
    assert final < losses[0] - 1e-3, (losses, final)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
