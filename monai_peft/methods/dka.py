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
    model = mp.get_peft_model(vit, mp.get_config("dka"), modules_to_save=["classification_head"])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError, MethodNotApplicableError, TargetingError
from monai_peft.methods.adapters import _ACTIVATIONS, BottleneckAdapter, SequentialAdapterLayer, make_activation
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.methods.layout import feature_layout
from monai_peft.networks.heads.tokens import infer_grid
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
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3, nn.ConvTranspose1d: 1, nn.ConvTranspose2d: 2, nn.ConvTranspose3d: 3}


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
        return _CONV_FN[d](x, weight, padding=padding, dilation=self.dilation, groups=self.channels)

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
# token grids
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGeometry:
    """What a network says about the token sequences its blocks see.

    Attributes:
        spatial_dims: 2 or 3, or None when unknown.
        grid: patch-token grid (row-major order), or None when unknown.
        num_prefix_tokens: CLS / distillation / register tokens before the patch tokens, or None.
        n_patches: patch count reported by a patch embedding (None when there is none).
        source: where the facts came from (for error messages).
    """

    spatial_dims: int | None = None
    grid: tuple[int, ...] | None = None
    num_prefix_tokens: int | None = None
    n_patches: int | None = None
    source: str = ""


def _int_tuple(value: Any) -> tuple[int, ...] | None:
    if isinstance(value, int):
        return None
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if out and all(v > 0 for v in out) else None


def _conv_dims(module: nn.Module) -> int | None:
    """Spatial rank of the first convolution in ``module`` (or of an einops patch ``Rearrange``), else None."""
    for m in module.modules():
        for cls, d in _CONVS.items():
            if isinstance(m, cls):
                return d
        pattern = getattr(m, "pattern", None)
        if isinstance(pattern, str) and "->" in pattern:  # MONAI "perceptron" patch embedding
            return pattern.split("->")[0].count("(") or None
    return None


def _ancestor_names(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def network_token_geometry(model: nn.Module, name: str) -> TokenGeometry:
    """Token grid facts for the module at canonical ``name``, read from it and its ancestors.

    Recognised (nearest ancestor first): a patch embedding (``patch_embedding`` of MONAI ``ViT`` /
    ``PatchEmbeddingBlock`` with ``n_patches``; timm's ``patch_embed`` with ``grid_size``), whose convolution
    gives 2D/3D; the owner's ``cls_token`` (its length = prefix count) or timm's ``num_prefix_tokens`` (a
    network with a patch embedding and neither has no prefix); an explicit ``spec.grid``
    (:class:`~monai_peft.networks.vit.MonaiViTBackbone`) or ``input_resolution`` (TinyViT blocks). A patch count
    that is a perfect square (2D) / cube (3D) gives the grid; other counts leave it unknown.
    """
    dims: int | None = None
    grid: tuple[int, ...] | None = None
    explicit: tuple[int, ...] | None = None
    prefix: int | None = None
    n_patches: int | None = None
    source = ""
    for anc in _ancestor_names(name):
        try:
            m = innermost(get_submodule(model, anc))
        except TargetingError:  # pragma: no cover - names come from the model
            continue
        if explicit is None:
            spec = getattr(m, "spec", None)
            explicit = _int_tuple(getattr(spec, "grid", None)) if spec is not None else None
            if explicit is None:
                explicit = _int_tuple(getattr(m, "input_resolution", None))
                if explicit is not None and prefix is None:
                    prefix = 0
            if explicit is not None:
                source = source or f"{type(m).__name__} at {anc or '<root>'!r}"
        if n_patches is None and grid is None:
            pe = getattr(m, "patch_embedding", None)
            if not isinstance(pe, nn.Module):
                pe = getattr(m, "patch_embed", None)
            if isinstance(pe, nn.Module):
                dims = _conv_dims(pe)
                grid = _int_tuple(getattr(pe, "grid_size", None))
                count = getattr(pe, "n_patches", getattr(pe, "num_patches", None))
                n_patches = int(count) if count is not None else None
                cls = getattr(m, "cls_token", None)
                if prefix is None:
                    if isinstance(cls, torch.Tensor) and cls.dim() == 3:
                        prefix = int(cls.shape[1])
                    elif isinstance(getattr(m, "num_prefix_tokens", None), int):
                        prefix = int(m.num_prefix_tokens)
                    else:
                        prefix = 0
                source = source or f"{type(m).__name__}.{'patch_embedding' if hasattr(m, 'patch_embedding') else 'patch_embed'}"
    if explicit is not None:
        grid = explicit
    if dims is None and grid is not None:
        dims = len(grid)
    if grid is None and n_patches is not None and dims is not None:
        try:
            grid = infer_grid(n_patches, dims)
        except InputDataError:
            grid = None
    return TokenGeometry(dims, grid, prefix, n_patches, source)


def resolve_token_grid(
    num_tokens: int,
    spatial_dims: int,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
) -> tuple[int, tuple[int, ...]]:
    """``(P, grid)`` of a runtime sequence of ``num_tokens`` tokens.

    Rules: with a known ``grid``, ``P = num_tokens - prod(grid)`` (it must be >= 0 and >= a known
    ``num_prefix_tokens``: extra tokens, e.g. prompts inserted after the CLS token, count as prefix tokens and
    bypass the convolutions); otherwise ``P = num_prefix_tokens`` (or, when unknown, the first of 0, 1 that
    leaves a perfect square/cube) and the grid is that square/cube.

    Raises:
        InputDataError: the token count is not ``P + a grid``.
    """
    if grid is not None:
        grid = tuple(int(g) for g in grid)
        extra = num_tokens - math.prod(grid)
        if extra >= 0 and (num_prefix_tokens is None or extra >= num_prefix_tokens):
            return extra, grid
        raise InputDataError(
            f"DKA: a sequence of {num_tokens} tokens cannot hold the {grid} patch grid"
            + (f" plus {num_prefix_tokens} prefix token(s)" if num_prefix_tokens else "")
            + "; check the image size / patch size, or set DKAConfig.grid / num_prefix_tokens"
        )
    candidates = [num_prefix_tokens] if num_prefix_tokens is not None else [0, 1]
    for p in candidates:
        if 0 <= p < num_tokens:
            try:
                return p, infer_grid(num_tokens - p, spatial_dims)
            except InputDataError:
                continue
    raise InputDataError(
        f"DKA: {num_tokens} tokens minus {' or '.join(map(str, candidates))} prefix token(s) is not a "
        f"{'square' if spatial_dims == 2 else 'cube'} token grid, so the patch tokens cannot be arranged in "
        f"{spatial_dims}D; pass DKAConfig(grid=[...]) (image size // patch size) and/or num_prefix_tokens, or "
        "target modules whose outputs are whole token grids (e.g. not MAE-masked sequences)"
    )


# ---------------------------------------------------------------------------------------------
# the adapter
# ---------------------------------------------------------------------------------------------
class DualKernelAdapter(BottleneckAdapter):
    """The DKA branch ``Dropout(GELU(DW_large(Z) + DW_small(Z))) W_up`` with ``Z = GELU(x W_down)`` (no residual).

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
        grid / num_prefix_tokens: token-grid facts for token inputs (see :func:`resolve_token_grid`).

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
        grid: Sequence[int] | None = None,
        num_prefix_tokens: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(
            channels, channels, bottleneck, activation=activation, dropout=dropout, channel_dim=channel_dim, bias=False,
            down_init="kaiming",
        )
        if not zero_init:
            self.up.reset_parameters()  # PyTorch default (the reference code), not Houlsby's zeros
        if large_kernel_mode not in ("full", "separable", "dilated"):
            raise ConfigError(f"large_kernel_mode must be 'full', 'separable' or 'dilated', got {large_kernel_mode!r}")
        self.spatial_dims = spatial_dims
        self.grid = tuple(grid) if grid is not None else None
        self.num_prefix_tokens = num_prefix_tokens
        self.large_kernel_mode = large_kernel_mode
        if large_kernel_mode == "dilated":
            taps, dilation = dilated_kernel(large_kernel)
            self.large = DepthwiseConv(bottleneck, taps, init_kernel_size=large_init, backend=backend, dilation=dilation)
        else:
            large_cls = DepthwiseConv if large_kernel_mode == "full" else SeparableDepthwiseConv
            self.large = large_cls(bottleneck, large_kernel, init_kernel_size=large_init, backend=backend)
        self.small = DepthwiseConv(bottleneck, small_kernel, init_kernel_size=small_init, backend=backend)
        self.act_out = make_activation(activation)

    def _mix(self, zmap: torch.Tensor) -> torch.Tensor:
        return self.large(zmap) + self.small(zmap)

    def token_grid(self, num_tokens: int) -> tuple[int, tuple[int, ...]]:
        """``(prefix tokens, grid)`` for a sequence of ``num_tokens`` tokens (see :func:`resolve_token_grid`)."""
        return resolve_token_grid(num_tokens, self.spatial_dims, self.grid, self.num_prefix_tokens)

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
) -> int:
    """Weights of one DKA (no biases): ``m (2C + |large| + |small|)``, ``|small| = prod(k_s)`` and ``|large| =
    prod(k)`` (full), ``sum(k)`` (separable) or ``prod(dilated_kernel(k)[0])`` (dilated); ``large_kernel`` is the
    (clamped) dense span. 2D full: ``m (2C + k_l^2 + k_s^2)``."""
    if large_kernel_mode == "full":
        large = math.prod(large_kernel)
    elif large_kernel_mode == "separable":
        large = sum(large_kernel)
    else:
        large = math.prod(dilated_kernel(large_kernel)[0])
    return bottleneck * (2 * channels + large + math.prod(small_kernel))


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
        clamp_kernels: clamp kernels to ``2 n - 1`` per axis where the size ``n`` is known at injection.
        grid: patch-token grid (``image size // patch size``) when the network cannot tell it (non-square
            inputs of networks without an explicit grid); default: read from the network / square or cube.
        num_prefix_tokens: CLS/prefix tokens before the patch tokens; default: from the network, else inferred.
        spatial_dims: 2 or 3 when the network cannot tell it (token sequences default to the patch embedding's,
            else 2; CNN blocks to their convolutions).
        input_shape: ``[C, *spatial]`` of the network input; if given, one probe forward at injection records each
            target's feature-map size so CNN/Swin kernels are clamped (and the parameter count is the real one).
        conv_backend: ``"auto"`` (FFT for kernels with > 900 taps), ``"direct"`` or ``"fft"``.
    """

    bottleneck: int = 16
    large_kernel: int = 51
    small_kernel: int = 5
    large_kernel_mode: str = "auto"
    activation: str = "gelu"
    dropout: float = 0.1
    zero_init: bool = False
    adapters_per_block: int = 1
    clamp_kernels: bool = True
    grid: list[int] | None = None
    num_prefix_tokens: int | None = None
    spatial_dims: int | None = None
    input_shape: list[int] | None = None
    conv_backend: str = "auto"

    def validate(self) -> None:
        req = self._require
        req(isinstance(self.bottleneck, int) and self.bottleneck > 0, f"bottleneck must be a positive int, got {self.bottleneck!r}")
        for name in ("large_kernel", "small_kernel"):
            k = getattr(self, name)
            req(isinstance(k, int) and k > 0 and k % 2 == 1, f"{name} must be a positive odd int ('same' padding), got {k!r}")
        req(self.large_kernel_mode in _MODES, f"large_kernel_mode must be one of {_MODES}, got {self.large_kernel_mode!r}")
        req(self.activation in _ACTIVATIONS, f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}")
        req(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        req(self.adapters_per_block in (1, 2), f"adapters_per_block must be 1 or 2, got {self.adapters_per_block!r}")
        req(self.spatial_dims in (None, 2, 3), f"spatial_dims must be None, 2 or 3, got {self.spatial_dims!r}")
        req(self.conv_backend in _BACKENDS, f"conv_backend must be one of {_BACKENDS}, got {self.conv_backend!r}")
        req(self.num_prefix_tokens is None or (isinstance(self.num_prefix_tokens, int) and self.num_prefix_tokens >= 0),
            f"num_prefix_tokens must be None or an int >= 0, got {self.num_prefix_tokens!r}")
        if self.grid is not None:
            grid = _int_tuple(self.grid)
            req(grid is not None and len(grid) in (2, 3), f"grid must be 2 or 3 positive ints, got {self.grid!r}")
            req(self.spatial_dims is None or len(grid) == self.spatial_dims, f"grid {self.grid} does not have spatial_dims={self.spatial_dims} entries")
            self.grid = list(grid)
        if self.input_shape is not None:
            shape = _int_tuple(self.input_shape)
            req(shape is not None and len(shape) in (3, 4), f"input_shape must be [C, H, W] or [C, D, H, W], got {self.input_shape!r}")
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
    channels: int
    channel_dim: int
    spatial_dims: int
    grid: tuple[int, ...] | None = None
    num_prefix_tokens: int | None = None
    size: tuple[int, ...] | None = None  # spatial size used to clamp kernels


class _NotApplicable(Exception):
    pass


def _is_swin_block(m: nn.Module) -> bool:
    return hasattr(m, "window_size") and hasattr(m, "shift_size") and not hasattr(m, "qkv")


def _is_window_attention(m: nn.Module) -> bool:
    return hasattr(m, "window_size") and (hasattr(m, "qkv") or hasattr(m, "relative_position_bias_table"))


def _norm_dims(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, _BatchNorm | _InstanceNorm):
            name = type(m).__name__
            if name[-2:] in ("1d", "2d", "3d"):
                return int(name[-2])
    return None


class DKATuner(WrappingTuner):
    """Wraps each target (transformer block, Swin block, CNN block; or sub-layers) in a :class:`DKALayer`."""

    config_cls = DKAConfig
    default_roles = ("blocks",)
    applies_to = (
        "transformer blocks or sub-layers whose output is a full token grid (prefix tokens allowed), Swin blocks "
        "(channel-last maps) and CNN blocks (channel-first maps), 2D or 3D"
    )
    config: DKAConfig

    def __init__(self, config: DKAConfig) -> None:
        super().__init__(config)
        self._targets: dict[str, _Target] = {}

    # -- selection ------------------------------------------------------------------------------
    def _roles(self) -> tuple[str, ...]:
        return ("blocks",) if self.config.adapters_per_block == 1 else ("sublayers",)

    def _names(self, model: nn.Module) -> list[str]:
        cfg = self.config
        if cfg.adapters_per_block == 2 and cfg.target_modules is None and not cfg.target_types:
            preset = self.preset(model)
            if preset is None or preset.role("sublayers") is None:
                net = type(innermost(model)).__name__
                raise MethodNotApplicableError(
                    f"dka: adapters_per_block=2 places a DKA after the attention and after the MLP of every "
                    f"transformer block, but {net} has no such sub-layers in its preset; use adapters_per_block=1 "
                    "or pass target_modules"
                )
        return self.resolve(model, *self._roles())

    def _describe(self, model: nn.Module, name: str, module: nn.Module) -> _Target:
        cfg = self.config
        if _is_window_attention(module):
            raise _NotApplicable(
                "window attention runs on batches of (shifted) windows, not on the feature map; place DKA after the "
                "whole Swin block (adapters_per_block=1)"
            )
        try:
            layout = feature_layout(module)
        except TargetingError as exc:
            raise _NotApplicable(str(exc)) from exc
        c = layout.out_channels
        # token blocks that carry their grid (TinyViT / LiteMedSAM: (B, H*W, C) in and out, though their last
        # registered layer is a convolution applied inside the block)
        if _int_tuple(getattr(module, "input_resolution", None)) is not None and hasattr(module, "attn"):
            layout = type(layout)(layout.in_channels, c, -1)
        if layout.channel_dim == 1:
            dims = cfg.spatial_dims or _conv_dims(module) or _norm_dims(module)
            if dims is None:
                raise _NotApplicable("cannot tell whether its feature maps are 2D or 3D; set DKAConfig.spatial_dims")
            if dims not in (2, 3):
                raise _NotApplicable(f"its feature maps are {dims}D; DKA supports 2D and 3D")
            return _Target(c, 1, dims)
        # channel-last: Swin maps (B, *spatial, C) or token sequences (B, P + N, C)
        for anc in _ancestor_names(name):
            m = innermost(get_submodule(model, anc))
            if _is_swin_block(m):
                return _Target(c, -1, cfg.spatial_dims or len(tuple(m.window_size)))
        geo = network_token_geometry(model, name)
        dims = cfg.spatial_dims or geo.spatial_dims or (len(cfg.grid) if cfg.grid else None) or 2
        grid = tuple(cfg.grid) if cfg.grid is not None else geo.grid
        if grid is None and geo.n_patches is not None:
            raise _NotApplicable(
                f"{geo.source} has {geo.n_patches} patches, not a {'square' if dims == 2 else 'cube'}, and the network "
                "does not store its grid; pass DKAConfig(grid=[image size // patch size per axis])"
            )
        if grid is not None and len(grid) != dims:
            raise _NotApplicable(f"token grid {grid} is not {dims}D")
        prefix = cfg.num_prefix_tokens if cfg.num_prefix_tokens is not None else geo.num_prefix_tokens
        return _Target(c, -1, dims, grid, prefix, grid)

    def _probe_sizes(self, model: nn.Module, names: list[str], targets: dict[str, _Target]) -> dict[str, tuple[int, ...]]:
        """Spatial size of each target's output for one zero input of ``input_shape`` (eval, no grad)."""
        shape = tuple(self.config.input_shape or ())
        sizes: dict[str, tuple[int, ...]] = {}
        hooks = []
        for name in names:
            t = targets[name]

            def hook(_m: nn.Module, _i: Any, out: Any, name: str = name, t: _Target = t) -> None:
                y = out[0] if isinstance(out, tuple | list) else out
                if isinstance(y, torch.Tensor) and y.dim() == t.spatial_dims + 2:
                    sizes[name] = tuple(y.shape[2:]) if t.channel_dim == 1 else tuple(y.shape[1:-1])

            hooks.append(get_submodule(model, name).register_forward_hook(hook))
        modes = [(m, m.training) for m in model.modules()]
        ref = next(iter(model.parameters()), None)
        x = torch.zeros(1, *shape, device=ref.device if ref is not None else None, dtype=ref.dtype if ref is not None else None)
        try:
            model.eval()
            with torch.no_grad():
                model(x)
        except Exception as exc:
            raise ConfigError(f"dka: the probe forward with input_shape={list(shape)} failed ({exc}); fix input_shape") from exc
        finally:
            for h in hooks:
                h.remove()
            for m, mode in modes:
                m.training = mode
        return sizes

    def plan(self, model: nn.Module) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        names = self._names(model)
        targets: dict[str, _Target] = {}
        rejected: list[str] = []
        for name in names:
            module = innermost(get_submodule(model, name))
            try:
                targets[name] = self._describe(model, name, module)
            except _NotApplicable as exc:
                rejected.append(f"{name} ({type(module).__name__}): {exc}")
        if rejected:
            more = f" (and {len(rejected) - 4} more)" if len(rejected) > 4 else ""
            raise MethodNotApplicableError(
                f"dka cannot adapt {'; '.join(rejected[:4])}{more}. It applies to {self.applies_to}"
            )
        if self.config.input_shape is not None:
            sizes = self._probe_sizes(model, names, targets)
            for name, size in sizes.items():
                t = targets[name]
                targets[name] = _Target(t.channels, t.channel_dim, t.spatial_dims, t.grid, t.num_prefix_tokens, size)
        self._targets = targets
        self.check_targets(model, names)
        return [(n, innermost(get_submodule(model, n)), DKALayer) for n in names]

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return DKALayer

    def kernel_sizes(self, target: _Target) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        """(large, small, configured large, configured small) kernel sizes for one target."""
        d = target.spatial_dims
        large0, small0 = (self.config.large_kernel,) * d, (self.config.small_kernel,) * d
        size = target.size if self.config.clamp_kernels else None
        return clamp_kernel(large0, size), clamp_kernel(small0, size), large0, small0

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        t = self._targets[name]
        cfg = self.config
        large, small, large0, small0 = self.kernel_sizes(t)
        return DualKernelAdapter(
            t.channels, cfg.bottleneck, spatial_dims=t.spatial_dims, channel_dim=t.channel_dim, large_kernel=large,
            small_kernel=small, large_init=large0, small_init=small0, large_kernel_mode=cfg.mode_for(t.spatial_dims, large),
            activation=cfg.activation, dropout=cfg.dropout, zero_init=cfg.zero_init, grid=t.grid,
            num_prefix_tokens=t.num_prefix_tokens, backend=cfg.conv_backend,
        )

    def describe_targets(self, model: nn.Module) -> list[dict[str, Any]]:
        """Per target: layout, spatial dims, grid/size, kernel sizes and parameter count (does not modify model)."""
        out = []
        for name, _, _ in self.plan(model):
            t = self._targets[name]
            large, small, _, _ = self.kernel_sizes(t)
            mode = self.config.mode_for(t.spatial_dims, large)
            out.append({
                "name": name, "channels": t.channels, "channel_dim": t.channel_dim, "spatial_dims": t.spatial_dims,
                "grid": t.grid, "size": t.size, "large_kernel": large, "small_kernel": small, "mode": mode,
                "parameters": dka_parameter_count(t.channels, self.config.bottleneck, large, small, mode),
            })
        return out


register_method("dka", DKAConfig, DKATuner)
