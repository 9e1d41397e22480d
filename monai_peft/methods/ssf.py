"""SSF: scaling and shifting features (Lian et al., NeurIPS 2022).

After an operation with output ``y`` (channels on axis ``d``)::

    y' = gamma * y + beta          gamma, beta in R^C,  gamma ~ N(1, init_std), beta ~ N(0, init_std)

placed after every operation of the backbone (qkv, attention projection, MLP linears, LayerNorms,
patch embedding on ViTs; convolutions and normalisation layers on CNNs). Because ``y`` is an
affine function of the layer's own weight and bias, SSF re-parameterises exactly into it::

    W' = diag(gamma) W,   b' = gamma * b + beta

for Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d (any groups) and affine-capable norms
(LayerNorm, BatchNorm, GroupNorm, InstanceNorm); a missing bias (e.g. MONAI's ``qkv`` with
``qkv_bias=False``) is created on merge and removed again on unmerge. ``init_std=0`` makes a
fresh SSF an identity.

Placement on CNNs. The network presets place SSF after every convolution *and* every norm (106 K
on ResNet-50, where a conv -> BN pair gets two SSFs). An SSF directly before a normalisation layer
adds nothing the norm's own per-channel affine (and the SSF after it) cannot express, and in
training mode with batch statistics BatchNorm cancels it exactly. ``skip_before_norm=True`` leaves
out every Linear / convolution whose output goes straight into a norm of the same width (the next
sibling module in registration order, which for ``nn.Sequential`` parents and MONAI's ResNet /
DenseNet / EfficientNet blocks is the execution order): one SSF per conv -> BN pair, after the norm.
This is the placement that reproduces Dutt et al.'s SSF budget on ResNet-50 (the ``"dutt2023"``
preset); on ViTs nothing is skipped (no Linear feeds a LayerNorm directly).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.config import PeftConfig
from monai_peft.errors import InputDataError
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.methods.layout import channel_dim_of, feature_layout
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = ["SSFAdapter", "SSFConfig", "SSFLayer", "feeding_norm"]

_CONVT = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORMS = (nn.LayerNorm, _BatchNorm, nn.GroupNorm, _InstanceNorm)


@dataclass
class SSFConfig(PeftConfig):
    """Configuration of SSF.

    Args:
        init_std: std of the N(1, .) scale and N(0, .) shift init (paper 0.02; 0 = identity).
        skip_before_norm: leave out Linear / conv layers whose output feeds a normalisation layer of the same
            width directly (conv -> BN pairs get one SSF, after the norm; see the module docstring). Default
            False: after every selected op.
    """

    init_std: float = 0.02
    skip_before_norm: bool = False

    def validate(self) -> None:
        self._require(self.init_std >= 0, f"init_std must be >= 0, got {self.init_std}")


class SSFAdapter(nn.Module):
    """Per-channel ``scale`` and ``shift``. Input (..., C) or (B, C, *spatial) per ``channel_dim``."""

    def __init__(self, channels: int, channel_dim: int, init_std: float) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, std=init_std)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        c = self.scale.numel()
        if y.dim() < 2 or y.shape[self.channel_dim] != c:
            raise InputDataError(f"SSF expects {c} channels on axis {self.channel_dim}, got {tuple(y.shape)}")
        if self.channel_dim == -1:
            return y * self.scale + self.shift
        shape = [1, c] + [1] * (y.dim() - 2)
        return y * self.scale.view(shape) + self.shift.view(shape)


def _output_channel_index(module: nn.Module) -> tuple[int, torch.Tensor | None]:
    """(weight axis holding output channels, index map) for folding a per-output-channel scale."""
    if isinstance(module, _CONVT) and module.groups > 1:
        g = module.groups
        cin, cout_g = module.weight.shape[0], module.weight.shape[1]
        rows = torch.arange(cin) // (cin // g)
        return -1, rows[:, None] * cout_g + torch.arange(cout_g)[None, :]
    if isinstance(module, _CONVT):
        return 1, None
    return 0, None


class SSFLayer(AdapterLayer):
    """``y = SSF(base(x))``; mergeable into the wrapped Linear / conv / norm."""

    mergeable = True
    method_name = "ssf"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self._created_bias = False
        self._created_weight = False

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(*args, **kwargs)
        adapter = self.active()
        return out if adapter is None else adapter(out)

    def _scale_of(self, module: nn.Module, gamma: torch.Tensor) -> torch.Tensor:
        """gamma broadcast to the weight's shape."""
        w = module.weight
        axis, index = _output_channel_index(module)
        if index is not None:
            return gamma[index.to(gamma.device)].view(*index.shape, *([1] * (w.dim() - 2)))
        shape = [1] * w.dim()
        shape[axis] = -1
        return gamma.view(shape)

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        gamma, beta = adapter.scale.detach(), adapter.shift.detach()
        with torch.no_grad():
            if getattr(base, "weight", None) is None:  # non-affine norm
                base.weight = nn.Parameter(torch.ones_like(gamma), requires_grad=False)
                base.bias = nn.Parameter(torch.zeros_like(beta), requires_grad=False)
                self._created_weight = True
            elif getattr(base, "bias", None) is None:
                base.bias = nn.Parameter(torch.zeros_like(beta), requires_grad=False)
                self._created_bias = True
            base.weight.mul_(self._scale_of(base, gamma).to(base.weight.dtype))
            base.bias.mul_(gamma).add_(beta)
            if isinstance(base, _NORMS) and hasattr(base, "affine"):
                base.affine = True
            if isinstance(base, nn.LayerNorm):
                base.elementwise_affine = True

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        gamma, beta = adapter.scale.detach(), adapter.shift.detach()
        with torch.no_grad():
            if self._created_weight:
                base.weight = None
                base.bias = None
                if hasattr(base, "affine"):
                    base.affine = False
                if isinstance(base, nn.LayerNorm):
                    base.elementwise_affine = False
                self._created_weight = False
                return
            base.weight.div_(self._scale_of(base, gamma).to(base.weight.dtype))
            if self._created_bias:
                base.bias = None
                self._created_bias = False
            else:
                base.bias.sub_(beta).div_(gamma)


class SSFTuner(WrappingTuner):
    """SSF after Linear / convolution / normalisation layers (preset: every op of the backbone)."""

    config_cls = SSFConfig
    default_roles = ("ssf",)
    applies_to = "nn.Linear, convolutions (incl. transposed) and LayerNorm/BatchNorm/GroupNorm/InstanceNorm"
    config: SSFConfig

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, (nn.Linear, *_CONV, *_CONVT, *_NORMS)):
            return SSFLayer
        return None

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        return SSFAdapter(feature_layout(module).out_channels, channel_dim_of(module), self.config.init_std)

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        names = super().resolve(model, *default_roles)
        if not self.config.skip_before_norm:
            return names
        return [n for n in names if feeding_norm(model, n) is None]


def _width(norm: nn.Module) -> int | None:
    if isinstance(norm, nn.LayerNorm):
        return int(norm.normalized_shape[-1])
    if isinstance(norm, (_BatchNorm, _InstanceNorm)):
        return int(norm.num_features)
    if isinstance(norm, nn.GroupNorm):
        return int(norm.num_channels)
    return None


def feeding_norm(model: nn.Module, name: str) -> str | None:
    """Canonical name of the normalisation layer that the Linear / conv at ``name`` feeds directly, or None.

    "Directly" = the next sibling in the parent's registration order is a norm whose width equals the layer's
    output channels (exact for ``nn.Sequential`` parents; the convention of MONAI's CNN blocks otherwise).
    """
    module = innermost(get_submodule(model, name))
    if not isinstance(module, (nn.Linear, *_CONV, *_CONVT)):
        return None
    parent_name, _, child = name.rpartition(".")
    parent = innermost(get_submodule(model, parent_name)) if parent_name else innermost(model)
    children = [n for n, _ in parent.named_children()]
    if child not in children or children.index(child) + 1 >= len(children):
        return None
    nxt_name = children[children.index(child) + 1]
    nxt = innermost(getattr(parent, nxt_name))
    if _width(nxt) != feature_layout(module).out_channels:
        return None
    return f"{parent_name}.{nxt_name}" if parent_name else nxt_name


register_method("ssf", SSFConfig, SSFTuner)
