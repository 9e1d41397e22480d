"""LoRA: low-rank weight updates (Hu et al., ICLR 2022).

Equation (for a layer with weight ``W0``)::

    h = W0 x + (alpha / r) * B A dropout(x)        A in R^{r x k} (kaiming-uniform), B in R^{d x r} (zeros)

so a fresh adapter is an identity, and merging sets ``W0 <- W0 + (alpha / r) B A``. With
``use_rslora=True`` the scale is ``alpha / sqrt(r)`` (Kalajdzievski 2023).

Supported layers:

- ``nn.Linear``;
- a fused ``qkv`` ``nn.Linear`` (MONAI ``SABlock.qkv``, Swin ``WindowAttention.qkv``, timm
  ``Attention.qkv``) with LoRA on chosen slices only (``qkv_slices="qv"``, MED-PEFT's
  ``enable_lora=[True, False, True]``); the output layout is ``[q | k | v]``;
- ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` with their stride, padding, dilation,
  groups, padding mode and output padding: the update is a low-rank factorisation of the weight
  tensor reshaped to ``(W.shape[0], prod(W.shape[1:]))`` and is applied by convolving with
  ``W0 + delta`` (one convolution; with dropout in training, a second convolution of the dropped
  input with ``delta``), which is exact for every convolution variant.

Default targets (``target_modules=None``): q and v of every attention block on transformer
presets (MED-PEFT / Hu et al.), every convolution of the backbone on CNN presets.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, TargetingError
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.registry import register_method
from monai_peft.targeting import get_preset, innermost

__all__ = ["LoraConfig", "LoraConv", "LoraFusedQKV", "LoraLinear", "LoraTuner", "qkv_rows", "register_qkv_layout"]

_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONVT_TYPES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


@dataclass
class LoraConfig(PeftConfig):
    """Configuration of LoRA.

    Args:
        r: rank of the update.
        alpha: scale numerator; the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)``
            with ``use_rslora``).
        dropout: dropout on the adapter's input (0 disables it).
        qkv_slices: for fused qkv Linear targets, which of ``"q"``, ``"k"``, ``"v"`` get an
            update (e.g. ``"qv"``). ``None``: the full layer, except that the network preset
            (``target_modules=None``) defaults to ``"qv"``.
        fused_qkv_names: last name component that marks a fused qkv Linear (out = 3 x in).
        use_rslora: rank-stabilised scaling ``alpha / sqrt(r)``.
        init_lora_weights: ``"kaiming"`` (A kaiming-uniform, a=sqrt(5), as loralib/peft) or
            ``"gaussian"`` (A ~ N(0, 1/r)); B is always zero.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    qkv_slices: str | None = None
    fused_qkv_names: list[str] = field(default_factory=lambda: ["qkv"])
    use_rslora: bool = False
    init_lora_weights: str = "kaiming"

    def validate(self) -> None:
        self._require(isinstance(self.r, int) and self.r > 0, f"r must be a positive integer, got {self.r!r}")
        self._require(self.alpha > 0, f"alpha must be > 0, got {self.alpha!r}")
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.qkv_slices is not None:
            s = self.qkv_slices
            self._require(
                isinstance(s, str) and 0 < len(s) <= 3 and set(s) <= set("qkv") and len(set(s)) == len(s),
                f"qkv_slices must be a non-empty combination of 'q', 'k', 'v' without repeats (e.g. 'qv'), got {s!r}",
            )
        self._require(
            self.init_lora_weights in ("kaiming", "gaussian"),
            f"init_lora_weights must be 'kaiming' or 'gaussian', got {self.init_lora_weights!r}",
        )

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


def _init_a(a: torch.Tensor, how: str, r: int) -> None:
    if how == "gaussian":
        nn.init.normal_(a, std=1.0 / r)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))


class LoraLinearAdapter(nn.Module):
    """``lora_A`` (r, in), ``lora_B`` (out, r); ``forward(x)`` = scaling * B A dropout(x)."""

    def __init__(self, in_features: int, out_features: int, config: LoraConfig) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features))
        self.lora_B = nn.Parameter(torch.zeros(out_features, config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        _init_a(self.lora_A, config.init_lora_weights, config.r)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A, self.lora_B

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in) -> (..., out)."""
        a, b = self.matrices()
        return F.linear(F.linear(self.dropout(x), a), b) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        a, b = self.matrices()
        return (b @ a) * self.scaling


QKVLayout = Callable[[nn.Module, nn.Linear], dict[str, torch.Tensor]]
_QKV_LAYOUTS: dict[str, QKVLayout] = {}


def register_qkv_layout(attention_class: str, layout: QKVLayout) -> None:
    """Declare how the fused qkv Linear of an attention class orders its output rows.

    Args:
        attention_class: ``f"{cls.__module__}.{cls.__qualname__}"`` of the module that owns the Linear.
        layout: ``layout(attention_module, qkv_linear) -> {"q": rows, "k": rows, "v": rows}`` (LongTensors).
            Without a registration the layout is ``[q | k | v]`` thirds (MONAI, timm, Swin).
    """
    _QKV_LAYOUTS[attention_class] = layout


def qkv_rows(parent: nn.Module | None, linear: nn.Linear) -> dict[str, torch.Tensor]:
    """Output rows of q, k and v in a fused qkv Linear owned by ``parent``."""
    if parent is not None:
        cls = type(parent)
        layout = _QKV_LAYOUTS.get(f"{cls.__module__}.{cls.__qualname__}")
        if layout is not None:
            return {k: torch.as_tensor(v, dtype=torch.long) for k, v in layout(parent, linear).items()}
    out = linear.out_features
    if out % 3:
        raise TargetingError(f"a fused qkv Linear needs out_features divisible by 3 (or a registered layout), got {out}")
    c = out // 3
    return {s: torch.arange(i * c, (i + 1) * c) for i, s in enumerate("qkv")}


class LoraFusedQKVAdapter(LoraLinearAdapter):
    """LoRA on chosen slices of a fused q/k/v projection.

    Per enabled slice s: ``lora_A[s]`` (r, in), ``lora_B[s]`` (|rows_s|, r). The update of the full
    output is ``B_full A_cat``: ``A_cat`` stacks the enabled A's, ``B_full`` (out, n*r) holds each B in
    its slice's output rows (``[q | k | v]`` thirds, or a registered layout such as TinyViT's
    head-major one) and zeros elsewhere, so the other slices get exactly nothing.
    """

    def __init__(self, in_features: int, out_features: int, config: LoraConfig, slices: str, rows: dict[str, torch.Tensor]) -> None:
        nn.Module.__init__(self)
        self.scaling = config.scaling
        self.slices = "".join(s for s in "qkv" if s in slices)
        self.out_features = out_features
        self.r = config.r
        for s in self.slices:
            self.register_buffer(f"rows_{s}", rows[s].clone(), persistent=False)
        self.lora_A = nn.ParameterDict({s: nn.Parameter(torch.empty(config.r, in_features)) for s in self.slices})
        self.lora_B = nn.ParameterDict({s: nn.Parameter(torch.zeros(len(rows[s]), config.r)) for s in self.slices})
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        for s in self.slices:
            _init_a(self.lora_A[s], config.init_lora_weights, config.r)

    def matrices(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = torch.cat([self.lora_A[s] for s in self.slices], dim=0)
        n = len(self.slices)
        b_full = self.lora_B[self.slices[0]].new_zeros(self.out_features, n * self.r)
        for j, s in enumerate(self.slices):
            b = self.lora_B[s]
            block = torch.cat([b.new_zeros(b.shape[0], self.r * j), b, b.new_zeros(b.shape[0], self.r * (n - j - 1))], dim=1)
            b_full = b_full.index_copy(0, getattr(self, f"rows_{s}"), block)
        return a, b_full


class LoraConvAdapter(nn.Module):
    """``lora_A`` (r, prod(W.shape[1:])), ``lora_B`` (W.shape[0], r); delta = scaling * (B A).view(W.shape)."""

    def __init__(self, weight_shape: torch.Size, config: LoraConfig) -> None:
        super().__init__()
        self.scaling = config.scaling
        self.weight_shape = tuple(weight_shape)
        fan = int(math.prod(weight_shape[1:]))
        self.lora_A = nn.Parameter(torch.empty(config.r, fan))
        self.lora_B = nn.Parameter(torch.zeros(weight_shape[0], config.r))
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        _init_a(self.lora_A, config.init_lora_weights, config.r)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).view(self.weight_shape) * self.scaling


class _MergeDeltaMixin:
    """Merge = add the adapter's ``delta_weight()`` to the innermost base weight."""

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight += adapter.delta_weight().to(base.weight.dtype)

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        base = innermost(self.base_layer)
        with torch.no_grad():
            base.weight -= adapter.delta_weight().to(base.weight.dtype)


class LoraLinear(_MergeDeltaMixin, AdapterLayer):
    """``nn.Linear`` + LoRA. Input (..., in) -> output (..., out)."""

    mergeable = True
    method_name = "lora"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        adapter = self.active()
        result = self.base_layer(x)
        if adapter is None:
            return result
        return result + adapter(x).to(result.dtype)


class LoraFusedQKV(LoraLinear):
    """Fused qkv ``nn.Linear`` + LoRA on some of its q/k/v slices."""


def conv_forward_with(conv: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, output_size: Any = None) -> torch.Tensor:
    """Run convolution module ``conv``'s operation with another ``weight``/``bias``.

    Keeps every hyper-parameter of ``conv`` (stride, padding, dilation, groups, padding_mode,
    output_padding / ``output_size`` for transposed convolutions).
    """
    if isinstance(conv, _CONV_TYPES):
        return conv._conv_forward(x, weight, bias)
    if isinstance(conv, _CONVT_TYPES):
        nd = {nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}[type(conv)]
        output_padding = conv._output_padding(x, output_size, conv.stride, conv.padding, conv.kernel_size, nd, conv.dilation)
        fn = (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)[nd - 1]
        return fn(x, weight, bias, conv.stride, conv.padding, output_padding, conv.groups, conv.dilation)
    raise TypeError(f"not a convolution: {type(conv).__name__}")


class LoraConv(_MergeDeltaMixin, AdapterLayer):
    """Convolution / transposed convolution (1D, 2D, 3D) + LoRA on its weight tensor.

    Input (B, C_in, *spatial) -> output (B, C_out, *spatial_out), as the base layer.
    """

    mergeable = True
    method_name = "lora"

    def forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        adapter = self.active()
        if adapter is None:
            return self.base_layer(x) if output_size is None else self.base_layer(x, output_size)
        conv = innermost(self.base_layer)
        delta = adapter.delta_weight().to(conv.weight.dtype)
        if self.training and isinstance(adapter.dropout, nn.Dropout):
            base = conv_forward_with(conv, x, conv.weight, conv.bias, output_size)
            return base + conv_forward_with(conv, adapter.dropout(x), delta, None, output_size)
        return conv_forward_with(conv, x, conv.weight + delta, conv.bias, output_size)


class LoraTuner(WrappingTuner):
    """Wraps Linear / fused-qkv Linear / convolution targets with LoRA layers."""

    config_cls = LoraConfig
    default_roles = ("qkv", "convs")
    applies_to = "nn.Linear (incl. fused qkv slices), nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d"
    config: LoraConfig

    def _slices(self, model: nn.Module) -> str | None:
        cfg = self.config
        if cfg.qkv_slices is not None:
            return cfg.qkv_slices
        preset = get_preset(model)
        using_preset_qkv = (
            cfg.target_modules is None and not cfg.target_types and preset is not None and preset.role("qkv") is not None
        )
        if not using_preset_qkv:
            return None
        return preset.method_defaults.get("lora", {}).get("qkv_slices", "qv")

    def is_fused_qkv(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in self.config.fused_qkv_names

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, nn.Linear):
            return LoraFusedQKV if self._active_slices and self.is_fused_qkv(name, module) else LoraLinear
        if isinstance(module, _CONV_TYPES + _CONVT_TYPES):
            return LoraConv
        return None

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        if self.config.qkv_slices is not None:
            from monai_peft.targeting import get_submodule

            if not any(self.is_fused_qkv(n, innermost(get_submodule(model, n))) for n in names):
                raise ConfigError(
                    f"qkv_slices={self.config.qkv_slices!r} but no targeted module is a fused qkv Linear "
                    f"(last name component in {self.config.fused_qkv_names}); targets were {names[:5]}"
                )

    def plan(self, model: nn.Module) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        self._active_slices = self._slices(model)
        self._model = model
        return super().plan(model)

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        if layer_cls is LoraFusedQKV:
            from monai_peft.targeting import get_submodule

            parent = innermost(get_submodule(self._model, name.rpartition(".")[0])) if "." in name else None
            rows = qkv_rows(parent, module)
            return LoraFusedQKVAdapter(module.in_features, module.out_features, self.config, self._active_slices, rows)
        if layer_cls is LoraLinear:
            return LoraLinearAdapter(module.in_features, module.out_features, self.config)
        return LoraConvAdapter(module.weight.shape, self.config)


register_method("lora", LoraConfig, LoraTuner)
