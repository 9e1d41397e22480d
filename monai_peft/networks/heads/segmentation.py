"""2D/3D segmentation heads for transformer encoders, and the encoder-decoder wrapper.

Heads (all return logits ``(B, out_channels, *spatial)`` at the input resolution):

* :class:`UNETRHead`: the UNETR decoder (Hatamizadeh et al., "UNETR: Transformers for 3D Medical
  Image Segmentation", WACV 2022) for a plain ViT: tokens of intermediate blocks are reshaped to the
  patch grid and brought to 1/2, 1/4, ... of the input by transposed convolutions, then merged
  bottom-up with a full-resolution convolutional skip from the input image.
* :class:`SETRPUPHead`: SETR's progressive-upsampling decoder (Zheng et al., "Rethinking Semantic
  Segmentation from a Sequence-to-Sequence Perspective with Transformers", CVPR 2021): the last
  block's tokens, then ``log2(patch)`` stages of conv3x3 + norm + ReLU + 2x upsampling.
* :class:`ProgressiveUpsamplingHead`: the general (and by default lighter) form of the same idea:
  fewer / narrower stages, then interpolation of the logits by the remaining factor.
* :class:`HierarchicalDecoderHead`: a U-Net-like decoder over a list of multi-scale feature maps of
  decreasing resolution (Swin / SwinUNETR ``swinViT``, timm Swin, TinyViT / LiteMedSAM), built from
  the same MONAI UNETR blocks as SwinUNETR's decoder.

:class:`SegmentationModel` composes an encoder returning intermediate features with one of these
heads into a single module whose submodules are named ``encoder`` and ``decoder``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import (
    Convolution,
    UnetOutBlock,
    UnetrBasicBlock,
    UnetrPrUpBlock,
    UnetrUpBlock,
    UpSample,
)
from monai.networks.blocks.dynunet_block import get_conv_layer
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads.classification import as_encoder_module
from monai_peft.networks.heads.tokens import _as_int_tuple, grid_from_image, tokens_to_map

__all__ = [
    "HierarchicalDecoderHead",
    "ProgressiveUpsamplingHead",
    "SETRPUPHead",
    "SegmentationModel",
    "UNETRHead",
]

_INTERP = {1: "linear", 2: "bilinear", 3: "trilinear"}


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")


def _log2(value: int, what: str) -> int:
    if value < 2 or value & (value - 1):
        raise ConfigError(f"{what} must be a power of two >= 2, got {value}.")
    return value.bit_length() - 1


def _channel_dropout(spatial_dims: int, p: float) -> nn.Module:
    """Channel dropout before the 1x1 classifier (as segmentation decode heads do); identity for ``p == 0``."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout must be in [0, 1), got {p}.")
    if p == 0:
        return nn.Identity()
    return nn.Dropout2d(p) if spatial_dims == 2 else nn.Dropout3d(p)


def _feature_list(features: torch.Tensor | Sequence[torch.Tensor], head: str) -> list[torch.Tensor]:
    if isinstance(features, torch.Tensor):
        return [features]
    if isinstance(features, (list, tuple)) and all(isinstance(f, torch.Tensor) for f in features):
        return list(features)
    kinds = [type(f).__name__ for f in features] if isinstance(features, (list, tuple)) else type(features).__name__
    raise InputDataError(
        f"{head} expected a tensor or a list/tuple of tensors, got {kinds}. A raw MONAI ViT returns "
        "(x, hidden_states_out): wrap the encoder in a feature extractor (e.g. MonaiViTFeatures)."
    )


def _check_image(image: torch.Tensor, spatial_dims: int, channels: int | None, head: str) -> None:
    if image.ndim != spatial_dims + 2:
        raise InputDataError(
            f"{head} (spatial_dims={spatial_dims}) expects the image as (B, C, *{spatial_dims} spatial dims), "
            f"got {tuple(image.shape)}."
        )
    if channels is not None and image.shape[1] != channels:
        raise InputDataError(f"{head} was built for image_channels={channels}, the image has {image.shape[1]}.")


def _token_features_as_maps(
    features: list[torch.Tensor],
    *,
    head: str,
    spatial_dims: int,
    in_channels: int,
    grid: tuple[int, ...] | None,
    num_prefix_tokens: int | None,
) -> list[torch.Tensor]:
    """Maps ``(B, C, *grid)`` from tokens ``(B, P + N, C)`` or maps, all on one token grid."""
    maps = []
    for i, f in enumerate(features):
        if f.ndim == 3:
            if f.shape[-1] != in_channels:
                raise InputDataError(
                    f"{head}: token feature {i} has width {f.shape[-1]}, expected in_channels={in_channels}."
                )
            if grid is None and num_prefix_tokens is None:
                raise InputDataError(
                    f"{head}: token features need the image (to know the grid) or num_prefix_tokens set at construction."
                )
            f = tokens_to_map(f, grid, num_prefix_tokens, spatial_dims)
        elif f.ndim == spatial_dims + 2:
            if f.shape[1] != in_channels:
                raise InputDataError(
                    f"{head}: feature map {i} has {f.shape[1]} channels, expected in_channels={in_channels}."
                )
        else:
            raise InputDataError(
                f"{head}: feature {i} has shape {tuple(f.shape)}; expected tokens (B, tokens, {in_channels}) or a map "
                f"(B, {in_channels}, *{spatial_dims} spatial dims)."
            )
        maps.append(f)
    grids = {tuple(m.shape[2:]) for m in maps}
    if len(grids) != 1:
        raise InputDataError(f"{head}: all features must share one token grid, got grids {sorted(grids)}.")
    if grid is not None and tuple(maps[0].shape[2:]) != tuple(grid):
        raise InputDataError(
            f"{head}: the features' grid {tuple(maps[0].shape[2:])} does not match image size // patch size = {grid}."
        )
    return maps


class UNETRHead(nn.Module):
    """UNETR decoder (Hatamizadeh et al., WACV 2022) for tokens of a plain ViT, 2D or 3D.

    For an isotropic patch size ``p = 2**k`` the head takes ``k`` token features of width
    ``in_channels`` on the patch grid ``G = S // p`` (``S``: input spatial size): features
    ``0 .. k-2`` are skips, feature ``k-1`` (usually the last, normed block) is the bottleneck.
    Skip ``i`` is brought to resolution ``S / 2**(i+1)`` with ``feature_size * 2**(i+1)`` channels
    by ``k-1-i`` transposed convolutions (MONAI ``UnetrPrUpBlock``); the decoder then goes
    ``G -> S/2**(k-1) -> ... -> S/2 -> S`` with ``UnetrUpBlock`` modules, the last merging a
    full-resolution ``UnetrBasicBlock`` applied to the input image, and a 1x1 ``UnetOutBlock``.

    With ``p = 16`` this is exactly MONAI's ``UNETR`` decoder (same modules, same parameter count).
    MONAI's ``UNETR`` feeds ``hidden_states_out[3]``, ``[6]``, ``[9]`` (blocks 4, 7, 10 counted from 1)
    and the normed last block; the paper's ``z3, z6, z9, z12`` are the 0-based indices ``2, 5, 8, 11``,
    the default of :func:`~monai_peft.networks.heads.extractors.evenly_spaced_indices`.

    Args:
        spatial_dims: 2 or 3.
        in_channels: ViT hidden size ``C``.
        out_channels: number of output classes.
        patch_size: ViT patch size, an isotropic power of two (int, or a sequence of equal ints).
        feature_size: decoder width at full resolution; level ``i`` has ``feature_size * 2**i``.
        image_channels: channels of the input image for the full-resolution skip; ``None`` drops
            that skip (the last stage is then a transposed convolution followed by a conv block).
        norm_name: MONAI norm spec of the conv blocks (``"instance"`` as UNETR, ``"batch"`` ...).
        conv_block: conv blocks after each transposed conv in the skip paths (UNETR default True).
        res_block: residual conv blocks (UNETR default True).
        num_prefix_tokens: leading non-patch tokens of token inputs; ``None`` infers them from the
            image size (robust to a run-time number of prompt tokens).
        dropout: channel dropout (Dropout2d/3d) before the final 1x1 convolution.

    Shapes:
        ``forward(features, image)``: ``features`` is a list of ``k`` tensors, each tokens
        ``(B, P + prod(G), C)`` or a map ``(B, C, *G)``; ``image`` ``(B, image_channels, *S)``.
        Returns ``(B, out_channels, *S)`` with ``S = G * p``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        patch_size: int | Sequence[int] = 16,
        feature_size: int = 16,
        image_channels: int | None = 1,
        norm_name: str | tuple = "instance",
        conv_block: bool = True,
        res_block: bool = True,
        num_prefix_tokens: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        patch = _as_int_tuple(patch_size, spatial_dims, "patch_size")
        if len(set(patch)) != 1:
            raise ConfigError(
                f"UNETRHead needs an isotropic patch size (one upsampling schedule for every axis), got {patch}; "
                "use ProgressiveUpsamplingHead for anisotropic patches."
            )
        k = _log2(patch[0], "UNETRHead patch_size")
        if in_channels < 1 or out_channels < 1 or feature_size < 1:
            raise ConfigError("in_channels, out_channels and feature_size must be >= 1.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch
        self.image_channels = image_channels
        self.num_prefix_tokens = num_prefix_tokens
        self.num_features = k
        fs = feature_size

        # skip i: tokens -> (fs * 2**(i+1), S / 2**(i+1)) through k-1-i transposed convolutions
        self.skip_blocks = nn.ModuleList(
            UnetrPrUpBlock(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=fs * 2 ** (i + 1),
                num_layer=k - 2 - i,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=2,
                norm_name=norm_name,
                conv_block=conv_block,
                res_block=res_block,
            )
            for i in range(k - 1)
        )
        # up_blocks[j - 1] brings level j + 1 (or the bottleneck) to level j = k-1 ... 1 (S / 2**j)
        up = []
        for j in range(k - 1, 0, -1):
            up.append(
                UnetrUpBlock(
                    spatial_dims=spatial_dims,
                    in_channels=in_channels if j == k - 1 else fs * 2 ** (j + 1),
                    out_channels=fs * 2**j,
                    kernel_size=3,
                    upsample_kernel_size=2,
                    norm_name=norm_name,
                    res_block=res_block,
                )
            )
        self.up_blocks = nn.ModuleList(up)
        last_in = in_channels if k == 1 else fs * 2
        self.image_block: nn.Module | None
        self.final_up: nn.Module
        if image_channels is not None:
            self.image_block = UnetrBasicBlock(
                spatial_dims=spatial_dims,
                in_channels=image_channels,
                out_channels=fs,
                kernel_size=3,
                stride=1,
                norm_name=norm_name,
                res_block=res_block,
            )
            self.final_up = UnetrUpBlock(
                spatial_dims=spatial_dims,
                in_channels=last_in,
                out_channels=fs,
                kernel_size=3,
                upsample_kernel_size=2,
                norm_name=norm_name,
                res_block=res_block,
            )
        else:
            self.image_block = None
            self.final_up = nn.Sequential(
                get_conv_layer(spatial_dims, last_in, fs, kernel_size=2, stride=2, conv_only=True, is_transposed=True),
                UnetrBasicBlock(
                    spatial_dims, fs, fs, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
                ),
            )
        self.dropout = _channel_dropout(spatial_dims, dropout)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=fs, out_channels=out_channels)

    def forward(
        self, features: torch.Tensor | Sequence[torch.Tensor], image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, out_channels, *S)``; see the class docstring for the shapes."""
        name = type(self).__name__
        feats = _feature_list(features, name)
        if len(feats) != self.num_features:
            raise InputDataError(
                f"{name} with patch size {self.patch_size} expects {self.num_features} token features "
                f"({self.num_features - 1} skips + the bottleneck), got {len(feats)}: mismatched number of skips. "
                f"Pick {self.num_features} encoder blocks, e.g. indices=evenly_spaced_indices(num_layers, {self.num_features})."
            )
        grid = None
        if image is not None:
            _check_image(image, self.spatial_dims, self.image_channels, name)
            grid = grid_from_image(image.shape[2:], self.patch_size)
        elif self.image_channels is not None:
            raise InputDataError(
                f"{name}(image_channels={self.image_channels}) needs the input image for its full-resolution skip: "
                "call head(features, image) (SegmentationModel does this)."
            )
        maps = _token_features_as_maps(
            feats,
            head=name,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            grid=grid,
            num_prefix_tokens=self.num_prefix_tokens,
        )
        x = maps[-1]
        for j, block in zip(range(self.num_features - 1, 0, -1), self.up_blocks):
            x = block(x, self.skip_blocks[j - 1](maps[j - 1]))
        if self.image_block is not None:
            x = self.final_up(x, self.image_block(image))
        else:
            x = self.final_up(x)
        return self.out(self.dropout(x))


class ProgressiveUpsamplingHead(nn.Module):
    """Progressive upsampling decoder on one token feature: stages of conv + norm + act + 2x upsampling.

    Stage ``s`` maps ``channels[s-1] -> channels[s]`` (``channels[-1]`` of the previous stage, or
    ``in_channels``) with a ``kernel_size`` convolution, normalisation and activation, then doubles
    every spatial size. After ``len(channels)`` stages a 1x1 convolution produces the logits, which are
    interpolated (bi/trilinear) by the remaining factor ``patch_size / 2**len(channels)``. The SETR-PUP
    decoder (Zheng et al., CVPR 2021) is the special case with ``log2(patch)`` stages of 256 channels
    (:class:`SETRPUPHead`); the default here (64 then 32 channels, 2 stages, then x4 interpolation for
    patch 16) is a much lighter variant for PEFT where the head dominates the trainable budget.

    Args:
        spatial_dims: 2 or 3.
        in_channels: token / map width ``C``.
        out_channels: number of output classes.
        patch_size: encoder patch size (int or per-dimension); every entry must be a multiple of
            ``2**len(channels)``.
        channels: output channels of each stage.
        kernel_size: convolution kernel of the stages (3 in SETR-PUP).
        norm_name: MONAI norm spec (SETR uses batch norm).
        act_name: MONAI activation spec (ReLU in SETR).
        input_norm: LayerNorm over the channels of the input feature before the first stage (the
            public SETR implementation normalises the encoder tokens this way).
        upsample_mode: ``"nontrainable"`` (bi/trilinear, ``align_corners=False``) or ``"deconv"``
            (learned transposed convolution), as in MONAI ``UpSample``.
        dropout: channel dropout (Dropout2d/3d) before the final 1x1 convolution.
        feature_index: which element of the feature list to decode (default the last block).
        num_prefix_tokens: leading non-patch tokens of token inputs; ``None`` infers them from the image.

    Shapes:
        ``forward(features, image=None)``: tokens ``(B, P + prod(G), C)`` or a map ``(B, C, *G)`` (or a
        list of them); ``image`` ``(B, *, *S)`` is only used for the grid and the size check. Returns
        ``(B, out_channels, *G * patch_size)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        patch_size: int | Sequence[int] = 16,
        channels: Sequence[int] = (64, 32),
        kernel_size: int = 3,
        norm_name: str | tuple = "batch",
        act_name: str | tuple = "relu",
        input_norm: bool = False,
        upsample_mode: str = "nontrainable",
        dropout: float = 0.0,
        feature_index: int = -1,
        num_prefix_tokens: int | None = None,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        patch = _as_int_tuple(patch_size, spatial_dims, "patch_size")
        channels = tuple(int(c) for c in channels)
        if any(c < 1 for c in channels):
            raise ConfigError(f"channels must be positive, got {channels}.")
        factor = 2 ** len(channels)
        if any(p % factor for p in patch):
            raise ConfigError(
                f"{len(channels)} upsampling stages (x{factor}) do not divide the patch size {patch}; use fewer stages."
            )
        if upsample_mode not in ("nontrainable", "deconv"):
            raise ConfigError(f"upsample_mode must be 'nontrainable' or 'deconv', got {upsample_mode!r}.")
        if in_channels < 1 or out_channels < 1:
            raise ConfigError("in_channels and out_channels must be >= 1.")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_size = patch
        self.feature_index = feature_index
        self.num_prefix_tokens = num_prefix_tokens
        self.remaining_scale = tuple(p // factor for p in patch)
        self.input_norm = nn.LayerNorm(in_channels, eps=1e-6) if input_norm else None
        stages = []
        width = in_channels
        for c in channels:
            up = UpSample(
                spatial_dims,
                in_channels=c,
                out_channels=c,
                scale_factor=2,
                mode=upsample_mode,
                pre_conv=None,
                interp_mode=_INTERP[spatial_dims],
                align_corners=False,
            )
            conv = Convolution(
                spatial_dims, width, c, kernel_size=kernel_size, act=act_name, norm=norm_name, adn_ordering="NDA"
            )
            stages.append(nn.Sequential(conv, up))
            width = c
        self.stages = nn.Sequential(*stages)
        self.dropout = _channel_dropout(spatial_dims, dropout)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=width, out_channels=out_channels)

    def forward(
        self, features: torch.Tensor | Sequence[torch.Tensor], image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits ``(B, out_channels, *S)``; see the class docstring for the shapes."""
        name = type(self).__name__
        feats = _feature_list(features, name)
        try:
            feat = feats[self.feature_index]
        except IndexError:
            raise InputDataError(
                f"{name}: feature_index={self.feature_index} is out of range for {len(feats)} features."
            ) from None
        grid = None
        if image is not None:
            _check_image(image, self.spatial_dims, None, name)
            grid = grid_from_image(image.shape[2:], self.patch_size)
        x = _token_features_as_maps(
            [feat],
            head=name,
            spatial_dims=self.spatial_dims,
            in_channels=self.in_channels,
            grid=grid,
            num_prefix_tokens=self.num_prefix_tokens,
        )[0]
        if self.input_norm is not None:
            x = self.input_norm(x.movedim(1, -1)).movedim(-1, 1)
        x = self.out(self.dropout(self.stages(x)))
        if any(r > 1 for r in self.remaining_scale):
            x = F.interpolate(
                x, scale_factor=self.remaining_scale, mode=_INTERP[self.spatial_dims], align_corners=False
            )
        return x


class SETRPUPHead(ProgressiveUpsamplingHead):
    """SETR progressive-upsampling (PUP) decoder (Zheng et al., CVPR 2021).

    The last block's tokens, LayerNorm-ed, reshaped to the patch grid, then ``log2(patch)`` stages of
    conv3x3 (256 channels) + batch norm + ReLU + 2x bilinear upsampling (four for patch 16:
    1/16 -> 1/1), and a 1x1 classifier at full resolution. EPT uses it on ViT-B/16 for Kvasir-SEG.
    SETR's auxiliary heads on intermediate blocks (a training-time loss) are not part of this module.

    Args:
        spatial_dims: 2 or 3 (3D uses Conv3d and trilinear upsampling).
        in_channels: ViT hidden size.
        out_channels: number of classes.
        patch_size: isotropic power of two.
        channels: width of every stage (256 in SETR).
        norm_name, act_name, kernel_size, input_norm, upsample_mode, dropout, feature_index,
        num_prefix_tokens: as in :class:`ProgressiveUpsamplingHead`.

    Shapes:
        tokens ``(B, P + prod(G), C)`` or map ``(B, C, *G)`` -> ``(B, out_channels, *G * patch)``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        patch_size: int | Sequence[int] = 16,
        channels: int = 256,
        kernel_size: int = 3,
        norm_name: str | tuple = "batch",
        act_name: str | tuple = "relu",
        input_norm: bool = True,
        upsample_mode: str = "nontrainable",
        dropout: float = 0.0,
        feature_index: int = -1,
        num_prefix_tokens: int | None = None,
    ) -> None:
        _check_spatial_dims(spatial_dims)
        patch = _as_int_tuple(patch_size, spatial_dims, "patch_size")
        if len(set(patch)) != 1:
            raise ConfigError(f"SETRPUPHead needs an isotropic patch size, got {patch}; use ProgressiveUpsamplingHead.")
        stages = _log2(patch[0], "SETRPUPHead patch_size")
        super().__init__(
            spatial_dims,
            in_channels,
            out_channels,
            patch_size=patch,
            channels=(channels,) * stages,
            kernel_size=kernel_size,
            norm_name=norm_name,
            act_name=act_name,
            input_norm=input_norm,
            upsample_mode=upsample_mode,
            dropout=dropout,
            feature_index=feature_index,
            num_prefix_tokens=num_prefix_tokens,
        )


class HierarchicalDecoderHead(nn.Module):
    """U-Net-like decoder over multi-scale feature maps (Swin, SwinUNETR ``swinViT``, TinyViT ...).

    ``features[i]`` is ``(B, feature_channels[i], *S / feature_strides[i])`` with strides
    non-decreasing (resolution decreasing) and each stride a multiple of the previous one; equal
    strides (TinyViT's last stages) are allowed. Each feature goes through a ``UnetrBasicBlock`` to
    ``decoder_channels[i]``; starting from the coarsest, ``UnetrUpBlock`` modules upsample by the stride
    ratio (transposed conv), concatenate the next finer feature and convolve. If the finest feature
    is below input resolution, a last ``UnetrUpBlock`` goes to full resolution, merging a
    ``UnetrBasicBlock`` of the image when ``image_channels`` is set (as SwinUNETR does), else a
    transposed conv + conv block. A 1x1 ``UnetOutBlock`` gives the logits. With the five
    ``swinViT`` maps (strides 2..32, channels ``fs * (1, 2, 4, 8, 16)``) and ``image_channels`` set,
    this is the SwinUNETR decoder (Hatamizadeh et al., "Swin UNETR", BrainLes 2021); SwinUNETR feeds
    its stride-16 map to the decoder without a conv block, which ``skip_conv`` reproduces.

    Args:
        spatial_dims: 2 or 3.
        feature_channels: channels of each input map, finest first.
        feature_strides: stride of each map relative to the input (int or per-dimension).
        out_channels: number of classes.
        decoder_channels: decoder width at each level (default ``feature_channels``).
        image_channels: input-image channels for a full-resolution skip, or ``None``.
        image_feature_channels: width at full resolution (default ``decoder_channels[0]``).
        norm_name: MONAI norm spec (``"instance"`` as SwinUNETR).
        res_block: residual conv blocks.
        skip_conv: per feature (or for all), whether it goes through a ``UnetrBasicBlock`` before
            entering the decoder; where False, ``decoder_channels[i]`` must equal ``feature_channels[i]``.
            ``(True, True, True, False, True)`` with ``image_channels`` set reproduces SwinUNETR exactly.
        dropout: channel dropout (Dropout2d/3d) before the final 1x1 convolution.

    Shapes:
        ``forward(features, image=None)`` -> ``(B, out_channels, *S)`` where
        ``S = features[0].shape[2:] * feature_strides[0]`` (the image size when given).
    """

    def __init__(
        self,
        spatial_dims: int,
        feature_channels: Sequence[int],
        feature_strides: Sequence[int | Sequence[int]],
        out_channels: int,
        decoder_channels: Sequence[int] | None = None,
        image_channels: int | None = None,
        image_feature_channels: int | None = None,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
        skip_conv: bool | Sequence[bool] = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in feature_channels)
        if not channels:
            raise ConfigError("feature_channels must list at least one feature map.")
        if len(feature_strides) != len(channels):
            raise ConfigError(
                f"feature_strides has {len(feature_strides)} entries but feature_channels has {len(channels)}."
            )
        strides = tuple(_as_int_tuple(s, spatial_dims, f"feature_strides[{i}]") for i, s in enumerate(feature_strides))
        for i in range(1, len(strides)):
            if any(b % a for a, b in zip(strides[i - 1], strides[i])):
                raise ConfigError(
                    f"feature_strides must be ordered finest first, each a multiple of the previous: "
                    f"{strides[i]} (feature {i}) is not a multiple of {strides[i - 1]} (feature {i - 1})."
                )
        dec = channels if decoder_channels is None else tuple(int(c) for c in decoder_channels)
        if len(dec) != len(channels):
            raise ConfigError(f"decoder_channels has {len(dec)} entries, expected {len(channels)} (one per feature).")
        if any(c < 1 for c in channels + dec) or out_channels < 1:
            raise ConfigError("channel counts must be >= 1.")
        top = image_feature_channels or dec[0]
        if image_channels is not None and all(s == 1 for s in strides[0]):
            raise ConfigError(
                "image_channels is set but the finest feature is already at input resolution (stride 1): "
                "there is no upsampling stage to merge the image into; use image_channels=None."
            )
        self.spatial_dims = spatial_dims
        self.feature_channels = channels
        self.feature_strides = strides
        self.out_channels = out_channels
        self.image_channels = image_channels
        self.num_features = len(channels)

        def basic(cin: int, cout: int) -> nn.Module:
            return UnetrBasicBlock(
                spatial_dims, cin, cout, kernel_size=3, stride=1, norm_name=norm_name, res_block=res_block
            )

        convs = (skip_conv,) * len(channels) if isinstance(skip_conv, bool) else tuple(bool(c) for c in skip_conv)
        if len(convs) != len(channels):
            raise ConfigError(f"skip_conv has {len(convs)} entries, expected {len(channels)} (one per feature).")
        for i, (use, c, d) in enumerate(zip(convs, channels, dec)):
            if not use and c != d:
                raise ConfigError(
                    f"skip_conv[{i}] is False, so feature {i} enters the decoder as is: decoder_channels[{i}] must equal "
                    f"feature_channels[{i}] ({c}), got {d}."
                )
        self.skip_blocks = nn.ModuleList(
            basic(c, d) if use else nn.Identity() for use, c, d in zip(convs, channels, dec)
        )
        up = []
        for i in range(len(channels) - 2, -1, -1):
            ratio = tuple(b // a for a, b in zip(strides[i], strides[i + 1]))
            up.append(
                UnetrUpBlock(
                    spatial_dims,
                    dec[i + 1],
                    dec[i],
                    kernel_size=3,
                    upsample_kernel_size=ratio,
                    norm_name=norm_name,
                    res_block=res_block,
                )
            )
        self.up_blocks = nn.ModuleList(up)
        self.image_block: nn.Module | None = None
        self.final_up: nn.Module | None = None
        width = dec[0]
        if any(s > 1 for s in strides[0]):
            if image_channels is not None:
                self.image_block = basic(image_channels, top)
                self.final_up = UnetrUpBlock(
                    spatial_dims,
                    dec[0],
                    top,
                    kernel_size=3,
                    upsample_kernel_size=strides[0],
                    norm_name=norm_name,
                    res_block=res_block,
                )
            else:
                self.final_up = nn.Sequential(
                    get_conv_layer(
                        spatial_dims,
                        dec[0],
                        top,
                        kernel_size=strides[0],
                        stride=strides[0],
                        conv_only=True,
                        is_transposed=True,
                    ),
                    basic(top, top),
                )
            width = top
        self.dropout = _channel_dropout(spatial_dims, dropout)
        self.out = UnetOutBlock(spatial_dims=spatial_dims, in_channels=width, out_channels=out_channels)

    def _check(self, feats: list[torch.Tensor], image: torch.Tensor | None) -> None:
        name = type(self).__name__
        if len(feats) != self.num_features:
            raise InputDataError(
                f"{name} was built for {self.num_features} feature maps (strides {self.feature_strides}), got "
                f"{len(feats)}: mismatched number of skips."
            )
        for i, (f, c) in enumerate(zip(feats, self.feature_channels)):
            if f.ndim != self.spatial_dims + 2 or f.shape[1] != c:
                raise InputDataError(
                    f"{name}: feature {i} must be a map (B, {c}, *{self.spatial_dims} spatial dims), got {tuple(f.shape)}"
                    + ("; convert tokens with tokens_to_map first." if f.ndim == 3 else ".")
                )
        if image is not None:
            _check_image(image, self.spatial_dims, self.image_channels, name)
            size = tuple(image.shape[2:])
            coarsest = self.feature_strides[-1]
            if any(s % c for s, c in zip(size, coarsest)):
                raise InputDataError(
                    f"image spatial size {size} is not divisible by the encoder's total stride {coarsest}; pad or resize "
                    f"the input (e.g. monai.transforms.DivisiblePad(k={coarsest}))."
                )
            for i, (f, st) in enumerate(zip(feats, self.feature_strides)):
                want = tuple(s // t for s, t in zip(size, st))
                if tuple(f.shape[2:]) != want:
                    raise InputDataError(
                        f"{name}: feature {i} has spatial size {tuple(f.shape[2:])}, expected image size {size} // "
                        f"stride {st} = {want}."
                    )
        else:
            if self.image_channels is not None:
                raise InputDataError(
                    f"{name}(image_channels={self.image_channels}) needs the input image: call head(features, image)."
                )
            for i in range(1, len(feats)):
                ratio = tuple(b // a for a, b in zip(self.feature_strides[i - 1], self.feature_strides[i]))
                want = tuple(s // r for s, r in zip(feats[i - 1].shape[2:], ratio))
                if tuple(feats[i].shape[2:]) != want:
                    raise InputDataError(
                        f"{name}: feature {i} has spatial size {tuple(feats[i].shape[2:])}, expected {want} from feature "
                        f"{i - 1} and the stride ratio {ratio}."
                    )

    def forward(self, features: Sequence[torch.Tensor], image: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, out_channels, *S)``; see the class docstring for the shapes."""
        feats = _feature_list(features, type(self).__name__)
        self._check(feats, image)
        skips = [blk(f) for blk, f in zip(self.skip_blocks, feats)]
        x = skips[-1]
        for i, block in zip(range(len(skips) - 2, -1, -1), self.up_blocks):
            x = block(x, skips[i])
        if self.image_block is not None:
            x = self.final_up(x, self.image_block(image))
        elif self.final_up is not None:
            x = self.final_up(x)
        return self.out(self.dropout(x))


class SegmentationModel(nn.Module):
    """Encoder + segmentation head as one module: ``decoder(encoder(x), x)``.

    The encoder is registered as ``encoder`` and the head as ``decoder`` (``head`` is an alias
    property, not a second registration), so PEFT can freeze ``encoder.*`` and train ``decoder.*``
    by name; the state dict holds ``encoder.backbone.*`` (for the feature extractors) and
    ``decoder.*``.

    Args:
        encoder: module or callable mapping an image ``(B, C_in, *S)`` to a list of features, e.g.
            :class:`~monai_peft.networks.heads.extractors.MonaiViTFeatures`. A plain callable is
            wrapped in a parameter-free module.
        decoder: a head whose ``forward(features, image)`` returns ``(B, out_channels, *S)``.
        pass_image: pass the input image as the decoder's second argument (all heads here accept it;
            set False for a custom decoder taking only the features).
        check_output_size: raise :class:`~monai_peft.errors.InputDataError` if the logits do not have
            the input's spatial size.

    Shapes:
        ``(B, C_in, *S)`` -> ``(B, out_channels, *S)``.
    """

    def __init__(
        self,
        encoder: nn.Module | Callable[[torch.Tensor], object],
        decoder: nn.Module,
        pass_image: bool = True,
        check_output_size: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = as_encoder_module(encoder)
        self.decoder = decoder
        self.pass_image = pass_image
        self.check_output_size = check_output_size

    @property
    def head(self) -> nn.Module:
        """The decoder (alias)."""
        return self.decoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at the input resolution."""
        features = self.encoder(x)
        logits = self.decoder(features, x) if self.pass_image else self.decoder(features)
        if self.check_output_size and tuple(logits.shape[2:]) != tuple(x.shape[2:]):
            raise InputDataError(
                f"the decoder returned logits of spatial size {tuple(logits.shape[2:])} for an input of "
                f"{tuple(x.shape[2:])}; the head's patch size / strides do not match the encoder."
            )
        return logits
