"""Convpass: convolutional bypasses for ViTs (Jie & Deng, "Convolutional Bypasses Are Better Vision
Transformer Adapters", arXiv:2207.07039, 2022; reference code ``JieShibo/PETL-ViT/convpass``).

Two bypasses per pre-norm ViT block, in parallel with the attention and the MLP::

    x <- x + MHSA(LN1 x) + s * CB(LN1 x)
    x <- x + MLP(LN2 x)  + s * CB(LN2 x)

    CB(z) = Up(Dropout(QuickGELU(Conv_kxk(QuickGELU(Down z)))))          QuickGELU(a) = a * sigmoid(1.702 a)

- ``Down``: Linear C -> m (m = 8), xavier-uniform weight, zero bias;
- ``Conv_kxk``: m -> m convolution with k = 3 and zero padding ``k // 2`` on the *patch-token
  grid* (tokens reshaped to ``(B, m, *grid)``); weight initialised to the identity at the centre
  tap (``conv_init="identity"``) or xavier-uniform (``"xavier"``, most of the paper's VTAB
  configs); zero bias;
- prefix tokens (CLS, registers) are not on the grid: each goes through the *same* convolution as
  a ``1 x 1`` (``1 x 1 x 1``) map, so it only meets the centre tap and the bias (the reference
  code does this for the CLS token);
- ``Up``: Linear m -> C, zero weight and bias, so a fresh Convpass is an exact identity;
- Dropout 0.1, scale ``s`` (the paper searches s in {0.01, 0.1, 1, 10, 100} per data set).

Implementation: the bypass is an :class:`~monai_peft.methods.adapters.ParallelAdapterLayer`
around the block's ``attn`` and ``mlp`` sub-modules. Their input *is* ``LN1 x`` / ``LN2 x``, so
``attn(LN1 x) + s CB(LN1 x)`` is exactly the equation above and the block's own forward (drop-path,
LayerScale of timm blocks, MONAI's cross-attention option) is untouched. In timm blocks the bypass
therefore also passes through ``ls1``/``drop_path1`` (identity by default), as in the reference
code, which applies ``drop_path`` to the bypass too.

Token grid (2D: ``H x W`` with a 3x3 kernel; 3D: ``D x H x W`` with 3x3x3, our extension): the
tokens after the prefix are the patches in row-major order (MONAI ``PatchEmbeddingBlock`` and timm
``PatchEmbed`` flatten the patch grid that way). The grid of every forward pass is read from the input
of the patch embedding (:mod:`~monai_peft.methods.token_geometry`), so non-square and anisotropic
inputs and timm's ``dynamic_img_size`` at another resolution get their true grid; without a patch
embedding, the config's ``grid_size`` or a grid the network stores is used, and it is never guessed from
the token count. The tokens before the last ``prod(grid)`` are prefix tokens (at least the network's
CLS / register tokens). A token count that does not fit raises :class:`~monai_peft.errors.InputDataError`.

Shapes: block input ``(B, N, C)``; bypass ``(B, N, C) -> (B, N, m) -> (B, m, *grid) -> (B, N, C)``.

Not supported (rejected with the reason): Swin blocks (windowed attention on channel-last maps;
the reference code re-writes the whole Swin block) and token dropping (MAE-style masking): the
bypass needs the full patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.methods.adapters import ParallelAdapterLayer
from monai_peft.methods.base import PlanItem, WrappingTuner
from monai_peft.methods.common import CONV_BY_DIMS, QuickGELU
from monai_peft.methods.layout import feature_layout
from monai_peft.methods.token_geometry import GridContext, TokenGeometry, TokenGrid, attach_grid_probes, token_geometry
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = ["ConvBypass", "ConvpassConfig", "ConvpassLayer", "ConvpassTuner"]

_GRID_HINT = "pass ConvpassConfig(grid_size=[image size // patch size per axis])"
_POSITIONS = ("attn", "mlp")


@dataclass
class ConvpassConfig(PeftConfig):
    """Configuration of Convpass.

    Args:
        bottleneck: width m of the bypass (paper: 8).
        kernel_size: k of the grid convolution (paper: 3; odd).
        scale: output scale s (paper: per data set in {0.01, 0.1, 1, 10, 100}).
        dropout: dropout after the second activation (paper: 0.1).
        conv_init: ``"identity"`` (centre tap = identity, the code's default) or ``"xavier"``.
        positions: which bypasses: ``["attn", "mlp"]`` (Convpass) or ``["attn"]`` (the
            reference code's ``convpass_attn`` variant).
        grid_size: patch grid, e.g. ``[14, 14]`` or ``[6, 6, 4]``; needed only for networks whose patch
            embedding cannot be found (the grid of each forward pass is read from it otherwise).
        num_prefix_tokens: the network's own tokens before the patch tokens (CLS = 1); ``None``: the network's.
        spatial_dims: 2 or 3 when it cannot be read from the network's patch embedding.
        block_types: class names of the pre-norm ViT blocks Convpass may adapt (they must have
            ``norm1``, ``attn``, ``norm2`` and ``mlp`` and compute ``x + attn(norm1 x)`` and
            ``x + mlp(norm2 x)``): MONAI ``TransformerBlock`` and timm ``Block``.
    """

    bottleneck: int = 8
    kernel_size: int = 3
    scale: float = 1.0
    dropout: float = 0.1
    conv_init: str = "identity"
    positions: list[str] = field(default_factory=lambda: ["attn", "mlp"])
    grid_size: list[int] | None = None
    num_prefix_tokens: int | None = None
    spatial_dims: int | None = None
    block_types: list[str] = field(default_factory=lambda: ["TransformerBlock", "Block"])

    def validate(self) -> None:
        self._require(
            isinstance(self.bottleneck, int) and self.bottleneck > 0,
            f"bottleneck must be a positive int, got {self.bottleneck!r}",
        )
        self._require(
            isinstance(self.kernel_size, int) and self.kernel_size > 0 and self.kernel_size % 2 == 1,
            f"kernel_size must be a positive odd int (the grid keeps its size), got {self.kernel_size!r}",
        )
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        self._require(
            self.conv_init in ("identity", "xavier"),
            f"conv_init must be 'identity' or 'xavier', got {self.conv_init!r}",
        )
        self.positions = list(self.positions)
        self._require(
            len(self.positions) > 0
            and set(self.positions) <= set(_POSITIONS)
            and len(set(self.positions)) == len(self.positions),
            f"positions must be a non-empty subset of {list(_POSITIONS)}, got {self.positions!r}",
        )
        if self.grid_size is not None:
            self.grid_size = [int(g) for g in self.grid_size]
            self._require(
                1 <= len(self.grid_size) <= 3 and all(g > 0 for g in self.grid_size),
                f"grid_size must hold 1 to 3 positive ints, got {self.grid_size!r}",
            )
            self._require(
                self.spatial_dims is None or self.spatial_dims == len(self.grid_size),
                f"spatial_dims={self.spatial_dims} contradicts grid_size={self.grid_size}",
            )
        self._require(
            self.num_prefix_tokens is None or (isinstance(self.num_prefix_tokens, int) and self.num_prefix_tokens >= 0),
            f"num_prefix_tokens must be None or an int >= 0, got {self.num_prefix_tokens!r}",
        )
        self._require(
            self.spatial_dims in (None, 1, 2, 3), f"spatial_dims must be None, 1, 2 or 3, got {self.spatial_dims!r}"
        )
        self.block_types = list(self.block_types)


# -------------------------------------------------------------------------------------------------
# the bypass
# -------------------------------------------------------------------------------------------------
class ConvBypass(nn.Module):
    """``s * Up(Dropout(QuickGELU(Conv(QuickGELU(Down z)))))`` on a token sequence.

    Args:
        channels: C of the tokens.
        bottleneck: m.
        spatial_dims: rank of the patch grid (2: Conv2d 3x3, 3: Conv3d 3x3x3).
        kernel_size: k (odd).
        scale: s.
        dropout: dropout probability.
        conv_init: ``"identity"`` or ``"xavier"``.
        grid: a static patch grid (used when ``tokens`` is not given).
        num_prefix_tokens: the network's prefix count (used when ``tokens`` is not given).
        tokens: the :class:`~monai_peft.methods.token_geometry.TokenGrid` that splits each sequence (follows
            the runtime grid of the patch embedding).

    Shapes: ``z`` (B, N, C) -> (B, N, C); N = prefix + prod(grid).
    """

    def __init__(
        self,
        channels: int,
        bottleneck: int,
        spatial_dims: int,
        *,
        kernel_size: int = 3,
        scale: float = 1.0,
        dropout: float = 0.1,
        conv_init: str = "identity",
        grid: Sequence[int] | None = None,
        num_prefix_tokens: int | None = None,
        tokens: TokenGrid | None = None,
    ) -> None:
        super().__init__()
        if grid is not None and len(grid) != spatial_dims:
            raise ConfigError(f"grid {grid} does not have spatial_dims={spatial_dims} entries")
        self.channels = channels
        self.bottleneck = bottleneck
        self.spatial_dims = spatial_dims
        if tokens is None:
            tokens = TokenGrid(
                spatial_dims,
                tuple(int(g) for g in grid) if grid is not None else None,
                num_prefix_tokens or 0,
                hint=_GRID_HINT,
            )
        self.tokens = tokens
        self.down = nn.Linear(channels, bottleneck)
        self.conv = CONV_BY_DIMS[spatial_dims](bottleneck, bottleneck, kernel_size, padding=kernel_size // 2)
        self.up = nn.Linear(bottleneck, channels)
        self.act = QuickGELU()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("scale", torch.tensor(float(scale)), persistent=False)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if conv_init == "identity":
            with torch.no_grad():
                self.conv.weight.zero_()
                centre = (slice(None), slice(None)) + (kernel_size // 2,) * spatial_dims
                self.conv.weight[centre] = torch.eye(bottleneck)
        else:
            nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if z.dim() != 3 or z.shape[-1] != self.channels:
            raise InputDataError(
                f"Convpass expects tokens of shape (B, N, {self.channels}), got {tuple(z.shape)}; it adapts the "
                "attention/MLP of plain ViT blocks (not Swin blocks or channel-first maps)"
            )
        b, n, _ = z.shape
        p, grid = self.tokens.split(n)
        h = self.act(self.down(z))  # (B, N, m)
        m = self.bottleneck
        patches = h[:, p:].transpose(1, 2).reshape(b, m, *grid)
        patches = self.conv(patches).flatten(2).transpose(1, 2)  # (B, prod(grid), m)
        if p:
            prefix = h[:, :p].reshape(b * p, m, *((1,) * self.spatial_dims))
            prefix = self.conv(prefix).reshape(b, p, m)
            h = torch.cat([prefix, patches], dim=1)
        else:
            h = patches
        return self.up(self.dropout(self.act(h))) * self.scale

    @property
    def grid(self) -> tuple[int, ...] | None:
        """The static patch grid (None: only the runtime grid is known)."""
        return self.tokens.static

    @property
    def num_prefix_tokens(self) -> int:
        return self.tokens.min_prefix

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.num_prefix_tokens}, scale={float(self.scale)}"


class ConvpassLayer(ParallelAdapterLayer):
    """``attn(LN1 x) + s CB(LN1 x)`` (or the same for ``mlp``): ``base(z, ...) + bypass(z)``."""

    method_name = "convpass"


# -------------------------------------------------------------------------------------------------
# injection
# -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Bypass:
    """Plan context of one bypass: token width and token geometry."""

    channels: int
    geometry: TokenGeometry

    def to_dict(self) -> dict[str, Any]:
        return {"channels": self.channels, "tokens": self.geometry.to_dict()}


class ConvpassTuner(WrappingTuner):
    """Adds the two bypasses to every targeted ViT block (default: every block of the preset).

    Targets may be blocks (both bypasses, per ``positions``) or their ``attn`` / ``mlp`` sub-modules.
    """

    config_cls = ConvpassConfig
    default_roles = ("block",)
    applies_to = (
        "pre-norm ViT blocks on a patch-token grid (MONAI TransformerBlock, timm Block: x + attn(norm1 x), "
        "x + mlp(norm2 x)) and their attn/mlp sub-modules; not CNNs or Swin blocks"
    )
    config: ConvpassConfig

    def is_vit_block(self, module: nn.Module) -> bool:
        module = innermost(module)
        return type(module).__name__ in self.config.block_types and all(
            hasattr(module, a) for a in ("norm1", "attn", "norm2", "mlp")
        )

    def resolve(self, model: nn.Module, *default_roles: str) -> list[str]:
        names = super().resolve(model, *default_roles)
        out: list[str] = []
        for name in names:
            if self.is_vit_block(get_submodule(model, name)):
                out += [f"{name}.{pos}" for pos in self.config.positions]
            else:
                out.append(name)
        return list(dict.fromkeys(out))

    def plan_item(self, model: nn.Module, name: str, module: nn.Module) -> PlanItem | str:
        cfg = self.config
        parent, _, child = name.rpartition(".")
        block = innermost(get_submodule(model, parent)) if parent else innermost(model)
        if child not in _POSITIONS or not self.is_vit_block(block):
            return ""
        norm = getattr(block, "norm1", None)
        channels = (
            int(norm.normalized_shape[-1]) if isinstance(norm, nn.LayerNorm) else feature_layout(module).in_channels
        )
        geo = token_geometry(
            model, name, grid=cfg.grid_size, num_prefix_tokens=cfg.num_prefix_tokens, spatial_dims=cfg.spatial_dims
        )
        if geo.spatial_dims is None:
            raise ConfigError(
                f"convpass cannot tell whether the token grid of {type(innermost(model)).__name__} is 2D or 3D "
                "(no MONAI/timm patch embedding found); pass spatial_dims and grid_size"
            )
        return PlanItem(name, module, ConvpassLayer, _Bypass(channels, geo))

    def prepare(self, model: nn.Module, plan: list[PlanItem], adapter_name: str) -> dict[str, GridContext]:
        """Probe the patch embedding(s), so each forward pass's grid is known."""
        return attach_grid_probes(model, [i.context.geometry for i in plan], adapter_name)

    def build(self, item: PlanItem, shared: dict[str, GridContext]) -> nn.Module:
        cfg = self.config
        t: _Bypass = item.context
        ctx = shared.get(t.geometry.patch_embed) if t.geometry.patch_embed is not None else None
        return ConvBypass(
            t.channels,
            cfg.bottleneck,
            int(t.geometry.spatial_dims or 2),
            kernel_size=cfg.kernel_size,
            scale=cfg.scale,
            dropout=cfg.dropout,
            conv_init=cfg.conv_init,
            tokens=TokenGrid.from_geometry(t.geometry, ctx, _GRID_HINT),
        )

    def resolved_fields(self, model: nn.Module, plan: list[PlanItem]) -> dict[str, Any]:
        geos = [i.context.geometry for i in plan]
        out: dict[str, Any] = {}
        grids = {g.grid for g in geos if g.grid is not None and not g.dynamic}
        if len(grids) == 1 and self.config.grid_size is None:
            out["grid_size"] = list(next(iter(grids)))
        prefixes = {g.num_prefix_tokens for g in geos}
        if len(prefixes) == 1 and self.config.num_prefix_tokens is None:
            out["num_prefix_tokens"] = next(iter(prefixes))
        dims = {g.spatial_dims for g in geos}
        if len(dims) == 1 and self.config.spatial_dims is None:
            out["spatial_dims"] = next(iter(dims))
        return out


register_method("convpass", ConvpassConfig, ConvpassTuner)
