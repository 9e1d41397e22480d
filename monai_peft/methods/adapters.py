"""Bottleneck adapters: Houlsby (sequential) and AdaptFormer (parallel, scaled).

Houlsby et al., ICML 2019 ("Parameter-Efficient Transfer Learning for NLP"), sequential::

    a(h) = h + W_up f(W_down h)                 W_down: C -> m, W_up: m -> C

inserted after the attention output projection and after the MLP of every transformer block
(before the residual add), i.e. wrapping ``attn`` and ``mlp``; on CNN presets after every
residual block (the "standard adapter" of the DKA repository's ResNet baseline, as a 1x1
bottleneck). ``W_down`` starts near zero (N(0, init_std)), ``W_up`` at zero, so a fresh adapter
is an identity.

AdaptFormer (Chen et al., NeurIPS 2022), parallel to the MLP::

    x_final = MLP(LN2 x) + s * W_up Dropout(ReLU(W_down LN2 x)) + x

implemented by wrapping the MLP module: its input already is ``LN2 x`` (Dutt et al.'s Eq. 3
writes the LayerNorm inside the adapter branch; sharing the block's LN2 is the original
AdaptFormer code's ``adapter_layernorm_option="none"`` default). Bottleneck 64, s = 0.1,
dropout 0.1; ``W_down`` kaiming-uniform, ``W_up`` and biases zero.

Both act on the channel axis: the last one for tokens ``(B, N, C)``, axis 1 for CNN maps
``(B, C, *spatial)`` (a 1x1 convolution there), so they work in 2D and 3D.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import InputDataError
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.methods.layout import feature_layout
from monai_peft.registry import register_method

__all__ = [
    "AdaptFormerConfig",
    "AdapterConfig",
    "BottleneckAdapter",
    "ParallelAdapterLayer",
    "SequentialAdapterLayer",
]

_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh, "quick_gelu": None}


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (CLIP / Convpass)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    if name == "quick_gelu":
        return QuickGELU()
    return _ACTIVATIONS[name]()


class BottleneckAdapter(nn.Module):
    """``scale * W_up Dropout(act(W_down x))`` on the channel axis (no residual).

    Args:
        in_channels: C_in of the input; out_channels: C_out of the result.
        bottleneck: m.
        channel_dim: -1 (tokens / channel-last) or 1 (channel-first maps, any spatial rank).
        down_init: ``"normal"`` (N(0, init_std), Houlsby) or ``"kaiming"`` (AdaptFormer).
        scale: fixed output scale s, or learnable when ``learnable_scale``.

    Shapes: x (B, N, C_in) or (B, C_in, *spatial) -> same layout with C_out channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        bottleneck: int,
        *,
        activation: str = "gelu",
        dropout: float = 0.0,
        channel_dim: int = -1,
        bias: bool = True,
        down_init: str = "normal",
        init_std: float = 1e-2,
        scale: float = 1.0,
        learnable_scale: bool = False,
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        self.channel_dim = channel_dim
        self.in_channels = in_channels
        self.norm = nn.LayerNorm(in_channels) if layer_norm else nn.Identity()
        self.down = nn.Linear(in_channels, bottleneck, bias=bias)
        self.act = make_activation(activation)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(bottleneck, out_channels, bias=bias)
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        if down_init == "kaiming":
            nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        else:
            nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[self.channel_dim] != self.in_channels:
            raise InputDataError(
                f"adapter expects {self.in_channels} channels on axis {self.channel_dim}, got input of shape "
                f"{tuple(x.shape)}; set channel layout explicitly or target another module"
            )
        z = x if self.channel_dim == -1 else x.movedim(self.channel_dim, -1)
        z = self.up(self.dropout(self.act(self.down(self.norm(z))))) * self.scale
        return z if self.channel_dim == -1 else z.movedim(-1, self.channel_dim)


class SequentialAdapterLayer(AdapterLayer):
    """``y = base(x); y + adapter(y)`` (Houlsby placement: after the wrapped module)."""

    method_name = "adapter"

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base_layer(*args, **kwargs)
        adapter = self.active()
        if adapter is None:
            return out
        if isinstance(out, tuple):  # modules returning (features, extras)
            return (out[0] + adapter(out[0]), *out[1:])
        return out + adapter(out)


class ParallelAdapterLayer(AdapterLayer):
    """``y = base(x) + adapter(x)`` (AdaptFormer placement: beside the wrapped module)."""

    method_name = "adaptformer"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        adapter = self.active()
        if adapter is None:
            return out
        return out + adapter(x)


@dataclass
class AdapterConfig(PeftConfig):
    """Houlsby bottleneck adapter (sequential).

    Args:
        bottleneck: width m of the bottleneck; or set ``reduction_factor`` (m = C // factor).
        reduction_factor: alternative to ``bottleneck`` (used when not None).
        activation: ``"gelu"``, ``"relu"``, ``"silu"``, ``"tanh"`` or ``"quick_gelu"``.
        dropout: dropout inside the bottleneck.
        bias: biases in the two projections (False = the DKA repository's "standard adapter").
        init_std: std of the near-zero ``W_down`` init; ``W_up`` starts at zero (identity).
    """

    bottleneck: int = 64
    reduction_factor: float | None = None
    activation: str = "gelu"
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 1e-2

    def validate(self) -> None:
        self._require(isinstance(self.bottleneck, int) and self.bottleneck > 0, f"bottleneck must be a positive int, got {self.bottleneck!r}")
        self._require(self.reduction_factor is None or self.reduction_factor > 0, "reduction_factor must be > 0")
        self._require(self.activation in _ACTIVATIONS, f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        self._require(self.init_std >= 0, "init_std must be >= 0")

    def width(self, channels: int) -> int:
        if self.reduction_factor is not None:
            return max(1, int(channels // self.reduction_factor))
        return self.bottleneck


class AdapterTuner(WrappingTuner):
    """Houlsby adapters after attention and MLP sub-layers (transformers) or blocks (CNNs)."""

    config_cls = AdapterConfig
    default_roles = ("sublayers", "blocks")
    applies_to = "any module whose output is a token sequence or a channel-first feature map"
    config: AdapterConfig

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return SequentialAdapterLayer

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        layout = feature_layout(module)
        c = layout.out_channels
        cfg = self.config
        return BottleneckAdapter(
            c, c, cfg.width(c), activation=cfg.activation, dropout=cfg.dropout, channel_dim=layout.channel_dim,
            bias=cfg.bias, down_init="normal", init_std=cfg.init_std,
        )


@dataclass
class AdaptFormerConfig(PeftConfig):
    """AdaptFormer parallel adapter beside the MLP.

    Args:
        bottleneck: width m (paper: 64).
        scale: output scale s (paper: 0.1); ``learnable_scale`` makes it a parameter.
        dropout: dropout after the activation (paper: 0.1).
        activation: paper: ReLU.
        layer_norm: an extra LayerNorm at the adapter input (Dutt et al.'s Eq. 3 variant).
    """

    bottleneck: int = 64
    scale: float = 0.1
    learnable_scale: bool = False
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm: bool = False

    def validate(self) -> None:
        self._require(isinstance(self.bottleneck, int) and self.bottleneck > 0, f"bottleneck must be a positive int, got {self.bottleneck!r}")
        self._require(self.activation in _ACTIVATIONS, f"activation must be one of {sorted(_ACTIVATIONS)}")
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")


class AdaptFormerTuner(WrappingTuner):
    """AdaptFormer adapters in parallel with every transformer MLP."""

    config_cls = AdaptFormerConfig
    default_roles = ("mlp",)
    applies_to = "transformer MLP blocks (any module whose input and output carry channels on the same axis)"
    config: AdaptFormerConfig

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return ParallelAdapterLayer

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        layout = feature_layout(module)
        cfg = self.config
        return BottleneckAdapter(
            layout.in_channels, layout.out_channels, cfg.bottleneck, activation=cfg.activation, dropout=cfg.dropout,
            channel_dim=layout.channel_dim, bias=True, down_init="kaiming", scale=cfg.scale,
            learnable_scale=cfg.learnable_scale, layer_norm=cfg.layer_norm,
        )


register_method("adapter", AdapterConfig, AdapterTuner)
register_method("adaptformer", AdaptFormerConfig, AdaptFormerTuner)
