"""Conversions between transformer token sequences and channel-first feature maps.

A plain ViT (MONAI ``ViT``, timm ``VisionTransformer``) turns an image of spatial size ``S``
into ``N = prod(S // patch_size)`` patch tokens, flattened in row-major (C-order) order over the
spatial axes, optionally preceded by *prefix tokens*: a CLS token, distillation / register
tokens, or the prompt tokens that visual prompt tuning inserts after the CLS token. A sequence is
therefore laid out as ``(B, P + N, C)`` with the ``P`` prefix tokens first.

The helpers here convert such a sequence into a MONAI-style channel-first map
``(B, C, *grid)`` and back, for 2D (``grid = (H', W')``) and 3D (``grid = (H', W', D')``) token
grids. The flattening order matches both ``monai.networks.blocks.PatchEmbeddingBlock``
(``conv`` and ``perceptron`` projections) and timm's ``PatchEmbed``, so
``map_to_tokens(tokens_to_map(t, grid, P), prefix)`` reproduces ``t`` exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from monai_peft.errors import ConfigError, InputDataError

__all__ = [
    "grid_from_image",
    "infer_grid",
    "map_to_tokens",
    "split_prefix_tokens",
    "tokens_to_map",
]

_POWER_NAME = {1: "integer", 2: "perfect square", 3: "perfect cube"}


def _as_int_tuple(value: int | Sequence[int], n: int, name: str) -> tuple[int, ...]:
    """``value`` repeated to length ``n`` (int) or checked to have length ``n`` (sequence)."""
    if isinstance(value, int):
        out = (value,) * n
    else:
        out = tuple(int(v) for v in value)
        if len(out) != n:
            raise ConfigError(f"{name} must have {n} entries (one per spatial dimension), got {tuple(value)}.")
    if any(v < 1 for v in out):
        raise ConfigError(f"{name} entries must be positive integers, got {out}.")
    return out


def infer_grid(num_tokens: int, spatial_dims: int) -> tuple[int, ...]:
    """Side lengths of an isotropic token grid holding ``num_tokens`` patch tokens.

    Args:
        num_tokens: number of patch tokens ``N`` (prefix tokens already removed).
        spatial_dims: 1, 2 or 3.

    Returns:
        ``(s,) * spatial_dims`` with ``s ** spatial_dims == num_tokens``.

    Raises:
        InputDataError: if ``num_tokens`` is not a perfect square (2D) / cube (3D); the message
            says to pass the grid explicitly (needed for non-square images) or to fix the number
            of prefix tokens.
    """
    if spatial_dims not in _POWER_NAME:
        raise ConfigError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims}.")
    if num_tokens < 1:
        raise InputDataError(f"cannot infer a token grid from {num_tokens} patch tokens; at least one is needed.")
    side = round(num_tokens ** (1.0 / spatial_dims))
    for cand in (side - 1, side, side + 1):
        if cand > 0 and cand**spatial_dims == num_tokens:
            return (cand,) * spatial_dims
    raise InputDataError(
        f"cannot infer a {spatial_dims}D token grid: {num_tokens} patch tokens is not a "
        f"{_POWER_NAME[spatial_dims]}. Pass grid=... explicitly (image size // patch size, required for "
        "non-square/non-cubic inputs) or check num_prefix_tokens (CLS / prompt tokens left in the sequence)."
    )


def grid_from_image(spatial_shape: Sequence[int], patch_size: int | Sequence[int]) -> tuple[int, ...]:
    """Token grid ``spatial_shape // patch_size`` of an image, checking divisibility.

    Args:
        spatial_shape: spatial size of the input image, e.g. ``x.shape[2:]``.
        patch_size: patch size, an int or one entry per spatial dimension.

    Raises:
        InputDataError: if any spatial size is not a multiple of the patch size; the message names
            the offending dimensions and suggests ``monai.transforms.DivisiblePad``.
    """
    spatial_shape = tuple(int(s) for s in spatial_shape)
    patch = _as_int_tuple(patch_size, len(spatial_shape), "patch_size")
    bad = [i for i, (s, p) in enumerate(zip(spatial_shape, patch)) if s % p != 0 or s < p]
    if bad:
        raise InputDataError(
            f"image spatial size {spatial_shape} is not divisible by the patch size {patch} "
            f"(spatial dimension(s) {bad}). Pad or resize the input to a multiple of the patch size, "
            f"e.g. with monai.transforms.DivisiblePad(k={patch}) or a sliding-window ROI that is a multiple of it."
        )
    return tuple(s // p for s, p in zip(spatial_shape, patch))


def _check_tokens(tokens: torch.Tensor) -> None:
    if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise InputDataError(f"expected a token sequence of shape (B, tokens, C), got {shape}.")


def _resolve_prefix(
    num_total: int,
    grid: Sequence[int] | None,
    num_prefix_tokens: int | None,
    spatial_dims: int | None,
) -> tuple[int, tuple[int, ...]]:
    """Number of prefix tokens and the grid, validated against the sequence length."""
    if grid is not None:
        grid_t = tuple(int(g) for g in grid)
        if any(g < 1 for g in grid_t):
            raise ConfigError(f"grid entries must be positive, got {grid_t}.")
        if spatial_dims is not None and len(grid_t) != spatial_dims:
            raise ConfigError(f"grid {grid_t} has {len(grid_t)} entries but spatial_dims={spatial_dims}.")
        n_patch = 1
        for g in grid_t:
            n_patch *= g
        if num_prefix_tokens is None:
            num_prefix_tokens = num_total - n_patch
            if num_prefix_tokens < 0:
                raise InputDataError(
                    f"wrong token count: the sequence has {num_total} tokens, fewer than the {n_patch} patch tokens of grid {grid_t}."
                )
        elif num_prefix_tokens < 0:
            raise ConfigError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
        if num_total - num_prefix_tokens != n_patch:
            raise InputDataError(
                f"wrong token count: {num_total} tokens - {num_prefix_tokens} prefix tokens = "
                f"{num_total - num_prefix_tokens} patch tokens, but grid {grid_t} needs {n_patch}. "
                "Check the image size, the patch size and the number of CLS/prompt tokens."
            )
        return num_prefix_tokens, grid_t
    if spatial_dims is None:
        raise ConfigError("tokens_to_map needs either grid=... or spatial_dims=... to infer a square/cubic grid.")
    if num_prefix_tokens is None:
        raise ConfigError("num_prefix_tokens=None (infer) requires an explicit grid; pass the grid or the count.")
    if num_prefix_tokens < 0:
        raise ConfigError(f"num_prefix_tokens must be >= 0, got {num_prefix_tokens}.")
    if num_prefix_tokens > num_total:
        raise InputDataError(f"num_prefix_tokens={num_prefix_tokens} exceeds the sequence length {num_total}.")
    return num_prefix_tokens, infer_grid(num_total - num_prefix_tokens, spatial_dims)


def split_prefix_tokens(
    tokens: torch.Tensor,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = 0,
    spatial_dims: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``(B, P + N, C)`` into prefix tokens ``(B, P, C)`` and a map ``(B, C, *grid)``.

    See :func:`tokens_to_map` for the arguments.
    """
    _check_tokens(tokens)
    n_prefix, grid_t = _resolve_prefix(tokens.shape[1], grid, num_prefix_tokens, spatial_dims)
    prefix = tokens[:, :n_prefix]
    patches = tokens[:, n_prefix:]
    b, _, c = patches.shape
    return prefix, patches.transpose(1, 2).reshape(b, c, *grid_t)


def tokens_to_map(
    tokens: torch.Tensor,
    grid: Sequence[int] | None = None,
    num_prefix_tokens: int | None = 0,
    spatial_dims: int | None = None,
) -> torch.Tensor:
    """Reshape a token sequence ``(B, P + N, C)`` into a channel-first map ``(B, C, *grid)``.

    Args:
        tokens: ``(B, P + N, C)``: ``P`` prefix tokens (CLS, prompts ...) then ``N`` patch tokens in
            row-major order over the grid.
        grid: token grid, e.g. ``(H // p, W // p)`` or ``(H // p, W // p, D // p)``. When ``None`` the
            grid is inferred as a square (``spatial_dims=2``) or cube (``spatial_dims=3``).
        num_prefix_tokens: number of leading tokens to drop; ``None`` infers it as
            ``P + N - prod(grid)`` (needs ``grid``), which follows a run-time number of prompt tokens.
        spatial_dims: 2 or 3; needed when ``grid`` is ``None``.

    Returns:
        ``(B, C, *grid)``, contiguous.

    Raises:
        InputDataError: wrong token count for the grid, or an un-inferable (non square/cube) grid.
        ConfigError: inconsistent arguments.

    Example::

        >>> x = torch.randn(2, 1 + 4 * 4, 96)          # CLS + 4x4 patch tokens
        >>> tokens_to_map(x, num_prefix_tokens=1, spatial_dims=2).shape
        torch.Size([2, 96, 4, 4])
    """
    return split_prefix_tokens(tokens, grid, num_prefix_tokens, spatial_dims)[1]


def map_to_tokens(feature_map: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Flatten a channel-first map ``(B, C, *grid)`` into tokens ``(B, [P +] N, C)``.

    Args:
        feature_map: ``(B, C, *grid)`` with one or more spatial axes.
        prefix_tokens: optional ``(B, P, C)`` (or ``(1, P, C)``, broadcast over the batch) prepended
            to the patch tokens, e.g. the CLS token returned by :func:`split_prefix_tokens`.

    Returns:
        ``(B, P + prod(grid), C)``; the exact inverse of :func:`split_prefix_tokens`.
    """
    if not isinstance(feature_map, torch.Tensor) or feature_map.ndim < 3:
        shape = tuple(feature_map.shape) if isinstance(feature_map, torch.Tensor) else type(feature_map).__name__
        raise InputDataError(f"expected a channel-first feature map (B, C, *spatial), got {shape}.")
    tokens = feature_map.flatten(2).transpose(1, 2)
    if prefix_tokens is None:
        return tokens.contiguous()
    if prefix_tokens.ndim != 3 or prefix_tokens.shape[-1] != tokens.shape[-1]:
        raise InputDataError(
            f"prefix_tokens must be (B, P, {tokens.shape[-1]}) to match the map's channels, got {tuple(prefix_tokens.shape)}."
        )
    if prefix_tokens.shape[0] not in (1, tokens.shape[0]):
        raise InputDataError(
            f"prefix_tokens batch size {prefix_tokens.shape[0]} does not match the map's batch size {tokens.shape[0]}."
        )
    prefix_tokens = prefix_tokens.expand(tokens.shape[0], -1, -1)
    return torch.cat([prefix_tokens, tokens], dim=1)
