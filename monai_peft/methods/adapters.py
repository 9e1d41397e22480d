"""Bottleneck adapters: Houlsby (sequential) and AdaptFormer (parallel, scaled).

Houlsby et al., ICML 2019 ("Parameter-Efficient Transfer Learning for NLP"), sequential::

    a(h) = h + W_up f(W_down h)                 W_down: C -> m, W_up: m -> C

inserted after the attention output projection and after the MLP of every transformer block
(before the residual add), i.e. wrapping ``attn`` and ``mlp``; on CNN presets after every
residual block (the "standard adapter" of the DKA repository's ResNet baseline, as a 1x1
bottleneck). ``W_down`` starts near zero (N(0, init_std)), ``W_up`` at zero, so a fresh adapter
is an exact identity (Houlsby draw both projections from N(0, 1e-2): near-identity).
The original also trains every LayerNorm of the network: ``tune_layernorm=True`` (off by default,
so that the default budget is the adapters alone; the ``"houlsby2019"`` preset turns it on).

AdaptFormer (Chen et al., NeurIPS 2022), parallel to the MLP of a pre-norm block
``x <- x + MLP(LN2 x)``::

    x <- x + MLP(LN2 x) + s * W_up Dropout(ReLU(W_down x))          (input="block", default)

The branch reads the block's *pre-norm* stream ``x`` (the input of ``LN2``), as the reference
implementation does (its ``Block.forward`` calls ``adaptmlp(x)`` before ``mlp(norm2(x))``, with
``adapter_layernorm_option="none"``) and as METHODS.md writes ``Down(x)``. ``input="normed"`` keeps
the other variant, ``s * W_up(...(W_down LN2 x))``: the branch shares the MLP's normalised input,
which is how Dutt et al.'s Eq. 3 writes it (``ReLU(LN(x) W_down) W_up`` with the same ``LN``).
``layer_norm=True`` adds a LayerNorm of the adapter's own at the branch input (the reference code's
``adapter_layernorm_option="in"``). Bottleneck 64, s = 0.1, dropout 0.1; ``W_down``
kaiming-uniform, ``W_up`` and biases zero, so a fresh AdaptFormer is an identity.

With ``input="block"`` the MLP is wrapped by :class:`ParallelAdapterLayer` and the norm before it
(``norm_name``, default ``"norm2"``, a sibling of the MLP in its block) by :class:`BlockInputTap`,
which hands its input to the MLP's layer during the forward pass. MLPs that start with their own
LayerNorm (TinyViT's ``Mlp``: ``x + MLP(x)``) already receive the pre-norm stream and need no tap.

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
from monai_peft.errors import InputDataError, MethodNotApplicableError
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.methods.layout import feature_layout
from monai_peft.registry import register_method
from monai_peft.targeting import canonical_named_modules, get_submodule, innermost, set_submodule

__all__ = [
    "ADAPTFORMER_INPUTS",
    "AdaptFormerAdapter",
    "AdaptFormerConfig",
    "AdapterConfig",
    "BlockInputTap",
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


#: ``AdaptFormerConfig.input`` choices: the block's pre-norm stream (reference code) or the MLP's normalised input.
ADAPTFORMER_INPUTS = ("block", "normed")


class AdaptFormerAdapter(BottleneckAdapter):
    """A :class:`BottleneckAdapter` that also says what it reads (a plain attribute, not saved):
    ``reads="tap"`` the block input recorded by a :class:`BlockInputTap`, ``"input"`` the wrapped MLP's input."""

    reads: str = "input"


class _BlockInput:
    """The pre-norm tensor of one block, handed from its :class:`BlockInputTap` to its MLP's layer (not a module)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None


class _TapMarker(nn.Module):
    """Parameter-free stand-in that tells a :class:`BlockInputTap` which adapters read the block input."""


class BlockInputTap(AdapterLayer):
    """Wraps the norm before a transformer MLP (``LN2``); records its input ``x`` (the block's pre-norm stream,
    shape ``(B, N, C)`` or ``(B, *spatial, C)``) for the MLP's :class:`ParallelAdapterLayer`; output unchanged."""

    method_name = "adaptformer"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.block_input = _BlockInput()

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.active() is not None:
            self.block_input.value = x
        return self.base_layer(x, *args, **kwargs)


class ParallelAdapterLayer(AdapterLayer):
    """``y = base(x) + adapter(x)`` (AdaptFormer placement: beside the wrapped module).

    An :class:`AdaptFormerAdapter` with ``reads="tap"`` reads the block input recorded by the
    :class:`BlockInputTap` on the norm before this module instead of ``x`` (``input="block"``).
    """

    method_name = "adaptformer"

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.block_input: _BlockInput | None = None

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        adapter = self.active()
        if adapter is None:
            return out
        source = x
        if getattr(adapter, "reads", "input") == "tap":
            slot = self.block_input
            source = slot.value if slot is not None else None
            if source is None:
                raise InputDataError(
                    "AdaptFormer (input='block') reads the input of the norm before this MLP, but that norm did not run "
                    "before the MLP in this forward pass; call the whole block, or use AdaptFormerConfig(input='normed')"
                )
            slot.value = None
            if source.shape != x.shape:
                raise InputDataError(
                    f"AdaptFormer block input {tuple(source.shape)} does not match the MLP input {tuple(x.shape)}: the "
                    "recorded norm is not the one before this MLP; set AdaptFormerConfig.norm_name"
                )
        return out + adapter(source)


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
        tune_layernorm: also train the weight and bias of every LayerNorm of the network, as the original
            Houlsby adapter does. Default False: only the adapters (and ``modules_to_save``) train; the
            ``"houlsby2019"`` preset sets it. BatchNorm/GroupNorm are never included (use ``norm_tuning``).
    """

    bottleneck: int = 64
    reduction_factor: float | None = None
    activation: str = "gelu"
    dropout: float = 0.0
    bias: bool = True
    init_std: float = 1e-2
    tune_layernorm: bool = False

    def validate(self) -> None:
        self._require(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"bottleneck must be a positive int, got {self.bottleneck!r}",
        )
        self._require(self.reduction_factor is None or self.reduction_factor > 0, "reduction_factor must be > 0")
        self._require(
            self.activation in _ACTIVATIONS,
            f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}",
        )
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

    def owned_tensors(self, model: nn.Module) -> list[str]:
        """The LayerNorm weights and biases when ``tune_layernorm`` (Houlsby et al. train them), else none."""
        if not self.config.tune_layernorm:
            return []
        from monai_peft.methods.selective import NormTuningConfig, NormTuningTuner

        try:
            return NormTuningTuner(NormTuningConfig(norm_types=["layernorm"])).owned_tensors(model)
        except MethodNotApplicableError as exc:
            raise MethodNotApplicableError(
                f"adapter with tune_layernorm=True: {type(innermost(model)).__name__} has no LayerNorm to tune; "
                "set tune_layernorm=False"
            ) from exc

    def check_applicable(self, model: nn.Module) -> None:
        super().check_applicable(model)
        self.owned_tensors(model)

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        layout = feature_layout(module)
        c = layout.out_channels
        cfg = self.config
        return BottleneckAdapter(
            c,
            c,
            cfg.width(c),
            activation=cfg.activation,
            dropout=cfg.dropout,
            channel_dim=layout.channel_dim,
            bias=cfg.bias,
            down_init="normal",
            init_std=cfg.init_std,
        )


@dataclass
class AdaptFormerConfig(PeftConfig):
    """AdaptFormer parallel adapter beside the MLP.

    Args:
        bottleneck: width m (paper: 64).
        scale: output scale s (paper: 0.1); ``learnable_scale`` makes it a parameter.
        dropout: dropout after the activation (paper: 0.1).
        activation: paper: ReLU.
        layer_norm: a LayerNorm of the adapter's own at the branch input (reference ``adapter_layernorm_option="in"``).
        input: what the branch reads: ``"block"`` (default, reference implementation) the block's pre-norm stream
            ``x``, i.e. the input of the norm before the MLP; ``"normed"`` the MLP's own input ``LN2(x)`` (Dutt et
            al.'s Eq. 3; the behaviour of monai_peft before 0.2).
        norm_name: with ``input="block"``, the attribute of the MLP's parent block that holds the norm before the
            MLP (``"norm2"`` in MONAI, timm and Swin blocks). MLPs that start with their own LayerNorm need none.
    """

    bottleneck: int = 64
    scale: float = 0.1
    learnable_scale: bool = False
    dropout: float = 0.1
    activation: str = "relu"
    layer_norm: bool = False
    input: str = "block"
    norm_name: str = "norm2"

    def validate(self) -> None:
        self._require(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"bottleneck must be a positive int, got {self.bottleneck!r}",
        )
        self._require(self.activation in _ACTIVATIONS, f"activation must be one of {sorted(_ACTIVATIONS)}")
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        self._require(
            self.input in ADAPTFORMER_INPUTS,
            f"input must be one of {ADAPTFORMER_INPUTS} ('block': the block's pre-norm x as the reference code, "
            f"'normed': the MLP's LN2(x)), got {self.input!r}",
        )
        self._require(isinstance(self.norm_name, str) and bool(self.norm_name), "norm_name must be a non-empty string")


def _starts_with_norm(mlp: nn.Module) -> bool:
    """Whether the MLP's first sub-module is a LayerNorm (TinyViT's ``Mlp``: its input is the pre-norm stream)."""
    first = next(iter(mlp.children()), None)
    return isinstance(first, nn.LayerNorm)


class AdaptFormerTuner(WrappingTuner):
    """AdaptFormer adapters in parallel with every transformer MLP."""

    config_cls = AdaptFormerConfig
    default_roles = ("mlp",)
    applies_to = "transformer MLP blocks (any module whose input and output carry channels on the same axis)"
    config: AdaptFormerConfig

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return ParallelAdapterLayer

    def _block_norm(self, model: nn.Module, name: str) -> str | None:
        """Canonical name of the norm before MLP ``name`` (None: the MLP starts with its own norm).

        Raises:
            MethodNotApplicableError: ``input="block"`` but neither exists.
        """
        parent, _, _ = name.rpartition(".")
        block = innermost(get_submodule(model, parent)) if parent else innermost(model)
        norm_attr = self.config.norm_name
        if norm_attr in dict(block.named_children()):
            return f"{parent}.{norm_attr}" if parent else norm_attr
        if _starts_with_norm(innermost(get_submodule(model, name))):
            return None
        raise MethodNotApplicableError(
            f"adaptformer input='block' reads the input of the norm before {name}, but its block "
            f"{type(block).__name__} has no child {norm_attr!r} and the MLP does not start with a LayerNorm; pass "
            "norm_name=<the block's pre-MLP norm> or input='normed' (the MLP's normalised input)"
        )

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        if self.config.input == "block":
            for name in names:
                self._block_norm(model, name)

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        super().inject(model, adapter_name)
        if self.config.input != "block":
            return
        for name, _ in list(canonical_named_modules(model)):
            layer = _layer_with(get_submodule(model, name) if name else model, ParallelAdapterLayer, adapter_name)
            if layer is None:
                continue
            adapter = layer.adapters[adapter_name]
            norm_name = self._block_norm(model, name)
            if norm_name is None:  # the MLP normalises itself: its input is the block's pre-norm stream
                adapter.reads = "input"
                continue
            tap = _layer_with(get_submodule(model, norm_name), BlockInputTap, None)
            if tap is None:
                tap = BlockInputTap(get_submodule(model, norm_name))
                set_submodule(model, norm_name, tap)
            tap.add_adapter(adapter_name, _TapMarker())
            layer.block_input = tap.block_input
            adapter.reads = "tap"

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        layout = feature_layout(module)
        cfg = self.config
        return AdaptFormerAdapter(
            layout.in_channels,
            layout.out_channels,
            cfg.bottleneck,
            activation=cfg.activation,
            dropout=cfg.dropout,
            channel_dim=layout.channel_dim,
            bias=True,
            down_init="kaiming",
            scale=cfg.scale,
            learnable_scale=cfg.learnable_scale,
            layer_norm=cfg.layer_norm,
        )


def _layer_with(module: nn.Module, cls: type[AdapterLayer], adapter_name: str | None) -> AdapterLayer | None:
    """The wrapper of type ``cls`` in the chain at ``module`` (holding ``adapter_name`` when given), or None."""
    while isinstance(module, AdapterLayer):
        if isinstance(module, cls) and (adapter_name is None or adapter_name in module.adapters):
            return module
        module = module.base_layer
    return None


register_method("adapter", AdapterConfig, AdapterTuner)
register_method("adaptformer", AdaptFormerConfig, AdaptFormerTuner)
