"""Dual-Kernel Adapter (DKA): a bottleneck adapter with a large + a small depthwise convolution.

Source: Zhu et al., "Dual-Kernel Adapter: Expanding Spatial Horizons for Data-Constrained Medical
Image Analysis", ICLR 2026. Reference code: ``experiments/cnn/train_vit_mocov3_dka.py`` of the
authors' repository (the only working DKA forward there, see ``/work/shared/METHODS.md`` §1.2);
implemented here from the equations, no code copied.

Equation (ViT tokens ``x`` of shape ``(B, P + N, C)``, ``P`` prefix tokens such as CLS first,
``N = prod(grid)`` patch tokens in row-major order, bottleneck ``m``)::

    z      = GELU(x W_down)                         W_down in R^{C x m}, no bias
    z_pre  = z[:, :P]                               # CLS / prefix tokens bypass the convolutions
    Z      = reshape(z[:, P:]) -> (B, m, *grid)     # token grid, 2D (h, w) or 3D (d, h, w)
    Z      = DW_large(Z) + DW_small(Z)              # depthwise (groups = m), stride 1, 'same' zero
                                                    # padding, no bias, summed in parallel
    z      = Dropout_p(GELU(concat(z_pre, flatten(Z))))
    out    = x + z W_up                             W_up in R^{m x C}, no bias

The prefix tokens go through both GELUs, dropout and ``W_up`` like the reference code, only the
convolutions skip them. Feature maps use the same equation with the map's spatial axes as the grid
and no prefix: channel-last maps ``(B, *spatial, C)`` (MONAI SwinUNETR blocks) and channel-first
maps ``(B, C, *spatial)`` (CNN blocks; the two projections act on the channel axis, i.e. as 1x1
convolutions).

Defaults follow the reference code: ``m = 16`` (the MoCo-v3 DKA script, the clean reference, and
the repository's profiling note "classification uses 16 channels"; the broken bi-level script and
the cross-validation scripts use 10), kernels 51 + 5, GELU, dropout 0.1, **one adapter per
transformer block, applied sequentially to the block's output** (``block(x) -> DKA(block(x))``),
and PyTorch's default initialisation of every layer (kaiming-uniform, bound ``1/sqrt(fan_in)``):
``W_up`` is *not* zero, so a fresh DKA is **not** an identity. ``zero_init=True`` sets ``W_up = 0``
(the reference's commented-out variant), which makes a fresh DKA an exact identity.
``adapters_per_block=2`` places one DKA after the attention and one after the MLP of every
transformer block (the paper's overview figure).

Kernel sizing (derived, not in the paper): with zero 'same' padding on an axis of ``n`` positions,
only the central ``2n - 1`` taps of a kernel can ever touch the input (|offset| <= n - 1); the other
taps multiply padding zeros and never receive a gradient. Kernels are therefore clamped per axis
to ``min(k, 2n - 1)`` when ``n`` is known at injection time (the token grid of a ViT, or the map
sizes found by one probe forward when ``input_shape`` is given), so that the parameter count is the
real one; a clamped kernel is initialised with the *configured* kernel's fan-in, i.e. distributed
exactly as the central crop of the reference kernel. At run time, taps that cannot reach the
current input are cropped away as well, which is exact and saves compute. Large depthwise kernels
are evaluated with an FFT when they have more than 900 taps (``conv_backend="auto"``; identical up
to float rounding, much faster on CPU).

3D (not covered by the paper): a literal ``51^3`` depthwise kernel has 132,651 weights per channel.
Three designs keep the large + small principle, all with the full small ``k_s^3`` kernel:
``large_kernel_mode="full"``, the literal cube, affordable once clamped to a small token grid (a 6^3 ViT
grid -> 11^3 = 1,331 weights per channel, less than the paper's 51^2 = 2,601 in 2D); ``"separable"``:
three depthwise 1D kernels in sequence, ``k x 1 x 1 -> 1 x k x 1 -> 1 x 1 x k``, a rank-1 ``k^3`` kernel
with the same support for ``3k`` weights per channel (initialised so that its taps have the literal
kernel's variance); ``"dilated"``: ``5^3`` taps dilated to reach as far as ``k``. ``"auto"`` (the default)
uses the literal cube whenever its clamped size fits the 2D per-channel budget ``large_kernel^2`` and
the separable kernel otherwise (unknown or large maps). Measured (``benchmarks/dka_3d_erf.py``,
``docs/methods/dka.md``): only the literal cube enlarges the ERF as much as the 2D kernel does after a
short training; the separable and dilated kernels behave about like the small kernel alone.

Parameters per adapter (no biases): ``m (2C + k_l^2 + k_s^2)`` in 2D (full), ``m (2C + k_l^3 +
k_s^3)`` in 3D (full), ``m (2C + 3 k_l + k_s^3)`` (separable), ``m (2C + 5^3 + k_s^3)`` (dilated), with
the clamped sizes.

Example::

    import monai_peft as mp
    model = mp.get_peft_model(vit, mp.get_config("dka", input_shape=[1, 224, 224]), modules_to_save=["classification_head"])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError, MethodNotApplicableError, TargetingError
from monai_peft.methods.adapters import BottleneckAdapter, SequentialAdapterLayer
from monai_peft.methods.base import PlanItem, WrappingTuner
from monai_peft.methods.common import ACTIVATIONS, CONV_FN, conv_dims, make_activation
from monai_peft.methods.layout import feature_layout
from monai_peft.methods.token_geometry import (
    GridContext,
    TokenGeometry,
    TokenGrid,
    attach_grid_probes,
    int_tuple,
    token_geometry,
)
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = [
    "DKAConfig",
    "DKALayer",
    "DKATuner",
    "DepthwiseConv",
    "DualKernelAdapter",
    "SeparableDepthwiseConv",
    "TokenGeometry",
    "clamp_kernel",
    "dilated_kernel",
    "dka_parameter_count",
    "network_token_geometry",
    "resolve_token_grid",
]

_MODES = ("auto", "full", "separable", "dilated")
_BACKENDS = ("auto", "direct", "fft")
#: ``conv_backend="auto"`` switches to the FFT when a (cropped) kernel has more taps than this.
FFT_MIN_TAPS = 900
#: Taps per axis of the ``"dilated"`` large kernel.
DILATED_TAPS = 5


# ---------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------
def clamp_kernel(kernel: Sequence[int], size: Sequence[int] | None) -> tuple[int, ...]:
    """Per axis ``min(k, 2 n - 1)``: the taps of a 'same'-padded kernel that can reach an axis of ``n``.

    ``size=None`` (unknown) returns the kernel unchanged. Kernels are odd, so the result is odd too.
    """
    kernel = tuple(int(k) for k in kernel)
    if size is None:
        return kernel
    if len(size) != len(kernel):
        raise ConfigError(f"kernel {kernel} and spatial size {tuple(size)} have different ranks")
    return tuple(min(k, 2 * int(n) - 1) for k, n in zip(kernel, size))


def _next_fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (FFT-friendly length)."""
    best = 1 << max(0, (n - 1).bit_length())
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            p = p35
            while p < n:
                p *= 2
            best = min(best, p)
            p35 *= 3
        p5 *= 5
    return best


def _fft_depthwise(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """'same' zero-padded depthwise cross-correlation of ``x (B, m, *n)`` with ``weight (m, 1, *k)`` by FFT."""
    d = weight.dim() - 2
    ks, ns = weight.shape[2:], x.shape[2:]
    dims = tuple(range(-d, 0))
    sizes = [_next_fast_len(n + k - 1) for n, k in zip(ns, ks)]
    xf = torch.fft.rfftn(x.float(), s=sizes, dim=dims)
    kf = torch.fft.rfftn(weight[:, 0].float().flip(dims), s=sizes, dim=dims)
    y = torch.fft.irfftn(xf * kf, s=sizes, dim=dims)
    crop = tuple(slice(k // 2, k // 2 + n) for k, n in zip(ks, ns))
    return y[(..., *crop)].to(x.dtype)


class DepthwiseConv(nn.Module):
    """Depthwise 'same' convolution (stride 1, zero padding, no bias) on ``(B, m, *spatial)``.

    Args:
        channels: ``m`` (one kernel per channel, ``groups = m``).
        kernel_size: odd kernel size per spatial axis (its length sets 1D/2D/3D).
        init_kernel_size: kernel whose fan-in sets the init bound ``1/sqrt(fan_in)`` (PyTorch's default
            ``kaiming_uniform(a=sqrt(5))`` of a ConvNd); defaults to ``kernel_size``. A clamped kernel passes the
            configured (unclamped) size, so it is distributed as the central crop of the configured one.
        backend: ``"direct"`` (``F.convNd``), ``"fft"``, or ``"auto"`` (FFT above :data:`FFT_MIN_TAPS` taps).
        dilation: spacing of the taps per axis (1 = dense).

    At run time taps that cannot reach the input (``|offset| > n - 1``) are cropped away: exact.

    Shapes: ``(B, m, *spatial) -> (B, m, *spatial)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Sequence[int],
        *,
        init_kernel_size: Sequence[int] | None = None,
        backend: str = "auto",
        dilation: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        kernel_size = tuple(int(k) for k in kernel_size)
        self.dilation = tuple(int(v) for v in dilation) if dilation is not None else (1,) * len(kernel_size)
        if len(self.dilation) != len(kernel_size) or any(v < 1 for v in self.dilation):
            raise ConfigError(f"dilation must be one positive int per axis, got {dilation}")
        if any(k < 1 or k % 2 == 0 for k in kernel_size):
            raise ConfigError(f"depthwise kernels must be odd and positive ('same' padding), got {kernel_size}")
        if backend not in _BACKENDS:
            raise ConfigError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        self.channels = channels
        self.kernel_size = kernel_size
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(channels, 1, *kernel_size))
        fan_in = math.prod(init_kernel_size or kernel_size)
        bound = 1.0 / math.sqrt(fan_in)
        with torch.no_grad():
            self.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = len(self.kernel_size)
        if x.dim() != d + 2 or x.shape[1] != self.channels:
            raise InputDataError(
                f"depthwise {d}D convolution over {self.channels} channels expects (B, {self.channels}, *{d} spatial "
                f"axes), got {tuple(x.shape)}"
            )
        # taps at offsets |j * dilation| <= n - 1 are the only ones that can touch the input
        halves = [min(k // 2, (n - 1) // v) for k, n, v in zip(self.kernel_size, x.shape[2:], self.dilation)]
        weight = self.weight
        if any(h < k // 2 for h, k in zip(halves, self.kernel_size)):
            weight = weight[(..., *(slice(k // 2 - h, k // 2 + h + 1) for k, h in zip(self.kernel_size, halves)))]
        taps = math.prod(2 * h + 1 for h in halves)
        if self.backend == "fft" or (self.backend == "auto" and taps > FFT_MIN_TAPS):
            if any(v > 1 for v in self.dilation):  # spread the taps out (zeros between them)
                spread = weight.new_zeros(*weight.shape[:2], *((2 * h * v + 1) for h, v in zip(halves, self.dilation)))
                spread[(..., *(slice(None, None, v) for v in self.dilation))] = weight
                weight = spread
            return _fft_depthwise(x, weight)
        padding = tuple(h * v for h, v in zip(halves, self.dilation))
        return CONV_FN[d](x, weight, padding=padding, dilation=self.dilation, groups=self.channels)

    def extra_repr(self) -> str:
        dil = f", dilation={self.dilation}" if any(v > 1 for v in self.dilation) else ""
        return f"{self.channels}, kernel_size={self.kernel_size}{dil}, backend={self.backend!r}"


class SeparableDepthwiseConv(nn.Module):
    """A large depthwise kernel factorised per axis: ``k1 x 1 x 1 -> 1 x k2 x 1 -> 1 x 1 x k3`` in sequence.

    The composition is a rank-1 depthwise kernel with the full ``k1 x k2 x k3`` support (the same theoretical
    receptive field as the literal kernel) for ``k1 + k2 + k3`` weights per channel instead of ``k1 k2 k3``.

    Init (variance-matched): each factor is uniform in ``[-b, b]`` with ``b = 3^(1/2 - 1/(2d)) K^(-1/(2d))``,
    ``K = prod(k)`` of the configured kernel, so that every tap of the composed kernel has the variance
    ``1 / (3K)`` of PyTorch's default init of the literal ``k1 x k2 x k3`` kernel it replaces (the default
    per-factor bound ``1/sqrt(k)`` would make the composed taps' standard deviation ``3^((d-1)/2)`` times
    smaller, 3x in 3D).

    Shapes: ``(B, m, *spatial) -> (B, m, *spatial)``.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: Sequence[int],
        *,
        init_kernel_size: Sequence[int] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        kernel_size = tuple(int(k) for k in kernel_size)
        init = tuple(init_kernel_size or kernel_size)
        d = len(kernel_size)
        self.kernel_size = kernel_size
        self.axes = nn.ModuleList()
        for axis in range(d):
            k = [1] * d
            k[axis] = kernel_size[axis]
            k_init = [1] * d
            k_init[axis] = init[axis]
            self.axes.append(DepthwiseConv(channels, k, init_kernel_size=k_init, backend=backend))
        big_k = math.prod(init)
        bound = 3.0 ** (0.5 - 0.5 / d) * big_k ** (-0.5 / d)
        with torch.no_grad():
            for conv in self.axes:
                conv.weight.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.axes:
            x = conv(x)
        return x


# ---------------------------------------------------------------------------------------------
# token grids (see monai_peft.methods.token_geometry)
# ---------------------------------------------------------------------------------------------
def network_token_geometry(model: nn.Module, name: str) -> TokenGeometry:
    """The token geometry around the module at canonical ``name`` (:func:`~monai_peft.methods.token_geometry.token_geometry`)."""
    return token_geometry(model, name)


def resolve_token_grid(
    num_tokens: int,
    spatial_dims: int,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
) -> tuple[int, tuple[int, ...]]:
    """``(P, grid)`` of a runtime sequence of ``num_tokens`` tokens on the known ``grid`` (the one rule of
    :mod:`~monai_peft.methods.token_geometry`: the last ``prod(grid)`` tokens are the patches, at least
    ``num_prefix_tokens`` tokens precede them). The grid is never guessed from the count.

    Raises:
        InputDataError: unknown grid, or a count that cannot hold the grid and the prefix tokens.
    """
    tokens = TokenGrid(
        spatial_dims,
        tuple(int(g) for g in grid) if grid is not None else None,
        num_prefix_tokens or 0,
        hint="pass the patch grid (image size // patch size per axis)",
    )
    return tokens.split(num_tokens)


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
class DualKernelAdapter(BottleneckAdapter):
    """The DKA branch ``Dropout(GELU(BN(DW_large(Z) + DW_small(Z)))) W_up`` with ``Z = GELU(x W_down)`` (no residual;
    ``BN`` only with ``batch_norm=True``).

    Reuses :class:`~monai_peft.methods.adapters.BottleneckAdapter`'s projections (``down``, ``up``, no biases,
    ``down`` kaiming-uniform = PyTorch's Linear default) and its activation/dropout; ``up`` gets PyTorch's
    default init too unless ``zero_init``.

    Args:
        channels: ``C``.
        bottleneck: ``m``.
        spatial_dims: 2 or 3 (rank of the depthwise kernels).
        channel_dim: ``-1`` (tokens ``(B, P + N, C)`` or channel-last maps ``(B, *spatial, C)``) or ``1``
            (channel-first maps ``(B, C, *spatial)``).
        large_kernel / small_kernel: kernel size per spatial axis (odd), already clamped.
        large_init / small_init: configured sizes whose fan-in sets the init bound (see :class:`DepthwiseConv`).
        large_kernel_mode: ``"full"``, ``"separable"`` or ``"dilated"`` (see :func:`dilated_kernel`).
        batch_norm: a ``BatchNormNd(m)`` on the summed depthwise outputs (the reference DKA for ConvNeXt:
            ``DW 11x11 + DW 5x5 -> BatchNorm -> GELU``); on token sequences it normalises the patch map only.
        grid / num_prefix_tokens: a static token grid and the network's prefix count, for token inputs built
            without ``tokens``.
        tokens: the :class:`~monai_peft.methods.token_geometry.TokenGrid` that splits token sequences
            (follows the runtime grid of the patch embedding); default: from ``grid`` / ``num_prefix_tokens``.

    Shapes: tokens ``(B, P + N, C)``, channel-last ``(B, *spatial, C)`` or channel-first ``(B, C, *spatial)``
    -> the same shape (the branch; :class:`DKALayer` adds the residual).
    """

    def __init__(
        self,
        channels: int,
        bottleneck: int,
        *,
        spatial_dims: int,
        channel_dim: int = -1,
        large_kernel: Sequence[int],
        small_kernel: Sequence[int],
        large_init: Sequence[int] | None = None,
        small_init: Sequence[int] | None = None,
        large_kernel_mode: str = "full",
        activation: str = "gelu",
        dropout: float = 0.1,
        zero_init: bool = False,
        batch_norm: bool = False,
        grid: Sequence[int] | None = None,
        num_prefix_tokens: int | None = None,
        tokens: TokenGrid | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            channels,
            channels,
            bottleneck,
            activation=activation,
            dropout=dropout,
            channel_dim=channel_dim,
            bias=False,
            down_init="kaiming",
        )
        if not zero_init:
            self.up.reset_parameters()  # PyTorch default (the reference code), not Houlsby's zeros
        if large_kernel_mode not in ("full", "separable", "dilated"):
            raise ConfigError(f"large_kernel_mode must be 'full', 'separable' or 'dilated', got {large_kernel_mode!r}")
        self.spatial_dims = spatial_dims
        if tokens is None:
            tokens = TokenGrid(
                spatial_dims,
                tuple(int(g) for g in grid) if grid is not None else None,
                num_prefix_tokens or 0,
                hint="pass DKAConfig(grid=[image size // patch size per axis]) or input_shape",
            )
        self.tokens = tokens
        self.large_kernel_mode = large_kernel_mode
        if large_kernel_mode == "dilated":
            taps, dilation = dilated_kernel(large_kernel)
            self.large = DepthwiseConv(
                bottleneck, taps, init_kernel_size=large_init, backend=backend, dilation=dilation
            )
        else:
            large_cls = DepthwiseConv if large_kernel_mode == "full" else SeparableDepthwiseConv
            self.large = large_cls(bottleneck, large_kernel, init_kernel_size=large_init, backend=backend)
        self.small = DepthwiseConv(bottleneck, small_kernel, init_kernel_size=small_init, backend=backend)
        bn = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(spatial_dims, nn.BatchNorm1d)
        self.bn = bn(bottleneck) if batch_norm else nn.Identity()
        self.act_out = make_activation(activation)

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The static token grid (None: only the runtime grid is known)."""
        return self.tokens.static

    @property
    def num_prefix_tokens(self) -> int:
        """The network's own prefix tokens (more may precede the patches at run time)."""
        return self.tokens.min_prefix

    def _mix(self, zmap: torch.Tensor) -> torch.Tensor:
        return self.bn(self.large(zmap) + self.small(zmap))

    def token_grid(self, num_tokens: int) -> tuple[int, tuple[int, ...]]:
        """``(prefix tokens, grid)`` of a sequence of ``num_tokens`` tokens (the runtime grid when one was probed)."""
        return self.tokens.split(num_tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.spatial_dims
        ranks = (d + 2,) if self.channel_dim == 1 else (3, d + 2)
        if x.dim() not in ranks or x.shape[self.channel_dim] != self.in_channels:
            layout = "(B, C, *spatial)" if self.channel_dim == 1 else "(B, tokens, C) or (B, *spatial, C)"
            raise InputDataError(
                f"DKA expects {layout} with C={self.in_channels} and {d} spatial axes, got {tuple(x.shape)}; "
                "target modules whose outputs are token sequences or feature maps"
            )
        z = x.movedim(1, -1) if self.channel_dim == 1 else x
        z = self.act(self.down(z))  # (B, ..., m)
        if z.dim() == 3 and self.channel_dim == -1:  # token sequence (B, P + N, m)
            n_prefix, grid = self.token_grid(z.shape[1])
            b, _, m = z.shape
            # row-major patch tokens -> (B, *grid, m) -> channel-first view (channels-last strides: no copy)
            zmap = z[:, n_prefix:].reshape(b, *grid, m).movedim(-1, 1)
            patches = self._mix(zmap).movedim(1, -1).reshape(b, -1, m)
            z = torch.cat([z[:, :n_prefix], patches], dim=1) if n_prefix else patches
        else:  # channel-last map (B, *spatial, m)
            z = self._mix(z.movedim(-1, 1)).movedim(1, -1)
        z = self.up(self.dropout(self.act_out(z)))
        return z.movedim(-1, 1) if self.channel_dim == 1 else z

    def extra_repr(self) -> str:
        return (
            f"channels={self.in_channels}, bottleneck={self.down.out_features}, spatial_dims={self.spatial_dims}, "
            f"channel_dim={self.channel_dim}, large={self.large.kernel_size} ({self.large_kernel_mode}), "
            f"small={self.small.kernel_size}, grid={self.grid}, num_prefix_tokens={self.num_prefix_tokens}"
        )


class DKALayer(SequentialAdapterLayer):
    """``y = base(x); y + DKA(y)``: the reference placement, sequentially after the wrapped module."""

    method_name = "dka"


def dilated_kernel(span: Sequence[int], taps: int = DILATED_TAPS) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(kernel, dilation)`` of the dilated design: per axis ``min(taps, span)`` taps spaced by
    ``ceil((span - 1) / (taps - 1))``, so that the sparse kernel reaches (at least) as far as the dense ``span``.

    Example: ``dilated_kernel((15, 15, 15)) == ((5, 5, 5), (4, 4, 4))`` (reach 17 >= 15, 125 weights instead of 3,375).
    """
    kernel, dilation = [], []
    for k in span:
        t = min(taps, int(k))
        kernel.append(t)
        dilation.append(max(1, math.ceil((int(k) - 1) / (t - 1))) if t > 1 else 1)
    return tuple(kernel), tuple(dilation)


def dka_parameter_count(
    channels: int,
    bottleneck: int,
    large_kernel: Sequence[int],
    small_kernel: Sequence[int],
    large_kernel_mode: str = "full",
    batch_norm: bool = False,
) -> int:
    """Weights of one DKA (no biases): ``m (2C + |large| + |small|)``, ``|small| = prod(k_s)`` and ``|large| =
    prod(k)`` (full), ``sum(k)`` (separable) or ``prod(dilated_kernel(k)[0])`` (dilated); ``large_kernel`` is the
    (clamped) dense span; ``+ 2m`` (the BatchNorm's weight and bias) with ``batch_norm``. 2D full:
    ``m (2C + k_l^2 + k_s^2)``."""
    if large_kernel_mode == "full":
        large = math.prod(large_kernel)
    elif large_kernel_mode == "separable":
        large = sum(large_kernel)
    else:
        large = math.prod(dilated_kernel(large_kernel)[0])
    return bottleneck * (2 * channels + large + math.prod(small_kernel) + (2 if batch_norm else 0))


# ---------------------------------------------------------------------------------------------
# config and tuner
# ---------------------------------------------------------------------------------------------
@dataclass
class DKAConfig(PeftConfig):
    """Dual-Kernel Adapter (Zhu et al., ICLR 2026): bottleneck + large and small depthwise kernels.

    Args:
        bottleneck: width ``m`` (16: the reference MoCo-v3 DKA script; 10 in its other scripts).
        large_kernel: large depthwise kernel size (odd; 51 in the paper), clamped to the grid (see module doc).
        small_kernel: small depthwise kernel size (odd; 5 in the paper).
        large_kernel_mode: ``"auto"`` (full in 2D; in 3D full when the clamped cube has at most ``large_kernel^2``
            taps, else separable), ``"full"`` (literal ``k^d`` kernel), ``"separable"`` (``k x 1 x 1 -> 1 x k x 1
            -> 1 x 1 x k``, rank 1, ``d k`` weights per channel) or ``"dilated"`` (``5^d`` taps dilated to reach
            as far as ``k``, see :func:`dilated_kernel`).
        activation: activation after ``W_down`` and after the convolutions (GELU in the paper).
        dropout: dropout before ``W_up`` (0.1).
        zero_init: ``W_up = 0`` so a fresh DKA is an identity; default False = the reference code (PyTorch default
            init, not an identity).
        adapters_per_block: 1 (reference code: after each block, preset role ``blocks``) or 2 (paper figure:
            after the attention and after the MLP sub-layers, preset role ``sublayers``; transformers only).
        batch_norm: a BatchNorm over the ``m`` bottleneck channels after the summed depthwise kernels (the
            reference DKA for ConvNeXt: ``DW 11x11 + DW 5x5 -> BatchNorm -> GELU``); adds ``2 m`` parameters.
        clamp_kernels: clamp kernels to ``2 n - 1`` per axis where the size ``n`` is known at injection. On a
            token grid that the network does not store (MONAI's plain ``ViT``), pass ``grid`` or ``input_shape``,
            or set ``clamp_kernels=False``; grids that follow the input (timm ``dynamic_img_size``) are not clamped.
        grid: static patch-token grid (``image size // patch size``) when the network does not store it (MONAI's
            ``ViT`` stores only the patch count); never guessed from the token count. At run time the grid of
            each forward pass is read from the patch embedding's input.
        num_prefix_tokens: the network's own CLS/register tokens before the patch tokens; default: the network's.
        spatial_dims: 2 or 3 when the network cannot tell it (token sequences default to the patch embedding's,
            CNN blocks to their convolutions).
        input_shape: ``[C, *spatial]`` of the network input; gives the token grid of ViTs (through the patch size)
            and, with one probe forward at injection, each CNN/Swin target's feature-map size, so kernels are
            clamped (and the parameter count is the real one).
        conv_backend: ``"auto"`` (FFT for kernels with > 900 taps), ``"direct"`` or ``"fft"``.
    """

    bottleneck: int = 16
    large_kernel: int = 51
    small_kernel: int = 5
    large_kernel_mode: str = "auto"
    activation: str = "gelu"
    dropout: float = 0.1
    zero_init: bool = False
    batch_norm: bool = False
    adapters_per_block: int = 1
    clamp_kernels: bool = True
    grid: list[int] | None = None
    num_prefix_tokens: int | None = None
    spatial_dims: int | None = None
    input_shape: list[int] | None = None
    conv_backend: str = "auto"

    def validate(self) -> None:
        req = self._require
        req(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"bottleneck must be a positive int, got {self.bottleneck!r}",
        )
        for name in ("large_kernel", "small_kernel"):
            k = getattr(self, name)
            req(
                isinstance(k, int) and k > 0 and k % 2 == 1,
                f"{name} must be a positive odd int ('same' padding), got {k!r}",
            )
        req(
            self.large_kernel_mode in _MODES,
            f"large_kernel_mode must be one of {_MODES}, got {self.large_kernel_mode!r}",
        )
        req(self.activation in ACTIVATIONS, f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        req(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        req(isinstance(self.batch_norm, bool), f"batch_norm must be True or False, got {self.batch_norm!r}")
        req(self.adapters_per_block in (1, 2), f"adapters_per_block must be 1 or 2, got {self.adapters_per_block!r}")
        req(self.spatial_dims in (None, 2, 3), f"spatial_dims must be None, 2 or 3, got {self.spatial_dims!r}")
        req(self.conv_backend in _BACKENDS, f"conv_backend must be one of {_BACKENDS}, got {self.conv_backend!r}")
        req(
            self.num_prefix_tokens is None or (isinstance(self.num_prefix_tokens, int) and self.num_prefix_tokens >= 0),
            f"num_prefix_tokens must be None or an int >= 0, got {self.num_prefix_tokens!r}",
        )
        if self.grid is not None:
            grid = int_tuple(self.grid)
            req(grid is not None and len(grid) in (2, 3), f"grid must be 2 or 3 positive ints, got {self.grid!r}")
            req(
                self.spatial_dims is None or len(grid) == self.spatial_dims,
                f"grid {self.grid} does not have spatial_dims={self.spatial_dims} entries",
            )
            self.grid = list(grid)
        if self.input_shape is not None:
            shape = int_tuple(self.input_shape)
            req(
                shape is not None and len(shape) in (3, 4),
                f"input_shape must be [C, H, W] or [C, D, H, W], got {self.input_shape!r}",
            )
            self.input_shape = list(shape)

    def mode_for(self, spatial_dims: int, kernel: Sequence[int] | None = None) -> str:
        """The large-kernel mode for a ``spatial_dims`` target whose (clamped) large kernel is ``kernel``.

        ``"auto"``: full in 2D; in 3D full when the clamped cube has at most ``large_kernel^2`` taps (the per-channel
        budget of the paper's 2D kernel, e.g. a 6^3 ViT grid -> 11^3 = 1,331 <= 51^2 = 2,601), else separable.
        """
        if self.large_kernel_mode != "auto":
            return self.large_kernel_mode
        if spatial_dims <= 2:
            return "full"
        if kernel is not None and math.prod(kernel) <= self.large_kernel**2:
            return "full"
        return "separable"


@dataclass(frozen=True)
class _Target:
    """Plan context of one DKA target."""

    channels: int
    channel_dim: int
    spatial_dims: int
    geometry: TokenGeometry | None = None  # token sequences
    size: tuple[int, ...] | None = None  # spatial size used to clamp kernels

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "channels": self.channels,
            "channel_dim": self.channel_dim,
            "spatial_dims": self.spatial_dims,
        }
        if self.geometry is not None:
            out["tokens"] = self.geometry.to_dict()
        out["size"] = list(self.size) if self.size is not None else None
        return out


def _is_swin_block(m: nn.Module) -> bool:
    return hasattr(m, "window_size") and hasattr(m, "shift_size") and not hasattr(m, "qkv")


def _is_window_attention(m: nn.Module) -> bool:
    return hasattr(m, "window_size") and (hasattr(m, "qkv") or hasattr(m, "relative_position_bias_table"))


def _map_dims(module: nn.Module) -> int | None:
    """Spatial rank of the first convolution / BatchNorm / InstanceNorm (or einops patch Rearrange) in ``module``."""
    for m in module.modules():
        d = conv_dims(m)
        if d is not None:
            return d
        if isinstance(m, _BatchNorm | _InstanceNorm) and type(m).__name__[-2:] in ("1d", "2d", "3d"):
            return int(type(m).__name__[-2])
    return None


def _ancestor_names(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


_GRID_HINT = "pass DKAConfig(grid=[image size // patch size per axis]) or input_shape=[C, *spatial]"


class DKATuner(WrappingTuner):
    """Wraps each target (transformer block, Swin block, CNN block; or sub-layers) in a :class:`DKALayer`.

    Token targets read their grid from :mod:`~monai_peft.methods.token_geometry`: the static grid sizes the
    kernels; a probe on the patch embedding gives each forward pass's grid.
    """

    config_cls = DKAConfig
    applies_to = (
        "transformer blocks or sub-layers whose output is a full token grid (prefix tokens allowed), Swin blocks "
        "(channel-last maps) and CNN blocks (channel-first maps), 2D or 3D"
    )
    config: DKAConfig

    @property
    def default_roles(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("block",) if self.config.adapters_per_block == 1 else ("sublayer",)

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        cfg = self.config
        if cfg.adapters_per_block == 2 and cfg.target_modules is None and not cfg.target_types:
            preset = self.preset(model)
            if preset is None or preset.role("sublayer") is None:
                net = type(innermost(model)).__name__
                raise MethodNotApplicableError(
                    f"dka: adapters_per_block=2 places a DKA after the attention and after the MLP of every "
                    f"transformer block, but {net} has no such sub-layers in its preset; use adapters_per_block=1 "
                    "or pass target_modules"
                )
        return super().resolve(model, *default_roles)

    def _describe(self, model: nn.Module, name: str, module: nn.Module) -> _Target | str:
        cfg = self.config
        if _is_window_attention(module):
            return (
                "window attention runs on batches of (shifted) windows, not on the feature map; place DKA after the "
                "whole Swin block (adapters_per_block=1)"
            )
        try:
            layout = feature_layout(module)
        except TargetingError as exc:
            return str(exc)
        c = layout.out_channels
        # token blocks that carry their grid (TinyViT / LiteMedSAM: (B, H*W, C) in and out, though their last
        # registered layer is a convolution applied inside the block)
        if int_tuple(getattr(module, "input_resolution", None)) is not None and hasattr(module, "attn"):
            layout = type(layout)(layout.in_channels, c, -1)
        if layout.channel_dim == 1:
            dims = cfg.spatial_dims or _map_dims(module)
            if dims is None:
                return "cannot tell whether its feature maps are 2D or 3D; set DKAConfig.spatial_dims"
            if dims not in (2, 3):
                return f"its feature maps are {dims}D; DKA supports 2D and 3D"
            return _Target(c, 1, dims)
        # channel-last: Swin maps (B, *spatial, C) or token sequences (B, P + N, C)
        for anc in _ancestor_names(name):
            m = innermost(get_submodule(model, anc))
            if _is_swin_block(m):
                return _Target(c, -1, cfg.spatial_dims or len(tuple(m.window_size)))
        try:
            geo = token_geometry(
                model,
                name,
                grid=cfg.grid,
                num_prefix_tokens=cfg.num_prefix_tokens,
                spatial_dims=cfg.spatial_dims,
                input_shape=cfg.input_shape,
            )
        except ConfigError as exc:
            return str(exc)
        if geo.spatial_dims not in (2, 3):
            return f"the rank of its token grid is unknown ({geo.source or 'no patch embedding found'}); set DKAConfig.spatial_dims and grid"
        if geo.grid is None and cfg.clamp_kernels and not geo.dynamic:
            count = (
                f" stores {geo.num_patches} patches but not their grid"
                if geo.num_patches
                else " does not store its patch grid"
            )
            return (
                f"{geo.source or 'the network'}{count}, and the kernels are clamped to the grid; {_GRID_HINT} "
                "(or clamp_kernels=False)"
            )
        return _Target(c, -1, geo.spatial_dims, geo, geo.grid if not geo.dynamic else None)

    def _probe_sizes(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, tuple[int, ...]]:
        """Spatial size of each map target's output for one zero input of ``input_shape`` (eval, no grad)."""
        shape = tuple(self.config.input_shape or ())
        sizes: dict[str, tuple[int, ...]] = {}
        hooks = []
        for item in plan:
            t: _Target = item.context
            if t.geometry is not None:
                continue

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = item.name, t: _Target = t) -> None:
                y = out[0] if isinstance(out, tuple | list) else out
                if isinstance(y, torch.Tensor) and y.dim() == t.spatial_dims + 2:
                    sizes[name] = tuple(y.shape[2:]) if t.channel_dim == 1 else tuple(y.shape[1:-1])

            hooks.append(get_submodule(model, item.name).register_forward_hook(hook))
        if not hooks:
            return sizes
        modes = [(m, m.training) for m in model.modules()]
        ref = next(iter(model.parameters()), None)
        x = torch.zeros(
            1, *shape, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None
        )
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        except Exception as exc:
            raise ConfigError(
                f"dka: the probe forward with input_shape={list(shape)} failed ({exc}); fix input_shape"
            ) from exc
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return sizes

    def plan_item(self, model: nn.Module, name: str, module: nn.Module) -> PlanItem | str:
        target = self._describe(model, name, module)
        return target if isinstance(target, str) else PlanItem(name, module, DKALayer, target)

    def plan(self, model: nn.Module) -> list[PlanItem]:
        names = self.resolve(model, *self.default_roles)
        items: list[PlanItem] = []
        rejected: list[str] = []
        for name in names:
            module = innermost(get_submodule(model, name))
            item = self.plan_item(model, name, module)
            if isinstance(item, str):
                rejected.append(f"{name} ({type(module).__name__}): {item}")
            else:
                items.append(item)
        if rejected:
            more = f" (and {len(rejected) - 4} more)" if len(rejected) > 4 else ""
            raise MethodNotApplicableError(
                f"dka cannot adapt {'; '.join(rejected[:4])}{more}. It applies to {self.applies_to}"
            )
        if self.config.input_shape is not None:
            sizes = self._probe_sizes(model, items)
            items = [
                PlanItem(i.name, i.module, i.layer_cls, replace(i.context, size=sizes[i.name]))
                if i.name in sizes
                else i
                for i in items
            ]
        return items

    def kernel_sizes(
        self, target: _Target
    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(large, small, configured large, configured small) kernel sizes for one target."""
        d = target.spatial_dims
        large0, small0 = (self.config.large_kernel,) * d, (self.config.small_kernel,) * d
        size = target.size if self.config.clamp_kernels else None
        return clamp_kernel(large0, size), clamp_kernel(small0, size), large0, small0

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> dict[str, GridContext]:
        """Probe the patch embedding(s) of token targets, so each forward pass's grid is known."""
        return attach_grid_probes(
            model, [i.context.geometry for i in plan if i.context.geometry is not None], adapter_name
        )

    def build(self, item: PlanItem, shared: dict[str, GridContext]) -> nn.Module:
        t: _Target = item.context
        cfg = self.config
        large, small, large0, small0 = self.kernel_sizes(t)
        tokens = None
        if t.geometry is not None:
            ctx = shared.get(t.geometry.patch_embed) if t.geometry.patch_embed is not None else None
            tokens = TokenGrid.from_geometry(t.geometry, ctx, _GRID_HINT)
        return DualKernelAdapter(
            t.channels,
            cfg.bottleneck,
            spatial_dims=t.spatial_dims,
            channel_dim=t.channel_dim,
            large_kernel=large,
            small_kernel=small,
            large_init=large0,
            small_init=small0,
            large_kernel_mode=cfg.mode_for(t.spatial_dims, large),
            activation=cfg.activation,
            dropout=cfg.dropout,
            zero_init=cfg.zero_init,
            batch_norm=cfg.batch_norm,
            tokens=tokens,
            backend=cfg.conv_backend,
        )

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        geos = [i.context.geometry for i in plan if i.context.geometry is not None]
        grids = {g.grid for g in geos if g.grid is not None and not g.dynamic}
        prefixes = {g.num_prefix_tokens for g in geos}
        out: dict[str, Any] = {}
        if len(grids) == 1 and self.config.grid is None:
            out["grid"] = list(next(iter(grids)))
        if len(prefixes) == 1 and self.config.num_prefix_tokens is None:
            out["num_prefix_tokens"] = next(iter(prefixes))
        return out

    def item_info(self, item: PlanItem) -> dict[str, Any]:
        large, small, _, _ = self.kernel_sizes(item.context)
        return {**super().item_info(item), "large_kernel": list(large), "small_kernel": list(small)}

    def describe_targets(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per target: layout, spatial dims, grid/size, kernel sizes and parameter count (does not modify model)."""
        out = []
        for item in self.plan(model):
            t: _Target = item.context
            large, small, _, _ = self.kernel_sizes(t)
            mode = self.config.mode_for(t.spatial_dims, large)
            out.append(
                {
                    "name": item.name,
                    "channels": t.channels,
                    "channel_dim": t.channel_dim,
                    "spatial_dims": t.spatial_dims,
                    "grid": t.geometry.grid if t.geometry is not None else None,
                    "size": t.size,
                    "large_kernel": large,
                    "small_kernel": small,
                    "mode": mode,
                    "parameters": dka_parameter_count(
                        t.channels, self.config.bottleneck, large, small, mode, self.config.batch_norm
                    ),
                }
            )
        return out


register_method("dka", DKAConfig, DKATuner)
