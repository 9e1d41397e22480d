"""Small helpers shared by the method modules: convolution types, running a convolution with another
weight, merging an additive weight delta, activations. One home for each, so the methods cannot drift apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.targeting import innermost

__all__ = [
    "ACTIVATIONS",
    "CHANNEL_FIRST_NORMS",
    "CONV",
    "CONVT",
    "CONV_BY_DIMS",
    "CONV_FN",
    "CONV_NAMES",
    "CONVT_FN",
    "MergeDeltaMixin",
    "NORMS",
    "QuickGELU",
    "conv_dims",
    "conv_forward_with",
    "make_activation",
]

#: Forward convolutions, 1D to 3D.
CONV: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Transposed convolutions, 1D to 3D.
CONVT: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Class names of all of them (for :class:`~monai_peft.targeting.TargetSpec` ``types``).
CONV_NAMES: tuple[str, ...] = tuple(c.__name__ for c in CONV + CONVT)
CONV_BY_DIMS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONVT_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
#: Normalisation layers whose channels are on axis 1.
CHANNEL_FIRST_NORMS: tuple[type[nn.Module], ...] = (_BatchNorm, nn.GroupNorm, _InstanceNorm)
#: Every normalisation layer with per-channel affine parameters.
NORMS: tuple[type[nn.Module], ...] = (nn.LayerNorm, *CHANNEL_FIRST_NORMS)


def conv_dims(module: nn.Module) -> int | None:
    """Spatial rank of a (transposed) convolution, else None."""
    for dims, cls in enumerate(CONV, start=1):
        if isinstance(module, cls):
            return dims
    for dims, cls in enumerate(CONVT, start=1):
        if isinstance(module, cls):
            return dims
    return None


def conv_forward_with(
    conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, output_size: Any = None
) -> torch.Tensor:
    """Run convolution module ``conv``'s operation with another ``weight``/``bias``.

    Keeps every hyper-parameter of ``conv`` (stride, padding, dilation, groups, padding_mode,
    output_padding / ``output_size`` for transposed convolutions).
    """
    if isinstance(conv, CONV):
        return conv._conv_forward(x, weight, bias)
    if isinstance(conv, CONVT):
        nd = conv_dims(conv)
        assert nd is not None
        output_padding = conv._output_padding(
            x, output_size, conv.stride, conv.padding, conv.kernel_size, nd, conv.dilation
        )
        return CONVT_FN[nd](x, weight, bias, conv.stride, conv.padding, output_padding, conv.groups, conv.dilation)
    raise TypeError(f"not a convolution: {type(conv).__name__}")


class MergeDeltaMixin:
    """For adapter layers whose adapter has ``delta_weight()``: merge = add it to the innermost base weight."""

    base_layer: nn.Module

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight += adapter.delta_weight().to(base.weight.dtype)

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight -= adapter.delta_weight().to(base.weight.dtype)


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)`` (CLIP / Convpass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


#: Activation names accepted by the method configs.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "quick_gelu": QuickGELU,
}


def make_activation(name: str) -> nn.Module:
    """A fresh activation module by name (see :data:`ACTIVATIONS`)."""
    return ACTIVATIONS[name]()
