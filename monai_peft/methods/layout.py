"""Channel count and channel axis of a module's input and output.

Adapters placed after (or beside) a module need to know how many channels its output has and
where they are: the last axis for token sequences ``(B, N, C)`` and channel-last maps (Swin
blocks), axis 1 for channel-first feature maps ``(B, C, *spatial)`` (CNNs, MONAI convention).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.errors import TargetingError

__all__ = ["FeatureLayout", "feature_layout", "channel_dim_of"]

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CHANNEL_FIRST_NORMS = (_BatchNorm, nn.GroupNorm, _InstanceNorm)


@dataclass(frozen=True)
class FeatureLayout:
    """``in_channels``/``out_channels`` of a module and the axis that holds them (-1 or 1)."""

    in_channels: int
    out_channels: int
    channel_dim: int


def _leaf_layout(m: nn.Module) -> FeatureLayout | None:
    if isinstance(m, nn.Linear):
        return FeatureLayout(m.in_features, m.out_features, -1)
    if isinstance(m, nn.LayerNorm):
        c = int(m.normalized_shape[-1])
        return FeatureLayout(c, c, -1)
    if isinstance(m, _CONVS):
        return FeatureLayout(m.in_channels, m.out_channels, 1)
    if isinstance(m, _BatchNorm | _InstanceNorm):
        return FeatureLayout(m.num_features, m.num_features, 1)
    if isinstance(m, nn.GroupNorm):
        return FeatureLayout(m.num_channels, m.num_channels, 1)
    return None


def channel_dim_of(module: nn.Module) -> int:
    """-1 for Linear/LayerNorm outputs, 1 for convolution/BatchNorm/GroupNorm/InstanceNorm."""
    layout = _leaf_layout(module)
    if layout is None:
        raise TargetingError(
            f"cannot tell the channel axis of {type(module).__name__}; target Linear, conv or norm layers"
        )
    return layout.channel_dim


def feature_layout(module: nn.Module) -> FeatureLayout:
    """Infer the layout of a leaf layer or a block.

    Rules, in order: leaf layers (Linear, conv, norms); attention modules with an ``out_proj`` or
    ``proj`` Linear (their output projection); MONAI DenseNet dense layers (input concatenated
    with the new features); otherwise the first and the last Linear/conv/norm layer registered in
    the block. Adapters check the runtime shape and raise if the inference was wrong.
    """
    leaf = _leaf_layout(module)
    if leaf is not None:
        return leaf
    layers = [m for m in module.modules() if _leaf_layout(m) is not None]
    if not layers:
        raise TargetingError(
            f"cannot infer the channel count of {type(module).__name__}: it holds no Linear, convolution or "
            "normalisation layer; target a module that does"
        )
    first = _leaf_layout(layers[0])
    assert first is not None
    for attr in ("out_proj", "proj"):
        proj = getattr(module, attr, None)
        if isinstance(proj, nn.Linear):
            qkv = getattr(module, "qkv", None)
            in_c = qkv.in_features if isinstance(qkv, nn.Linear) else proj.out_features
            return FeatureLayout(in_c, proj.out_features, -1)
    if type(module).__name__ == "_DenseLayer":
        norm1 = next(m for m in module.modules() if isinstance(m, _CHANNEL_FIRST_NORMS))
        convs = [m for m in module.modules() if isinstance(m, _CONVS)]
        c_in = int(norm1.num_features)
        return FeatureLayout(c_in, c_in + int(convs[-1].out_channels), 1)
    last = _leaf_layout(layers[-1])
    assert last is not None
    return FeatureLayout(first.in_channels, last.out_channels, last.channel_dim)
