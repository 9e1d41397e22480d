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
``PatchEmbed`` flatten the patch grid that way). The grid comes from, in order: the config's
``grid_size``; the network (MONAI UNETR ``feat_size``; timm ``patch_embed.grid_size``; MONAI
``PatchEmbeddingBlock.n_patches`` when it is a perfect square/cube); otherwise the runtime token
count ``N`` (``N - p`` must be a perfect square/cube for p prefix tokens, p from
``num_prefix_tokens`` or tried as 0 then 1). The prefix count is ``N - prod(grid)``. A token count
that does not fit raises :class:`~monai_peft.errors.InputDataError`.

Shapes: block input ``(B, N, C)``; bypass ``(B, N, C) -> (B, N, m) -> (B, m, *grid) -> (B, N, C)``.

Not supported (rejected with the reason): Swin blocks (windowed attention on channel-last maps;
the reference code re-writes the whole Swin block) and token dropping (MAE-style masking): the
bypass needs the full patch grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from monai_peft.config import PeftConfig
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.methods.adapters import ParallelAdapterLayer, QuickGELU
from monai_peft.methods.base import AdapterLayer, WrappingTuner
from monai_peft.methods.layout import feature_layout
from monai_peft.registry import register_method
from monai_peft.targeting import get_submodule, innermost

__all__ = ["ConvBypass", "ConvpassConfig", "ConvpassLayer", "ConvpassTuner", "infer_token_grid", "token_grid"]

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
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
        grid_size: patch grid, e.g. ``[14, 14]`` or ``[6, 6, 4]``; needed only when the network
            does not tell it and the grid is not square/cubic.
        num_prefix_tokens: tokens before the patch tokens (CLS = 1); ``None`` = derived.
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
        self._require(isinstance(self.bottleneck, int) and self.bottleneck > 0, f"bottleneck must be a positive int, got {self.bottleneck!r}")
        self._require(
            isinstance(self.kernel_size, int) and self.kernel_size > 0 and self.kernel_size % 2 == 1,
            f"kernel_size must be a positive odd int (the grid keeps its size), got {self.kernel_size!r}",
        )
        self._require(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout!r}")
        self._require(self.conv_init in ("identity", "xavier"), f"conv_init must be 'identity' or 'xavier', got {self.conv_init!r}")
        self.positions = list(self.positions)
        self._require(
            len(self.positions) > 0 and set(self.positions) <= set(_POSITIONS) and len(set(self.positions)) == len(self.positions),
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
        self._require(self.spatial_dims in (None, 1, 2, 3), f"spatial_dims must be None, 1, 2 or 3, got {self.spatial_dims!r}")
        self.block_types = list(self.block_types)


# -------------------------------------------------------------------------------------------------
# token grid
# -------------------------------------------------------------------------------------------------
def _integer_root(n: int, k: int) -> int | None:
    """g with g**k == n, or None."""
    if n <= 0:
        return None
    g = int(round(n ** (1.0 / k)))
    for cand in (g - 1, g, g + 1):
        if cand > 0 and cand**k == n:
            return cand
    return None


def token_grid(
    n_tokens: int,
    spatial_dims: int,
    grid: tuple[int, ...] | None = None,
    num_prefix_tokens: int | None = None,
) -> tuple[tuple[int, ...], int]:
    """The patch grid and the number of prefix tokens of a sequence of ``n_tokens`` tokens.

    Args:
        n_tokens: N, the runtime token count (prefix tokens + patch tokens).
        spatial_dims: 1, 2 or 3.
        grid: the known patch grid; ``None`` = square/cubic grid derived from ``n_tokens``.
        num_prefix_tokens: the known prefix count; ``None`` = ``N - prod(grid)`` when ``grid`` is
            given, else tried as 0 then 1.

    Returns:
        ``(grid, prefix)`` with ``prefix + prod(grid) == n_tokens``.

    Raises:
        InputDataError: when the tokens cannot form that grid.
    """
    if grid is not None:
        prefix = n_tokens - math.prod(grid)
        if prefix < 0 or (num_prefix_tokens is not None and prefix != num_prefix_tokens):
            want = math.prod(grid) + (num_prefix_tokens or 0)
            raise InputDataError(
                f"the sequence has {n_tokens} tokens, which does not fit the {'x'.join(map(str, grid))} patch grid"
                f"{f' plus {num_prefix_tokens} prefix token(s)' if num_prefix_tokens else ''} (expected {want}); "
                "was the input resized, or tokens dropped (MAE masking)? Set grid_size/num_prefix_tokens to the "
                "grid of this input"
            )
        return tuple(grid), prefix
    candidates = (num_prefix_tokens,) if num_prefix_tokens is not None else (0, 1)
    for p in candidates:
        side = _integer_root(n_tokens - p, spatial_dims)
        if side is not None:
            return (side,) * spatial_dims, p
    shape = {1: "line", 2: "square", 3: "cube"}[spatial_dims]
    raise InputDataError(
        f"{n_tokens} tokens are not a {spatial_dims}D {shape} patch grid after {' or '.join(map(str, candidates))} "
        "prefix token(s); pass grid_size (e.g. [6, 6, 4] for a non-cubic volume) and num_prefix_tokens in the config"
    )


def infer_token_grid(model: nn.Module) -> tuple[tuple[int, ...] | None, int | None, int | None]:
    """What the network says about its patch grid: ``(grid or None, spatial_dims or None, prefix or None)``.

    Reads MONAI ``UNETR.feat_size``, MONAI ``PatchEmbeddingBlock`` (``n_patches`` and the rank of
    its projection) and timm ``PatchEmbed.grid_size`` / ``VisionTransformer.num_prefix_tokens``.
    Several different grids in one network give ``None`` (set ``grid_size`` explicitly).
    """
    grids: set[tuple[int, ...]] = set()
    dims: set[int] = set()
    prefixes: set[int] = set()
    cubic_counts: list[tuple[int, int]] = []
    for module in innermost(model).modules():
        module = innermost(module)
        cls = type(module).__name__
        if cls == "UNETR" and hasattr(module, "feat_size"):
            grids.add(tuple(int(g) for g in module.feat_size))
            prefixes.add(0)
        elif cls == "PatchEmbeddingBlock" and hasattr(module, "n_patches"):
            proj = innermost(module.patch_embeddings)
            d = None
            for sub in proj.modules():
                sub = innermost(sub)
                for k, conv in _CONVS.items():
                    if type(sub) is conv:
                        d = k
                lengths = getattr(sub, "axes_lengths", None)
                if d is None and isinstance(lengths, dict):
                    d = sum(1 for key in lengths if str(key).startswith("p"))
            if d:
                dims.add(d)
                cubic_counts.append((int(module.n_patches), d))
        elif hasattr(module, "grid_size") and hasattr(module, "num_patches") and cls.endswith("PatchEmbed"):
            if not getattr(module, "dynamic_img_size", False):
                grids.add(tuple(int(g) for g in module.grid_size))
            dims.add(len(tuple(module.grid_size)))
        if cls == "VisionTransformer" and isinstance(getattr(module, "num_prefix_tokens", None), int):
            prefixes.add(int(module.num_prefix_tokens))
    if not grids:
        for n, d in cubic_counts:
            side = _integer_root(n, d)
            if side is not None:
                grids.add((side,) * d)
    grid = next(iter(grids)) if len(grids) == 1 else None
    spatial = len(grid) if grid is not None else (next(iter(dims)) if len(dims) == 1 else None)
    prefix = next(iter(prefixes)) if len(prefixes) == 1 else None
    if not grids and cubic_counts and len(dims) == 1:
        n, d = cubic_counts[0]
        raise ConfigError(
            f"the ViT has {n} patches, which is not a {d}D square/cube grid, and it does not store the grid "
            "shape: pass grid_size (e.g. grid_size=[6, 6, 4] for a 96x96x64 volume with 16^3 patches)"
        )
    return grid, spatial, prefix


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
        grid: the known patch grid (None: derived from the token count at run time).
        num_prefix_tokens: known prefix count (None: derived).

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
        grid: tuple[int, ...] | None = None,
        num_prefix_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if grid is not None and len(grid) != spatial_dims:
            raise ConfigError(f"grid {grid} does not have spatial_dims={spatial_dims} entries")
        self.channels = channels
        self.bottleneck = bottleneck
        self.spatial_dims = spatial_dims
        self.grid = tuple(grid) if grid is not None else None
        self.num_prefix_tokens = num_prefix_tokens
        self.down = nn.Linear(channels, bottleneck)
        self.conv = _CONVS[spatial_dims](bottleneck, bottleneck, kernel_size, padding=kernel_size // 2)
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
        grid, p = token_grid(n, self.spatial_dims, self.grid, self.num_prefix_tokens)
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

    def extra_repr(self) -> str:
        return f"grid={self.grid}, prefix={self.num_prefix_tokens}, scale={float(self.scale)}"


class ConvpassLayer(ParallelAdapterLayer):
    """``attn(LN1 x) + s CB(LN1 x)`` (or the same for ``mlp``): ``base(z, ...) + bypass(z)``."""

    method_name = "convpass"


# -------------------------------------------------------------------------------------------------
# injection
# -------------------------------------------------------------------------------------------------
class ConvpassTuner(WrappingTuner):
    """Adds the two bypasses to every targeted ViT block (default: every block of the preset).

    Targets may be blocks (both bypasses, per ``positions``) or their ``attn`` / ``mlp`` sub-modules.
    """

    config_cls = ConvpassConfig
    default_roles = ("blocks",)
    applies_to = (
        "pre-norm ViT blocks on a patch-token grid (MONAI TransformerBlock, timm Block: x + attn(norm1 x), "
        "x + mlp(norm2 x)) and their attn/mlp sub-modules; not CNNs or Swin blocks"
    )
    config: ConvpassConfig

    def __init__(self, config: ConvpassConfig) -> None:
        super().__init__(config)
        self._model: nn.Module | None = None
        self._model_for_build: nn.Module | None = None
        self._grid: tuple[int, ...] | None = None
        self._spatial_dims: int | None = None
        self._prefix: int | None = None

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

    def _parent_block(self, name: str) -> nn.Module | None:
        parent, _, child = name.rpartition(".")
        if self._model is None or child not in _POSITIONS:
            return None
        block = innermost(get_submodule(self._model, parent)) if parent else innermost(self._model)
        return block if self.is_vit_block(block) else None

    def layer_class(self, name: str, module: nn.Module) -> type[AdapterLayer] | None:
        return ConvpassLayer if self._parent_block(name) is not None else None

    def plan(self, model: nn.Module) -> list[tuple[str, nn.Module, type[AdapterLayer]]]:
        cfg = self.config
        self._model = model
        try:
            if cfg.grid_size is not None:
                grid, spatial, prefix = tuple(cfg.grid_size), len(cfg.grid_size), None
            else:
                grid, spatial, prefix = infer_token_grid(model)
            result = super().plan(model)
        finally:
            self._model = None
        spatial = cfg.spatial_dims or spatial
        if spatial is None:
            raise ConfigError(
                f"convpass cannot tell whether the token grid of {type(innermost(model)).__name__} is 2D or 3D "
                "(no MONAI/timm patch embedding found); pass spatial_dims (and grid_size if not square/cubic)"
            )
        self._grid, self._spatial_dims = grid, spatial
        # with a known grid the prefix is whatever precedes it at run time (CLS, registers, VPT prompts);
        # the network's own prefix count only helps to find a grid from the token count
        self._prefix = cfg.num_prefix_tokens if cfg.num_prefix_tokens is not None else (prefix if grid is None else None)
        return result

    def build_adapter(self, name: str, module: nn.Module, layer_cls: type[AdapterLayer]) -> nn.Module:
        cfg = self.config
        parent, _, _ = name.rpartition(".")
        norm = None
        if self._model_for_build is not None:
            root = self._model_for_build
            norm = getattr(innermost(get_submodule(root, parent)) if parent else innermost(root), "norm1", None)
        if isinstance(norm, nn.LayerNorm):
            channels = int(norm.normalized_shape[-1])
        else:
            channels = feature_layout(module).in_channels
        assert self._spatial_dims is not None
        return ConvBypass(
            channels, cfg.bottleneck, self._spatial_dims, kernel_size=cfg.kernel_size, scale=cfg.scale,
            dropout=cfg.dropout, conv_init=cfg.conv_init, grid=self._grid, num_prefix_tokens=self._prefix,
        )

    def inject(self, model: nn.Module, adapter_name: str) -> None:
        self._model_for_build = model
        try:
            super().inject(model, adapter_name)
        finally:
            self._model_for_build = None


register_method("convpass", ConvpassConfig, ConvpassTuner)
