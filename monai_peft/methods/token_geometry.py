"""Token geometry: where the patch tokens of a ViT-like network sit, read from the network, never guessed.

A plain ViT (MONAI ``ViT`` / ``PatchEmbeddingBlock``, timm ``VisionTransformer`` / ``PatchEmbed``) turns an
input of spatial size ``S`` into ``N = prod(grid)`` patch tokens, ``grid = S // patch`` (``ceil`` with timm's
``dynamic_img_pad``), flattened in row-major order and preceded by ``P`` *prefix tokens*::

    tokens (B, P + N, C) = [prefix_1 .. prefix_P | patch_(0,0) .. patch_(g1-1, g2-1)]

This module is the one place that knows this layout. DKA, Convpass, VPT/VP and EPT use it.

**The rule for prefix tokens** (one rule for every method): the patch tokens are the *last*
``prod(grid)`` tokens of a sequence; every token before them is a prefix token. There must be at least
the network's own prefix tokens (CLS, distillation, register tokens); more are allowed (e.g. VPT's prompt
tokens inserted after CLS) and count as prefix tokens. A method that needs an exact count (EPT keeps one
prompt row per token position) checks it itself.

**The grid.** Two facts are kept apart:

- the *static* grid: known when the adapter is built, used to size things (DKA's kernel clamping, EPT's
  prompt rows). It comes from, in order: the config (``grid`` / ``input_shape``), then the network: timm's
  ``patch_embed.grid_size`` (fixed-size models), UNETR's ``feat_size``, an ``img_size`` stored next to the
  patch embedding (MONAI ``MaskedAutoEncoderViT``), the ``spec.grid`` of
  :class:`~monai_peft.networks.vit.MonaiViTBackbone`, a block's ``input_resolution`` (TinyViT). MONAI's
  plain ``ViT`` stores only the patch *count* (``n_patches``): its grid is unknown, and a square or cube
  count is **not** taken as a square or cube grid (a 256 x 64 image with 16-px patches has 64 patches on a
  16 x 4 grid, not 8 x 8).
- the *runtime* grid: the grid of the forward pass being run. A :class:`GridProbe` on the patch embedding
  records ``input size // patch`` on every forward pass (timm ``dynamic_img_size`` models run at another
  resolution, MONAI ViTs whose grid is not stored), and the adapters of the same adapter read it through a
  shared :class:`GridContext`. Without a patch embedding to probe, the static grid is used.

Where a grid is needed and neither is known, an error says what to pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from monai_peft.errors import ConfigError, InputDataError, TargetingError
from monai_peft.methods.base import AdapterLayer
from monai_peft.methods.common import conv_dims
from monai_peft.targeting import canonical_named_modules, get_submodule, innermost

__all__ = [
    "GridContext",
    "GridProbe",
    "GridProbeLayer",
    "TokenGeometry",
    "TokenGrid",
    "attach_grid_probes",
    "int_tuple",
    "token_geometry",
    "wrap_module",
]


def int_tuple(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of positive ints (a bare int or anything else gives None)."""
    if isinstance(value, bool) or value is None or isinstance(value, int):
        return None
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if out and all(v > 0 for v in out) else None


def _fmt(grid: Sequence[int]) -> str:
    return "x".join(map(str, grid))


# ---------------------------------------------------------------------------------------------
# static facts
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TokenGeometry:
    """What a network says about the token sequences around one module.

    Attributes:
        spatial_dims: rank of the patch grid (2 or 3), or None when unknown.
        grid: the static patch grid (see the module doc), or None when the network does not fix or store it.
        num_prefix_tokens: the network's own prefix tokens (CLS + registers), 0 without them.
        num_patches: the patch count the network fixes (MONAI's ``n_patches``), None when it follows the input.
        patch_embed: canonical name of the patch embedding that a :class:`GridProbe` can watch, or None.
        patch_size: patch size per spatial axis, or None.
        dynamic: the grid follows the input size (timm ``dynamic_img_size`` / non-strict patch embedding).
        dynamic_pad: timm ``dynamic_img_pad`` (grid = ``ceil(size / patch)``).
        fan_in: fan-in of the patch projection (``C_in * prod(patch)``), or None.
        owner: canonical name of the module that holds the patch embedding (``""``: the root), or None.
        source: where the facts came from (for messages).
        native_grid: the grid at the size a dynamic network was built for (timm ``grid_size``), or None.
    """

    spatial_dims: int | None = None
    grid: tuple[int, ...] | None = None
    num_prefix_tokens: int = 0
    num_patches: int | None = None
    patch_embed: str | None = None
    patch_size: tuple[int, ...] | None = None
    dynamic: bool = False
    dynamic_pad: bool = False
    fan_in: int | None = None
    owner: str | None = None
    source: str = ""
    native_grid: tuple[int, ...] | None = None

    @property
    def patch_tokens(self) -> int | None:
        """Patch tokens per sequence when fixed: ``prod(grid)`` or the network's patch count."""
        if self.grid is not None:
            return math.prod(self.grid)
        return self.num_patches

    def grid_for(self, spatial_size: Sequence[int]) -> tuple[int, ...]:
        """The patch grid of an input of spatial size ``spatial_size`` (needs the patch size)."""
        if self.patch_size is None or len(self.patch_size) != len(spatial_size):
            raise ConfigError(
                f"cannot compute the patch grid of a {tuple(spatial_size)} input: the patch size of {self.source or 'the network'} "
                f"is {self.patch_size}; pass the grid explicitly"
            )
        if self.dynamic_pad:
            return tuple(-(-int(s) // p) for s, p in zip(spatial_size, self.patch_size))
        return tuple(int(s) // p for s, p in zip(spatial_size, self.patch_size))

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (saved in the adapter's resolved plan)."""
        return {
            "spatial_dims": self.spatial_dims,
            "grid": list(self.grid) if self.grid is not None else None,
            "num_prefix_tokens": self.num_prefix_tokens,
            "num_patches": self.num_patches,
            "patch_embed": self.patch_embed,
            "patch_size": list(self.patch_size) if self.patch_size is not None else None,
            "dynamic": self.dynamic,
        }


def _ancestors(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _patch_embedding(m: nn.Module) -> tuple[str, nn.Module] | None:
    for attr in ("patch_embedding", "patch_embed"):
        pe = getattr(m, attr, None)
        if isinstance(pe, nn.Module):
            return attr, innermost(pe)
    return None


def _patch_facts(pe: nn.Module) -> tuple[tuple[int, ...] | None, int | None, int | None]:
    """(patch size, fan-in, spatial rank) of a patch embedding."""
    patch = int_tuple(getattr(pe, "patch_size", None))
    fan_in = dims = None
    for _, m in canonical_named_modules(pe):
        lengths = getattr(m, "axes_lengths", None)  # einops Rearrange of MONAI's "perceptron" embedding
        if isinstance(lengths, dict) and lengths and all(str(k).startswith("p") for k in lengths):
            patch = patch or tuple(int(lengths[k]) for k in sorted(lengths))
            dims = dims or len(lengths)
            continue
        d = conv_dims(m)
        if d is not None or isinstance(m, nn.Linear):
            fan_in = int(m.weight[0].numel())
            if d is not None:
                dims = d
                patch = patch or tuple(int(k) for k in m.kernel_size)
            break
    if dims is None and patch is not None:
        dims = len(patch)
    return patch, fan_in, dims


def _prefix_of(owner: nn.Module) -> int:
    n = getattr(owner, "num_prefix_tokens", None)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    cls = getattr(owner, "cls_token", None)
    if isinstance(cls, torch.Tensor) and cls.dim() == 3:
        return int(cls.shape[1])
    return 1 if isinstance(cls, torch.Tensor) else 0


def token_geometry(
    model: nn.Module,
    name: str,
    *,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = None,
    spatial_dims: int | None = None,
    input_shape: Sequence[int] | None = None,
) -> TokenGeometry:
    """The token geometry around the module at canonical ``name`` (nearest ancestor first).

    Args:
        model: the network (adapter wrappers are looked through).
        name: canonical name of a module inside the transformer (a block, an attention, ...).
        grid: a patch grid the caller knows (config); checked against the network's patch count.
        num_prefix_tokens: the caller's prefix count (config); default: the network's.
        spatial_dims: the caller's rank (config); default: the patch embedding's.
        input_shape: ``[C, *spatial]`` of the network input; gives the grid through the patch size.

    Raises:
        ConfigError: the given grid / input shape contradicts the network.
    """
    root = innermost(model)
    static: tuple[int, ...] | None = None
    static_source = ""
    owner_name: str | None = None
    pe_name: str | None = None
    pe: nn.Module | None = None
    for anc in _ancestors(name):
        try:
            m = innermost(get_submodule(model, anc))
        except TargetingError:  # pragma: no cover - names come from the model
            continue
        if static is None and pe is None:
            res = int_tuple(getattr(m, "input_resolution", None))  # TinyViT blocks: their own token grid
            if res is not None and hasattr(m, "attn"):
                static, static_source = res, f"{type(m).__name__}.input_resolution at {anc or '<root>'!r}"
                break
        if static is None:
            spec = getattr(m, "spec", None)
            spec_grid = int_tuple(getattr(spec, "grid", None)) if spec is not None else None
            if spec_grid is not None:
                static, static_source = spec_grid, f"{type(m).__name__}.spec.grid"
        if pe is None:
            found = _patch_embedding(m)
            if found is not None:
                attr, pe = found
                owner_name = anc
                pe_name = f"{anc}.{attr}" if anc else attr
    if pe is None and owner_name is None and static is None:
        return TokenGeometry(
            spatial_dims=spatial_dims or (len(grid) if grid is not None else None),
            grid=tuple(int(g) for g in grid) if grid is not None else None,
            num_prefix_tokens=num_prefix_tokens or 0,
            source="the configuration" if grid is not None else "",
        )
    owner = innermost(get_submodule(model, owner_name)) if owner_name is not None else None
    patch = fan_in = dims = None
    dynamic = dynamic_pad = False
    num_patches: int | None = None
    source = static_source
    if pe is not None:
        patch, fan_in, dims = _patch_facts(pe)
        dynamic = bool(getattr(owner, "dynamic_img_size", False)) or getattr(pe, "strict_img_size", True) is False
        dynamic_pad = bool(getattr(pe, "dynamic_img_pad", False))
        count = getattr(pe, "n_patches", None) or getattr(pe, "num_patches", None)
        num_patches = int(count) if count is not None and not dynamic else None
        source = source or f"{type(owner).__name__}.{pe_name.rsplit('.', 1)[-1]}"
        if static is None and not dynamic:
            static = int_tuple(getattr(pe, "grid_size", None))
        if static is None and not dynamic:
            for holder in (owner, root):
                static = int_tuple(getattr(holder, "feat_size", None))
                if static is not None:
                    break
        if static is None and not dynamic and patch is not None:
            img = int_tuple(getattr(owner, "img_size", None))
            if img is not None and len(img) == len(patch):
                static = tuple(i // p for i, p in zip(img, patch))
    prefix = _prefix_of(owner) if owner is not None else 0
    if static is not None and pe is None and owner is None:
        prefix = 0
    geo = TokenGeometry(
        spatial_dims=dims or (len(static) if static is not None else None),
        grid=static,
        num_prefix_tokens=prefix,
        num_patches=num_patches
        if num_patches is not None
        else (math.prod(static) if static is not None and not dynamic else None),
        patch_embed=pe_name,
        patch_size=patch,
        dynamic=dynamic,
        dynamic_pad=dynamic_pad,
        fan_in=fan_in,
        owner=owner_name,
        source=source,
        native_grid=int_tuple(getattr(pe, "grid_size", None)) if pe is not None and dynamic else None,
    )
    return _with_overrides(geo, grid, num_prefix_tokens, spatial_dims, input_shape)


def _with_overrides(
    geo: TokenGeometry,
    grid: Sequence[int] | None,
    num_prefix_tokens: int | None,
    spatial_dims: int | None,
    input_shape: Sequence[int] | None,
) -> TokenGeometry:
    changes: dict[str, Any] = {}
    given = tuple(int(g) for g in grid) if grid is not None else None
    if given is None and input_shape is not None:
        given = geo.grid_for(tuple(input_shape)[1:])
    if given is not None:
        if geo.num_patches is not None and math.prod(given) != geo.num_patches and not geo.dynamic:
            raise ConfigError(
                f"the patch grid {_fmt(given)} ({math.prod(given)} patches) does not fit {geo.source}, which makes "
                f"{geo.num_patches} patches; pass the grid (image size // patch size per axis) of the input the network runs on"
            )
        if geo.spatial_dims is not None and len(given) != geo.spatial_dims:
            raise ConfigError(f"the patch grid {_fmt(given)} is not {geo.spatial_dims}D like {geo.source}")
        changes["grid"] = given
        if not geo.dynamic:
            changes["num_patches"] = math.prod(given)
    if num_prefix_tokens is not None:
        changes["num_prefix_tokens"] = int(num_prefix_tokens)
    dims = spatial_dims or geo.spatial_dims or (len(given) if given is not None else None)
    if given is not None and dims is not None and len(given) != dims:
        raise ConfigError(f"the patch grid {_fmt(given)} does not have spatial_dims={dims} entries")
    changes["spatial_dims"] = dims
    return _replace(geo, **changes)


def _replace(geo: TokenGeometry, **changes: Any) -> TokenGeometry:
    from dataclasses import replace

    return replace(geo, **changes)


# ---------------------------------------------------------------------------------------------
# runtime grid
# ---------------------------------------------------------------------------------------------
class GridContext:
    """The patch grid of the current forward pass (written by :class:`GridProbe`; None before any)."""

    def __init__(self) -> None:
        self.grid: tuple[int, ...] | None = None


class GridProbe(nn.Module):
    """Records ``size // patch`` (``ceil`` with dynamic padding) of the patch embedding's input."""

    def __init__(self, ctx: GridContext, patch_size: Sequence[int], dynamic_pad: bool = False) -> None:
        super().__init__()
        self.ctx = ctx
        self.patch_size = tuple(int(p) for p in patch_size)
        self.dynamic_pad = dynamic_pad

    def record(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != len(self.patch_size) + 2:
            self.ctx.grid = None
            return
        sizes = x.shape[2:]
        if self.dynamic_pad:
            self.ctx.grid = tuple(-(-int(s) // p) for s, p in zip(sizes, self.patch_size))
        else:
            self.ctx.grid = tuple(int(s) // p for s, p in zip(sizes, self.patch_size))

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}"


class GridProbeLayer(AdapterLayer):
    """Wraps a patch embedding; the active :class:`GridProbe` records the runtime patch grid."""

    method_name = "grid_probe"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        probe = self.active()
        if probe is not None:
            probe.record(x)
        return self.base_layer(x, *args, **kwargs)


def wrap_module(
    model: nn.Module, name: str, layer_cls: type[AdapterLayer], adapter_name: str, adapter: nn.Module
) -> None:
    """Wrap ``name`` with ``layer_cls`` (or reuse an existing such wrapper) and add ``adapter``."""
    from monai_peft.targeting import set_submodule

    current = get_submodule(model, name)
    if isinstance(current, layer_cls):
        layer = current
    else:
        layer = layer_cls(current)
        set_submodule(model, name, layer)
    layer.add_adapter(adapter_name, adapter)


@dataclass
class TokenGrid:
    """Splits a runtime token sequence into prefix and patch grid (the module doc's rule).

    Held (as a plain attribute, not a sub-module) by the adapters of one adapter name. ``static`` is used
    when no probe has recorded the grid of the current pass.

    Attributes:
        spatial_dims: rank of the grid.
        static: the static grid, or None.
        min_prefix: the network's own prefix tokens (a sequence needs at least these before the patches).
        ctx: the runtime grid context of the patch embedding's probe, or None.
        hint: what to pass when the grid is unknown.
    """

    spatial_dims: int
    static: tuple[int, ...] | None = None
    min_prefix: int = 0
    ctx: GridContext | None = field(default=None, compare=False)
    hint: str = "pass the patch grid (image size // patch size per axis) in the method's config"

    @classmethod
    def from_geometry(cls, geo: TokenGeometry, ctx: GridContext | None, hint: str) -> TokenGrid:
        if geo.spatial_dims is None:
            raise ConfigError(f"the rank of the token grid of {geo.source or 'the network'} is unknown; {hint}")
        return cls(geo.spatial_dims, geo.grid, geo.num_prefix_tokens, ctx, hint)

    def current(self) -> tuple[int, ...] | None:
        """The grid of the current forward pass: the probe's, else the static grid."""
        if self.ctx is not None and self.ctx.grid is not None:
            return self.ctx.grid
        return self.static

    def split(self, n_tokens: int) -> tuple[int, tuple[int, ...]]:
        """``(P, grid)`` of a sequence of ``n_tokens`` tokens: ``P = n_tokens - prod(grid) >= min_prefix``.

        Raises:
            InputDataError: unknown grid, or a token count that cannot hold the grid and the prefix tokens.
        """
        grid = self.current()
        if grid is None:
            raise InputDataError(
                f"the patch grid of this {n_tokens}-token sequence is unknown (the network does not store it and no "
                f"patch embedding was seen in this forward pass); {self.hint}"
            )
        if len(grid) != self.spatial_dims:
            raise InputDataError(f"the runtime patch grid {_fmt(grid)} is not {self.spatial_dims}D")
        prefix = n_tokens - math.prod(grid)
        if prefix < self.min_prefix:
            raise InputDataError(
                f"a sequence of {n_tokens} tokens cannot hold the {_fmt(grid)} patch grid"
                + (f" plus {self.min_prefix} prefix token(s)" if self.min_prefix else "")
                + " (expected at least "
                + f"{math.prod(grid) + self.min_prefix}); were tokens dropped (MAE masking, timm patch_drop) or the "
                f"input resized without a patch embedding to read the grid from? {self.hint}"
            )
        return prefix, tuple(grid)

    def __deepcopy__(self, memo: dict) -> TokenGrid:
        import copy

        return TokenGrid(self.spatial_dims, self.static, self.min_prefix, copy.deepcopy(self.ctx, memo), self.hint)


def attach_grid_probes(
    model: nn.Module, geometries: Sequence[TokenGeometry], adapter_name: str
) -> dict[str, GridContext]:
    """Wrap each distinct patch embedding of ``geometries`` with a :class:`GridProbeLayer` for ``adapter_name``.

    Returns ``{patch embedding name: its GridContext}``; create the adapters with these contexts.
    """
    out: dict[str, GridContext] = {}
    for geo in geometries:
        if geo.patch_embed is None or geo.patch_size is None or geo.patch_embed in out:
            continue
        ctx = GridContext()
        wrap_module(
            model, geo.patch_embed, GridProbeLayer, adapter_name, GridProbe(ctx, geo.patch_size, geo.dynamic_pad)
        )
        out[geo.patch_embed] = ctx
    return out
