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
from monai_peft.methods.base import AdapterLayer, PlanItem, WrappingTuner
from monai_peft.methods.common import CONV, CONVT, MergeDeltaMixin, conv_forward_with
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = [
    "LoraConfig",
    "LoraConv",
    "LoraFusedQKV",
    "LoraLinear",
    "LoraTuner",
    "conv_forward_with",
    "qkv_rows",
    "register_qkv_layout",
]


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
        raise TargetingError(
            f"a fused qkv Linear needs out_features divisible by 3 (or a registered layout), got {out}"
        )
    c = out // 3
    return {s: torch.arange(i * c, (i + 1) * c) for i, s in enumerate("qkv")}


class LoraFusedQKVAdapter(LoraLinearAdapter):
    """LoRA on chosen slices of a fused q/k/v projection.

    Per enabled slice s: ``lora_A[s]`` (r, in), ``lora_B[s]`` (|rows_s|, r). The update of the full
    output is ``B_full A_cat``: ``A_cat`` stacks the enabled A's, ``B_full`` (out, n*r) holds each B in
    its slice's output rows (``[q | k | v]`` thirds, or a registered layout such as TinyViT's
    head-major one) and zeros elsewhere, so the other slices get exactly nothing.
    """

    def __init__(
        self, in_features: int, out_features: int, config: LoraConfig, slices: str, rows: dict[str, torch.Tensor]
    ) -> None:
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
            block = torch.cat(
                [b.new_zeros(b.shape[0], self.r * j), b, b.new_zeros(b.shape[0], self.r * (n - j - 1))], dim=1
            )
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


class LoraLinear(MergeDeltaMixin, AdapterLayer):
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


class LoraConv(MergeDeltaMixin, AdapterLayer):
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


@dataclass(frozen=True)
class _QKVContext:
    """Plan context of a fused qkv target: the slices that get an update and their output rows."""

    slices: str
    rows: dict[str, torch.Tensor]

    def to_dict(self) -> dict[str, Any]:
        return {"qkv_slices": self.slices}


class LoraTuner(WrappingTuner):
    """Wraps Linear / fused-qkv Linear / convolution targets with LoRA layers.

    With ``target_modules=None`` the targets are the preset's ``qkv`` role (fused qkv slices ``"qv"``
    unless the preset's ``qkv_slices`` says otherwise, e.g. all of q, k, v on diffusion U-Nets), else
    its ``conv`` role.
    """

    config_cls = LoraConfig
    default_roles = ("qkv", "conv")
    applies_to = "nn.Linear (incl. fused qkv slices), nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d"
    config: LoraConfig

    def slices_for(self, model: nn.Module) -> str | None:
        """The fused-qkv slices this config adapts on ``model`` (None: whole layers)."""
        cfg = self.config
        if cfg.qkv_slices is not None:
            return cfg.qkv_slices
        preset = self.preset(model)
        using_preset_qkv = (
            cfg.target_modules is None
            and not cfg.target_types
            and preset is not None
            and preset.role("qkv") is not None
        )
        return preset.qkv_slices if using_preset_qkv else None

    def is_fused_qkv(self, name: str, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in self.config.fused_qkv_names

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, nn.Linear):
            return LoraLinear
        if isinstance(module, CONV + CONVT):
            return LoraConv
        return None

    def plan_item(self, model: nn.Module, name: str, module: nn.Module) -> PlanItem | str:
        slices = self.slices_for(model)
        if slices and self.is_fused_qkv(name, module):
            parent = innermost(get_submodule(model, name.rpartition(".")[0])) if "." in name else None
            return PlanItem(name, module, LoraFusedQKV, _QKVContext(slices, qkv_rows(parent, module)))
        return super().plan_item(model, name, module)

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        fused = any(self.is_fused_qkv(n, innermost(get_submodule(model, n))) for n in names)
        if self.config.qkv_slices is not None and not fused:
            raise ConfigError(
                f"qkv_slices={self.config.qkv_slices!r} but no targeted module is a fused qkv Linear "
                f"(last name component in {self.config.fused_qkv_names}); targets were {names[:5]}"
            )

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        fused = [item.context.slices for item in plan if isinstance(item.context, _QKVContext)]
        return {"qkv_slices": fused[0] if fused else None}

    def build(self, item: PlanItem, shared: Any) -> nn.Module:
        module = item.module
        if isinstance(item.context, _QKVContext):
            return LoraFusedQKVAdapter(
                module.in_features, module.out_features, self.config, item.context.slices, item.context.rows
            )
        if item.layer_cls is LoraLinear:
            return LoraLinearAdapter(module.in_features, module.out_features, self.config)
        return LoraConvAdapter(module.weight.shape, self.config)


register_method("lora", LoraConfig, LoraTuner)
