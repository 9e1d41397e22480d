"""Adapters for convolutional networks: Conv-Adapter and TSA (task-specific 1x1 adapters).

Conv-Adapter (Chen et al., "Conv-Adapter: Exploring Parameter Efficient Transfer Learning for
ConvNets", CVPR-W 2024; reference code ``Hhhhhhao/Conv-Adapter``)::

    A(h) = alpha * PW_1x1(ReLU(GConv_kxk(h)))

- ``GConv``: C_in -> w channels, k x k (k = 3), groups = w, stride = the adapted conv's (or
  block's) stride; w = C_in / gamma (``reduction`` gamma, the code's ``adapt_size``, default 8).
  When gamma does not divide C_in, w is the largest divisor of C_in not above C_in / gamma (so
  that ``groups = w`` is valid; our choice, the paper is silent);
- ``PW``: w -> C_out 1 x 1 convolution; both convolutions have biases and PyTorch's default
  initialisation, as in the reference code;
- ``alpha`` in R^{C_out}, learnable, initialised to 1 (so a fresh Conv-Adapter is *not* an
  identity; ``pointwise_init="zeros"`` zeroes PW and makes it one).

Placements (the paper's four variants; ``placement``):

- ``conv_parallel`` (default): ``y = conv(h) + A(h)`` beside the k x k convolution of each block
  (MONAI ResNet basic block: ``conv1``, which carries the stride, as the reference code's
  BasicBlock; bottleneck: ``conv2``; in general the first non-transposed convolution with a kernel
  larger than 1). The sum goes through the block's BatchNorm. The reference code's *bottleneck*
  adds ``A(h)`` after ``ReLU(BN(conv2 h))`` instead; MONAI blocks share one activation module
  between stages, so that point cannot be wrapped without re-writing the block: we use the
  paper's conv-level placement for both block kinds and say so in the docs.
- ``conv_sequential``: ``y = conv(h) + A(conv(h))`` (C_out -> C_out, stride 1);
- ``residual_parallel``: ``y = block(h) + A(h)`` beside the whole residual block (C_in -> C_out,
  stride = block stride);
- ``residual_sequential``: ``y = block(h) + A(block(h))`` (C_out -> C_out, stride 1).

The GConv's padding is chosen so that its output grid equals the adapted convolution's: for a
conv with padding p, dilation d and kernel K, ``q = p - d (K - 1) / 2 + (k - 1) / 2`` (k odd), i.e.
the adapter kernel is centred on the base kernel's centre tap; a convolution for which q is not a
non-negative integer is rejected with the reason. 2D and 3D use ``Conv2d``/``Conv3d`` of the same
shape (3x3x3 GConv in 3D).

TSA (Li, Liu & Bilen, "Cross-domain Few-shot Learning with Task-specific Adapters", CVPR 2022; as
used by Dutt et al., MIDL 2024, on the convolutions of the ResNet-50 blocks in layer1-4, shortcut
projections excluded: that reproduces their 10.6 M parameters)::

    y = conv(h) + conv_1x1(h; alpha)      alpha in R^{C_out x C_in x 1 x 1}, stride = conv stride, groups = 1

``alpha`` is initialised to ``init_scale * I`` (the rectangular identity ``torch.eye(C_out, C_in)``,
``init_scale = 1e-4``, the public TSA code's near-zero init; ``init_scale = 0`` gives an exact
identity). The 1x1 adapter reads the input at the position of the base kernel's centre tap
``t0 = (K - 1) // 2`` for every output: for the usual "same" convolutions (odd K, padding
``d (K - 1) / 2``) that is exactly ``F.conv(h, alpha, stride=s)``; for other paddings the input is
shifted (zero padded / cropped) so that output and adapter grids coincide. Hence TSA merges
*exactly* into the base kernel: ``W[:, :, t0] += alpha`` (transposed convolutions too: their 1x1
adapter is a stride-s transposed 1x1 convolution shifted to tap t0). Merging is refused, with the
reason, when it would not be exact: grouped/depth-wise convolutions (a dense 1x1 cannot fold into
a grouped kernel) and non-zero padding modes when the centre tap is not aligned with the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import AdapterError, InputDataError, MethodNotApplicableError
from monai_peft.methods.base import AdapterLayer, PlanItem, WrappingTuner
from monai_peft.methods.common import CONV as _CONV
from monai_peft.methods.common import CONV_BY_DIMS as _CONV_BY_DIM
from monai_peft.methods.common import CONV_FN as _CONV_FN
from monai_peft.methods.common import CONVT as _CONVT
from monai_peft.methods.common import CONVT_FN as _CONVT_FN
from monai_peft.methods.common import make_activation
from monai_peft.methods.layout import feature_layout
from monai_peft.registry import register_method
from monai_peft.targeting import find_targets, get_submodule, innermost

__all__ = [
    "ConvAdapterConfig",
    "ConvAdapterModule",
    "ConvAdapterParallelLayer",
    "ConvAdapterSequentialLayer",
    "ConvAdapterTuner",
    "TSAAdapter",
    "TSAConfig",
    "TSAConv",
    "TSATuner",
    "grouped_width",
    "tsa_merge_blocker",
]

_SHORTCUT_NAMES = ("downsample", "shortcut")
PLACEMENTS = ("conv_parallel", "conv_sequential", "residual_parallel", "residual_sequential")


def _dims(conv: nn.Module) -> int:
    return len(conv.kernel_size)


def _spatial_conv(block: nn.Module) -> tuple[str, nn.Module] | None:
    """(relative name, module) of the first non-transposed convolution with a kernel > 1."""
    for name, m in block.named_modules():
        m = innermost(m)
        if isinstance(m, _CONV) and math.prod(m.kernel_size) > 1:
            return name, m
    return None


def _has_conv(module: nn.Module) -> bool:
    return any(isinstance(innermost(m), _CONV) for m in module.modules())


def grouped_width(channels: int, reduction: float) -> int:
    """w: the largest divisor of ``channels`` that is <= channels / reduction (at least 1)."""
    target = max(1, int(channels // reduction))
    for w in range(min(target, channels), 0, -1):
        if channels % w == 0:
            return w
    return 1


# =================================================================================================
# Conv-Adapter
# =================================================================================================
@dataclass
class ConvAdapterConfig(PeftConfig):
    """Configuration of Conv-Adapter.

    Args:
        reduction: gamma; the GConv has ``C_in / gamma`` output channels and as many groups
            (reference code ``--adapt_size``, default 8).
        kernel_size: k of the GConv (paper: 3; odd).
        placement: ``"conv_parallel"`` (default), ``"conv_sequential"``, ``"residual_parallel"``
            or ``"residual_sequential"`` (see the module docstring).
        activation: between GConv and PW (paper: ReLU for ResNets).
        alpha_init: initial value of the per-channel scale alpha (paper: 1).
        pointwise_init: ``"default"`` (PyTorch init, reference code) or ``"zeros"`` (PW weight
            and bias zero: a fresh adapter is an identity).
        bias: biases in GConv and PW (reference code: yes).
    """

    reduction: float = 8.0
    kernel_size: int = 3
    placement: str = "conv_parallel"
    activation: str = "relu"
    alpha_init: float = 1.0
    pointwise_init: str = "default"
    bias: bool = True

    def validate(self) -> None:
        self._require(self.reduction > 0, f"reduction (gamma) must be > 0, got {self.reduction!r}")
        self._require(
            isinstance(self.kernel_size, int) and self.kernel_size > 0 and self.kernel_size % 2 == 1,
            f"kernel_size must be a positive odd int, got {self.kernel_size!r}",
        )
        self._require(
            self.placement in PLACEMENTS, f"placement must be one of {list(PLACEMENTS)}, got {self.placement!r}"
        )
        self._require(
            self.activation in ("relu", "gelu", "silu", "tanh", "quick_gelu"),
            f"activation must be relu, gelu, silu, tanh or quick_gelu, got {self.activation!r}",
        )
        self._require(
            self.pointwise_init in ("default", "zeros"),
            f"pointwise_init must be 'default' or 'zeros', got {self.pointwise_init!r}",
        )


class ConvAdapterModule(nn.Module):
    """``alpha * PW(act(GConv(h)))``.

    Args:
        in_channels: C_in; out_channels: C_out.
        spatial_dims: 1, 2 or 3.
        reduction: gamma (GConv width ``grouped_width(C_in, gamma)``).
        kernel_size: k; stride: GConv stride; padding: GConv padding (int or per-dim tuple).

    Shapes: h (B, C_in, *S) -> (B, C_out, *S') with S' = floor((S + 2 q - k) / stride) + 1.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int,
        *,
        reduction: float = 8.0,
        kernel_size: int = 3,
        stride: int | tuple[int, ...] = 1,
        padding: int | tuple[int, ...] | None = None,
        activation: str = "relu",
        alpha_init: float = 1.0,
        pointwise_init: str = "default",
        bias: bool = True,
    ) -> None:
        super().__init__()
        conv = _CONV_BY_DIM[spatial_dims]
        self.in_channels, self.out_channels, self.spatial_dims = in_channels, out_channels, spatial_dims
        width = grouped_width(in_channels, reduction)
        pad = kernel_size // 2 if padding is None else padding
        self.gconv = conv(in_channels, width, kernel_size, stride=stride, padding=pad, groups=width, bias=bias)
        self.act = make_activation(activation)
        self.pw = conv(width, out_channels, 1, bias=bias)
        self.alpha = nn.Parameter(torch.full((out_channels,), float(alpha_init)))
        if pointwise_init == "zeros":
            nn.init.zeros_(self.pw.weight)
            if self.pw.bias is not None:
                nn.init.zeros_(self.pw.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.dim() != self.spatial_dims + 2 or h.shape[1] != self.in_channels:
            raise InputDataError(
                f"Conv-Adapter expects a channel-first {self.spatial_dims}D map with {self.in_channels} channels, "
                f"got shape {tuple(h.shape)}"
            )
        y = self.pw(self.act(self.gconv(h)))
        return y * self.alpha.view(1, -1, *((1,) * self.spatial_dims))


def _add_checked(out: torch.Tensor, delta: torch.Tensor, where: str) -> torch.Tensor:
    if out.shape != delta.shape:
        raise InputDataError(
            f"Conv-Adapter output {tuple(delta.shape)} does not match the {where} output {tuple(out.shape)}; the block "
            "probably changes resolution in a way the adapter's stride does not mirror: target its convolutions "
            "(placement='conv_parallel') instead"
        )
    return out + delta


class ConvAdapterParallelLayer(AdapterLayer):
    """``y = base(h) + A(h)`` (conv_parallel / residual_parallel)."""

    method_name = "conv_adapter"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        adapter = self.active()
        if adapter is None:
            return out
        return _add_checked(out, adapter(x), type(innermost(self.base_layer)).__name__)


class ConvAdapterSequentialLayer(AdapterLayer):
    """``y = base(h); y + A(y)`` (conv_sequential / residual_sequential)."""

    method_name = "conv_adapter"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        adapter = self.active()
        if adapter is None:
            return out
        return out + adapter(out)


def _parallel_padding(conv: nn.Module, k: int) -> tuple[int, ...] | str:
    """GConv padding that centres the k x k adapter on ``conv``'s centre tap, or the reason it cannot."""
    pads = []
    for i, kb in enumerate(conv.kernel_size):
        d = conv.dilation[i]
        if isinstance(conv.padding, str):
            p2 = d * (kb - 1) if conv.padding == "same" else 0  # 2 * left padding ('same' keeps size)
        else:
            p2 = 2 * conv.padding[i]
        q2 = p2 - d * (kb - 1) + (k - 1)
        if q2 < 0 or q2 % 2:
            return (
                f"its padding {conv.padding} and kernel {tuple(conv.kernel_size)} (dilation {tuple(conv.dilation)}) give an "
                "output grid that a centred k x k adapter cannot reproduce"
            )
        pads.append(q2 // 2)
    return tuple(pads)


class ConvAdapterTuner(WrappingTuner):
    """Conv-Adapter on CNN blocks (default: every block of the network preset)."""

    config_cls = ConvAdapterConfig
    default_roles = ("block",)
    applies_to = (
        "convolutional blocks and nn.Conv1d/2d/3d layers (a block must contain a k x k convolution); "
        "not transformer blocks, which hold no convolution"
    )
    config: ConvAdapterConfig

    @property
    def conv_level(self) -> bool:
        return self.config.placement.startswith("conv_")

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        names = super().resolve(model, *default_roles)
        if not self.conv_level:
            return names
        out = []
        for name in names:
            module = innermost(get_submodule(model, name))
            if isinstance(module, _CONV + _CONVT):
                out.append(name)
                continue
            found = _spatial_conv(module)
            out.append(f"{name}.{found[0]}" if found is not None and found[0] else name)
        return list(dict.fromkeys(out))

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        if isinstance(module, _CONVT):
            return None  # resolution-increasing layers: no stride to mirror
        if self.conv_level and not isinstance(module, _CONV):
            return None
        if not _has_conv(module):
            return None
        return ConvAdapterParallelLayer if self.config.placement.endswith("parallel") else ConvAdapterSequentialLayer

    def check_targets(self, model: nn.Module, names: list[str]) -> None:
        if self.config.placement != "conv_parallel":
            return
        bad = []
        for name in names:
            reason = _parallel_padding(innermost(get_submodule(model, name)), self.config.kernel_size)
            if isinstance(reason, str):
                bad.append(f"{name}: {reason}")
        if bad:
            raise MethodNotApplicableError(
                f"conv_adapter (conv_parallel) cannot run beside {bad[0]}"
                + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else "")
            )

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        cfg = self.config
        kw: dict[str, Any] = dict(
            reduction=cfg.reduction,
            kernel_size=cfg.kernel_size,
            activation=cfg.activation,
            alpha_init=cfg.alpha_init,
            pointwise_init=cfg.pointwise_init,
            bias=cfg.bias,
        )
        if isinstance(module, _CONV):
            dims = _dims(module)
            if cfg.placement.endswith("parallel"):
                pad = _parallel_padding(module, cfg.kernel_size)
                assert not isinstance(pad, str)
                return ConvAdapterModule(
                    module.in_channels, module.out_channels, dims, stride=module.stride, padding=pad, **kw
                )
            return ConvAdapterModule(module.out_channels, module.out_channels, dims, **kw)
        # a block (residual placements)
        layout = feature_layout(module)
        first_conv = next(innermost(m) for m in module.modules() if isinstance(innermost(m), _CONV))
        dims = _dims(first_conv)
        if cfg.placement == "residual_sequential":
            return ConvAdapterModule(layout.out_channels, layout.out_channels, dims, **kw)
        stride = getattr(module, "stride", None)
        if not isinstance(stride, (int, tuple)):
            strided = [
                innermost(m)
                for m in module.modules()
                if isinstance(innermost(m), _CONV) and max(innermost(m).stride) > 1
            ]
            stride = strided[0].stride if strided else 1
        return ConvAdapterModule(layout.in_channels, layout.out_channels, dims, stride=stride, **kw)


# =================================================================================================
# TSA
# =================================================================================================
@dataclass
class TSAConfig(PeftConfig):
    """Configuration of TSA parallel 1x1 adapters.

    Args:
        init_scale: alpha starts at ``init_scale * eye(C_out, C_in)`` (public TSA code: 1e-4;
            0 = exact identity).
        blocks_only: with ``target_modules=None``, adapt only the convolutions inside the preset's
            ``blocks`` (ResNet: layer1-4, as in Dutt et al.; the stem and heads stay untouched).
            False: every convolution of the preset's ``convs`` role.
        shortcuts: with ``target_modules=None``, also adapt the projection shortcuts of residual
            blocks (modules named ``downsample`` or ``shortcut``). False (default) reproduces Dutt
            et al.'s count (10.6 M on ResNet-50): the TSA code wraps the convolutions that are
            direct attributes of each block, and the shortcut is a nested ``Sequential``.
    """

    init_scale: float = 1e-4
    blocks_only: bool = True
    shortcuts: bool = False

    def validate(self) -> None:
        self._require(self.init_scale >= 0, f"init_scale must be >= 0, got {self.init_scale!r}")


class TSAAdapter(nn.Module):
    """The 1x1 adapter weight ``alpha``: (C_out, C_in, 1, ...) for convolutions, (C_in, C_out, 1, ...)
    for transposed convolutions (PyTorch's weight layouts).

    ``merge_blockers`` (a plain list, not saved) is shared by every layer of one adapter and lists the adapted
    convolutions whose fold would not be exact.
    """

    def __init__(self, conv: nn.Module, init_scale: float, merge_blockers: list[str] | None = None) -> None:
        super().__init__()
        dims = _dims(conv)
        self.transposed = isinstance(conv, _CONVT)
        rows, cols = (conv.in_channels, conv.out_channels) if self.transposed else (conv.out_channels, conv.in_channels)
        eye = torch.eye(rows, cols) * float(init_scale)
        self.alpha = nn.Parameter(eye.reshape(rows, cols, *((1,) * dims)))
        self.merge_blockers = merge_blockers if merge_blockers is not None else []


def _left_padding(conv: nn.Module, i: int) -> int:
    if isinstance(conv.padding, str):
        return conv.dilation[i] * (conv.kernel_size[i] - 1) // 2 if conv.padding == "same" else 0
    return int(conv.padding[i])


def _tap_offsets(conv: nn.Module) -> list[int]:
    """Per dim, input index - stride * output index read by the centre tap t0 = (K - 1) // 2."""
    return [conv.dilation[i] * ((k - 1) // 2) - _left_padding(conv, i) for i, k in enumerate(conv.kernel_size)]


def tsa_merge_blocker(conv: nn.Module) -> str | None:
    """Why a TSA adapter beside ``conv`` cannot be folded exactly into its kernel (None if it can)."""
    if conv.groups != 1:
        return f"groups={conv.groups}: a dense 1x1 adapter cannot fold into a grouped kernel"
    if isinstance(conv, _CONV) and conv.padding_mode != "zeros":
        symmetric = not isinstance(conv.padding, str) and all(
            k % 2 == 1 and conv.padding[i] == conv.dilation[i] * (k - 1) // 2 for i, k in enumerate(conv.kernel_size)
        )
        if not symmetric:
            return (
                f"padding_mode={conv.padding_mode!r} with a centre tap not aligned to the input (padding {conv.padding}, "
                f"kernel {tuple(conv.kernel_size)}): the folded tap would read padded values the adapter never sees"
            )
    return None


class TSAConv(AdapterLayer):
    """Convolution / transposed convolution (1D, 2D, 3D) + a parallel TSA 1x1 adapter.

    Input (B, C_in, *S) -> (B, C_out, *S_out), as the base layer (``output_size`` of transposed
    convolutions is honoured). Mergeable: ``W[:, :, t0, ...] += alpha``.
    """

    mergeable = True
    method_name = "tsa"

    def adapter_output(self, adapter: TSAAdapter, x: torch.Tensor, out_shape: torch.Size) -> torch.Tensor:
        conv = innermost(self.base_layer)
        dims = _dims(conv)
        offsets = _tap_offsets(conv)
        stride = conv.stride
        alpha = adapter.alpha.to(x.dtype)
        if adapter.transposed:
            y = _CONVT_FN[dims](x, alpha, stride=stride)  # output index s * i
            pads: list[int] = []
            for i in reversed(range(dims)):
                n_out, n_y = out_shape[i], y.shape[2 + i]
                left = -_left_padding(conv, i) + conv.dilation[i] * ((conv.kernel_size[i] - 1) // 2)
                pads += [left, n_out - n_y - left]
            return F.pad(y, pads)
        in_sizes = x.shape[2:]
        if all(o == 0 for o in offsets) and all(
            out_shape[i] == (in_sizes[i] - 1) // stride[i] + 1 for i in range(dims)
        ):
            return _CONV_FN[dims](x, alpha, stride=stride)
        pads = []
        for i in reversed(range(dims)):
            n_out, off, s = out_shape[i], offsets[i], stride[i]
            pads += [-off, s * (n_out - 1) + off + 1 - in_sizes[i]]
        return _CONV_FN[dims](F.pad(x, pads), alpha, stride=stride)

    def forward(self, x: torch.Tensor, output_size: Any = None) -> torch.Tensor:
        out = self.base_layer(x) if output_size is None else self.base_layer(x, output_size)
        adapter = self.active()
        if adapter is None:
            return out
        return out + self.adapter_output(adapter, x, out.shape[2:]).to(out.dtype)

    def _fold(self, adapter: TSAAdapter, sign: float) -> None:
        if adapter.merge_blockers:
            raise AdapterError(
                f"this TSA adapter cannot be merged exactly: {len(adapter.merge_blockers)} adapted convolution(s) do not "
                f"allow it, e.g. {adapter.merge_blockers[0]}. Keep the PeftModel unmerged (it runs as is), or exclude "
                "those convolutions with exclude_modules"
            )
        conv = innermost(self.base_layer)
        centre = (slice(None), slice(None)) + tuple((k - 1) // 2 for k in conv.kernel_size)
        with torch.no_grad():
            conv.weight[centre] += sign * adapter.alpha.flatten(2)[..., 0].to(conv.weight.dtype)

    def merge_adapter_into_base(self, adapter: nn.Module) -> None:
        self._fold(adapter, 1.0)

    def unmerge_adapter_from_base(self, adapter: nn.Module) -> None:
        self._fold(adapter, -1.0)


class TSATuner(WrappingTuner):
    """TSA 1x1 adapters beside every targeted convolution."""

    config_cls = TSAConfig
    default_roles = ("conv",)
    applies_to = "nn.Conv1d/2d/3d and nn.ConvTranspose1d/2d/3d layers of a CNN"
    config: TSAConfig

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        cfg = self.config
        if cfg.target_modules is not None or cfg.target_types:
            return super().resolve(model, *default_roles)
        preset = self.preset(model)
        if preset is not None and preset.role("conv") is None:
            raise MethodNotApplicableError(
                f"tsa adds 1x1 adapters beside the convolutions of a CNN, and {type(innermost(model)).__name__} "
                f"(preset {preset.name}) has no convolutional backbone (a ViT's only convolution is its patch "
                "embedding; target it explicitly with target_modules if that is what you want)"
            )
        names = super().resolve(model, *default_roles)
        blocks_role = preset.role("block") if preset is not None else None
        if cfg.blocks_only and blocks_role is not None:
            blocks = find_targets(model, blocks_role)
            names = [n for n in names if any(n.startswith(b + ".") for b in blocks)]
        if not cfg.shortcuts:
            names = [n for n in names if not set(n.split(".")) & set(_SHORTCUT_NAMES)]
        return names

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return TSAConv if isinstance(module, _CONV + _CONVT) else None

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> list[str]:
        """The convolutions of this adapter whose fold would not be exact (shared by all its layers)."""
        return [f"{i.name} ({reason})" for i in plan if (reason := tsa_merge_blocker(i.module)) is not None]

    def build(self, item: PlanItem, shared: list[str]) -> nn.Module:
        return TSAAdapter(item.module, self.config.init_scale, shared)


register_method("conv_adapter", ConvAdapterConfig, ConvAdapterTuner)
register_method("tsa", TSAConfig, TSATuner)
