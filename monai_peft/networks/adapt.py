"""Weight adaptations used when a pretrained checkpoint meets a slightly different network.

* :func:`adapt_input_channels` - first-layer kernels for another number of input channels (grayscale CT/CXR
  into an RGB-pretrained stem: the RGB kernels are summed, so a gray image gives exactly the response the RGB
  network gives to that image replicated to three channels).
* :func:`resample_pos_embed` - ViT position embeddings for another token grid (another image or patch size).
* :func:`resample_patch_embed` - ViT patch-embedding kernels for another patch size, by the pseudo-inverse
  resize of FlexiViT (Beyer et al., CVPR 2023): the new kernel ``w'`` solves ``<resize(x), w'> = <x, w>`` for
  every patch ``x`` (exactly when upsampling, in the least-squares sense when downsampling).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from monai_peft.errors import ConfigError

__all__ = ["adapt_input_channels", "resample_patch_embed", "resample_pos_embed"]


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a convolution kernel ``(out, in, *kernel)`` to ``in_channels`` input channels.

    * same count: a copy;
    * ``in_channels == 1``: sum over the input channels - exact: ``conv(x, w') == conv(x.repeat(in), w)``;
    * otherwise: the channels are tiled cyclically and scaled by ``in / in_channels`` - exact for a
      single-channel image replicated to all channels when ``in_channels`` is a multiple of ``in``, a
      reasonable start otherwise (multi-sequence MR into an RGB stem, 4-channel BraTS into a 1-channel
      SwinUNETR).

    Args:
        weight: kernel of shape ``(out_channels, in, k1[, k2[, k3]])``.
        in_channels: wanted number of input channels (>= 1).

    Returns:
        kernel of shape ``(out_channels, in_channels, k1[, k2[, k3]])`` with the dtype of ``weight``.
    """
    if weight.ndim < 3:
        raise ConfigError(f"expected a convolution kernel (out, in, *kernel), got shape {tuple(weight.shape)}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    old = weight.shape[1]
    if in_channels == old:
        return weight.clone()
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeats = -(-in_channels // old)  # ceil
    tiled = weight.repeat(1, repeats, *([1] * (weight.ndim - 2)))[:, :in_channels]
    return tiled * (old / in_channels)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = tuple(int(v) for v in value)
    if len(values) != 2:
        raise ConfigError(f"expected an int or a pair of ints, got {value!r}")
    return values  # type: ignore[return-value]


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: int | Sequence[int],
    old_grid: int | Sequence[int] | None = None,
    *,
    num_prefix_tokens: int = 0,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample ViT position embeddings to another token grid.

    Args:
        pos_embed: ``(1, num_prefix_tokens + H*W, C)``; prefix (CLS) embeddings are kept unchanged.
        new_grid: target grid ``(H', W')`` (an int means square).
        old_grid: source grid; default: square grid from the token count.
        num_prefix_tokens: leading non-spatial tokens (1 for timm's ``pos_embed`` with a class token,
            0 for MONAI's ``position_embeddings``).
        mode: ``F.interpolate`` mode (``bicubic`` as timm and MAE use).
        antialias: anti-aliasing when shrinking (timm's default; MAE's own helper does not anti-alias, which
            only matters when the grid shrinks).

    Returns:
        ``(1, num_prefix_tokens + H'*W', C)``, same dtype.
    """
    if pos_embed.ndim != 3 or pos_embed.shape[0] != 1:
        raise ConfigError(f"expected position embeddings of shape (1, N, C), got {tuple(pos_embed.shape)}")
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    n = grid_tokens.shape[1]
    if old_grid is None:
        side = round(n**0.5)
        if side * side != n:
            raise ConfigError(f"{n} position tokens are not a square grid; pass old_grid=(H, W)")
        old_hw = (side, side)
    else:
        old_hw = _pair(old_grid)
        if old_hw[0] * old_hw[1] != n:
            raise ConfigError(f"old_grid {old_hw} does not match {n} position tokens")
    new_hw = _pair(new_grid)
    if new_hw == old_hw:
        return pos_embed.clone()
    channels = grid_tokens.shape[-1]
    grid = grid_tokens.float().reshape(1, old_hw[0], old_hw[1], channels).permute(0, 3, 1, 2)
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    grid = F.interpolate(grid, size=new_hw, mode=mode, align_corners=align, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], channels).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def _resize_matrix(old_hw: tuple[int, int], new_hw: tuple[int, int], mode: str, antialias: bool) -> torch.Tensor:
    """Matrix ``R`` (new_h*new_w, old_h*old_w) with ``vec(resize(x)) = R @ vec(x)`` (resize is linear)."""
    eye = torch.eye(old_hw[0] * old_hw[1], dtype=torch.float64).reshape(-1, 1, *old_hw)
    align = False if mode in ("linear", "bilinear", "bicubic", "trilinear") else None
    basis = F.interpolate(eye, size=new_hw, mode=mode, align_corners=align, antialias=antialias)
    return basis.reshape(old_hw[0] * old_hw[1], -1).T


def resample_patch_embed(
    weight: torch.Tensor,
    new_size: int | Sequence[int],
    *,
    mode: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample patch-embedding kernels ``(out, in, p, p)`` to ``(out, in, q, q)`` (FlexiViT PI-resize).

    With ``R`` the linear map that resizes a ``p x p`` patch to ``q x q`` (same ``mode``/``antialias`` as the
    images will be resized with), the new kernel is ``pinv(R^T) w``: for ``q >= p`` it reproduces the old
    token exactly, ``<R x, w'> = <x, w>``; for ``q < p`` it is the least-squares best choice.

    Args:
        weight: ``(out_channels, in_channels, p_h, p_w)`` patch-embedding convolution kernel.
        new_size: new patch size (int = square).

    Returns:
        ``(out_channels, in_channels, q_h, q_w)`` kernel, dtype of ``weight``.
    """
    if weight.ndim != 4:
        raise ConfigError(f"expected a 2D patch-embedding kernel (out, in, p, p), got {tuple(weight.shape)}")
    old_hw = (int(weight.shape[2]), int(weight.shape[3]))
    new_hw = _pair(new_size)
    if new_hw == old_hw:
        return weight.clone()
    resize = _resize_matrix(old_hw, new_hw, mode, antialias)  # (q*q, p*p)
    solve = torch.linalg.pinv(resize.T)  # (q*q, p*p)
    flat = weight.to(torch.float64).reshape(weight.shape[0] * weight.shape[1], -1)  # (O*I, p*p)
    new = flat @ solve.T
    return new.reshape(weight.shape[0], weight.shape[1], *new_hw).to(weight.dtype)
