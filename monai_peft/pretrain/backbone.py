"""The MAE-ViT encoder written by ``monai-peft pretrain``, and its loader as the backbone ``mae_vit``.

A pretraining folder holds (no pickle anywhere in what other tools read):

* ``encoder.safetensors`` - the MAE encoder in **MONAI ViT key layout** (``cls_token``,
  ``patch_embedding.patch_embeddings.{weight,bias}``, ``patch_embedding.position_embeddings`` ``(1, N, C)``,
  ``blocks.<i>.{norm1,attn.qkv,attn.out_proj,norm2,mlp.linear1,mlp.linear2}.*``, ``norm.*``);
* ``mae_vit.json`` - what the ViT is (``format: "monai_peft.mae_vit"``, ``spatial_dims``, ``in_channels``,
  ``img_size``, ``patch_size``, ``hidden_size``, ``mlp_dim``, ``num_layers``, ``num_heads``, ``qkv_bias``,
  ``layer_norm_eps``), the SHA-256 of the safetensors file, and how it was pretrained.

:func:`load_mae_vit` builds the network a fine-tuning run needs from that folder:

* 2D: a :class:`~monai_peft.networks.vit.MonaiViTBackbone` (MONAI ViT + pooling + linear head). Default pooling is
  MAE's fine-tuning protocol: the mean of the patch tokens, a fresh ``fc_norm``, the pretrained final ``norm``
  dropped (``global_pool="token"`` pools the CLS token after the pretrained ``norm`` instead).
* 3D: a plain ``monai.networks.nets.ViT(spatial_dims=3, classification=True)`` (CLS-token pooling after the
  pretrained ``norm``; ``num_classes=0`` gives the ``(B, C)`` feature with an ``Identity`` head).

A different ``img_size`` resamples the position embeddings (bicubic 2D / trilinear 3D) and a different
``in_channels`` adapts the patch kernel (:func:`~monai_peft.networks.adapt.adapt_input_channels`).

``head_norm="batchnorm"`` puts MAE's linear-probing normaliser in front of the fresh head (He et al. 2022,
appendix A.1: "an extra BatchNorm layer without affine transformation"):
``logits = W ((f - mu_B) / sqrt(sigma_B^2 + eps)) + b`` with ``f`` the pooled ``(B, C)`` feature and
``mu_B, sigma_B^2`` the batch (train) or running (eval) per-channel statistics. MAE features are badly scaled
(per channel their spread across images is a small fraction of their mean), so a linear head trained on them
directly barely moves; the normaliser fixes the conditioning. The head becomes
``nn.Sequential(BatchNorm1d(C, affine=False), Linear)`` (its BatchNorm statistics are buffers: train them with
``batchnorm_stats="save"``).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError
from monai_peft.networks.reports import LoadReport, load_into

__all__ = [
    "ENCODER_FILE",
    "FORMAT",
    "META_FILE",
    "encoder_state_from_mae",
    "load_mae_vit",
    "load_mae_vit_with_report",
    "read_mae_vit_meta",
]

FORMAT = "monai_peft.mae_vit"
FORMAT_VERSION = 1
ENCODER_FILE = "encoder.safetensors"
META_FILE = "mae_vit.json"
_HEAD_NORMS = ("none", "batchnorm")
_ARCH_KEYS = (
    "spatial_dims",
    "in_channels",
    "img_size",
    "patch_size",
    "hidden_size",
    "mlp_dim",
    "num_layers",
    "num_heads",
    "qkv_bias",
    "layer_norm_eps",
)


def encoder_state_from_mae(mae_state: Mapping[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """MONAI ``MaskedAutoEncoderViT`` state dict -> encoder in MONAI ViT keys (decoder, mask token dropped).

    The MAE keeps its final encoder LayerNorm as ``blocks.<num_layers>`` (last item of an ``nn.Sequential``); it
    becomes ``norm``. The never-used ``norm_cross_attn`` LayerNorms are dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in mae_state.items():
        encoder = key == "cls_token" or key.startswith(("patch_embedding.", "blocks."))
        if key.startswith(f"blocks.{num_layers}."):
            out["norm." + key.split(".", 2)[2]] = value
        elif encoder and ".norm_cross_attn." not in key:
            out[key] = value
    for required in ("cls_token", "patch_embedding.patch_embeddings.weight", "norm.weight"):
        if required not in out:
            raise CheckpointError(
                f"not a MONAI MaskedAutoEncoderViT state dict with {num_layers} layers: no {required}"
            )
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in out.items()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _folder(source: str | Path) -> Path:
    path = Path(str(source))
    if path.is_file() and path.name in (META_FILE, ENCODER_FILE):
        path = path.parent
    if not path.is_dir():
        raise ConfigError(
            f"mae_vit source {str(source)!r} is not a folder written by `monai-peft pretrain` (it needs "
            f"{META_FILE} and {ENCODER_FILE}); pass the --out folder of the pretraining run."
        )
    return path


def read_mae_vit_meta(source: str | Path) -> dict[str, Any]:
    """The validated ``mae_vit.json`` of a pretraining folder (or of the folder holding the given file)."""
    folder = _folder(source)
    meta_path = folder / META_FILE
    if not meta_path.is_file():
        hint = " (the run has not finished: rerun it with --resume)" if (folder / "checkpoint.pt").is_file() else ""
        raise ConfigError(f"{folder} has no {META_FILE}{hint}; pass the --out folder of a finished pretraining run.")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path} is not a {FORMAT} description (format {meta.get('format')!r}).")
    missing = [k for k in _ARCH_KEYS if k not in meta.get("architecture", {})]
    if missing:
        raise CheckpointError(f"{meta_path}: architecture lacks {missing}.")
    return meta


def _read_encoder(folder: Path, meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / ENCODER_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {ENCODER_FILE}; the pretraining run did not finish its export.")
    expected = meta.get("encoder_sha256")
    if expected and _sha256(path) != expected:
        raise CheckpointError(
            f"{path} does not match the SHA-256 in {META_FILE}: the two files come from different runs or the "
            "weights were changed; export them again (rerun `monai-peft pretrain ... --resume`)."
        )
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _as_tuple(value: int | Sequence[int] | None, dims: int, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    out = (int(value),) * dims if isinstance(value, int) else tuple(int(v) for v in value)
    if len(out) == 1:
        out = out * dims
    if len(out) != dims:
        raise ConfigError(f"{what} {list(out)} must have {dims} values for this {dims}D MAE-ViT.")
    return out


def _resample_positions(pos: torch.Tensor, old: tuple[int, ...], new: tuple[int, ...]) -> torch.Tensor:
    """``(1, prod(old), C)`` -> ``(1, prod(new), C)`` (bicubic 2D, trilinear 3D)."""
    if old == new:
        return pos.clone()
    c = pos.shape[-1]
    grid = pos.float().reshape(1, *old, c).movedim(-1, 1)
    mode = "bicubic" if len(old) == 2 else "trilinear"
    grid = F.interpolate(grid, size=new, mode=mode, align_corners=False)
    return grid.movedim(1, -1).reshape(1, math.prod(new), c).to(pos.dtype)


def load_mae_vit_with_report(
    source: str | Path | None,
    *,
    num_classes: int = 0,
    img_size: int | Sequence[int] | None = None,
    in_channels: int | None = None,
    global_pool: str = "avg",
    dropout_rate: float = 0.0,
    head_norm: str = "none",
    strict: bool = True,
    **unused: Any,
) -> tuple[nn.Module, LoadReport]:
    """Build the fine-tuning network of a ``monai-peft pretrain`` folder (see the module docstring).

    Args:
        source: the pretraining ``--out`` folder (or its ``mae_vit.json`` / ``encoder.safetensors``).
        num_classes: classes of a fresh linear head (0: the network returns pooled ``(B, C)`` features).
        img_size: input size (default: the pretraining size); other sizes resample the position embeddings.
        in_channels: input channels (default: the pretraining channels).
        global_pool: 2D only: ``"avg"`` (MAE fine-tuning protocol, fresh ``fc_norm``) or ``"token"``.
        dropout_rate: MONAI ViT dropout.
        head_norm: ``"none"`` (a plain linear head) or ``"batchnorm"`` (MAE's linear-probing BatchNorm without
            affine parameters in front of the head; needs ``num_classes > 0``).
        strict: raise when a key is missing / unexpected (always on shape mismatches).

    Returns:
        ``(network, report)`` in eval mode. 2D input ``(B, C, H, W)`` -> ``(B, num_classes)``; 3D input
        ``(B, C, D, H, W)`` -> ``(out, hidden_states)`` of MONAI's ViT.
    """
    if unused:
        raise ConfigError(
            f"unknown mae_vit option(s) {sorted(unused)}; valid: num_classes, img_size, in_channels, global_pool, "
            "dropout_rate, head_norm, strict."
        )
    if head_norm not in _HEAD_NORMS:
        raise ConfigError(f"mae_vit head_norm must be one of {list(_HEAD_NORMS)}, got {head_norm!r}.")
    if head_norm != "none" and not num_classes:
        raise ConfigError("mae_vit head_norm needs a head: give num_classes > 0 (or leave head_norm: none).")
    if source is None:
        raise ConfigError("backbone 'mae_vit' needs source: the --out folder of `monai-peft pretrain`.")
    folder = _folder(source)
    meta = read_mae_vit_meta(folder)
    arch = meta["architecture"]
    dims = int(arch["spatial_dims"])
    state = _read_encoder(folder, meta)
    report = LoadReport(source=str(folder), notes=[f"MAE-ViT pretrained by monai-peft pretrain ({dims}D)"])
    old_size = tuple(int(s) for s in arch["img_size"])
    patch = int(arch["patch_size"])
    size = _as_tuple(img_size, dims, "img_size") or old_size
    if any(s % patch for s in size):
        raise ConfigError(f"img_size {list(size)} must be a multiple of the MAE-ViT's patch size {patch}.")
    channels = int(in_channels or arch["in_channels"])
    old_grid = tuple(s // patch for s in old_size)
    new_grid = tuple(s // patch for s in size)
    pos_key = "patch_embedding.position_embeddings"
    if new_grid != old_grid:
        state[pos_key] = _resample_positions(state[pos_key], old_grid, new_grid)
        report.adapted["vit." + pos_key if dims == 2 else pos_key] = f"token grid {old_grid} -> {new_grid}"
    kernel_key = "patch_embedding.patch_embeddings.weight"
    if channels != int(arch["in_channels"]):
        from monai_peft.networks.adapt import adapt_input_channels

        state[kernel_key] = adapt_input_channels(state[kernel_key], channels)
        report.adapted["vit." + kernel_key if dims == 2 else kernel_key] = (
            f"in-channels {arch['in_channels']} -> {channels}"
        )
    eps = float(arch["layer_norm_eps"])
    if dims == 2:
        from monai_peft.networks.vit import MonaiViTBackbone, ViTSpec

        spec = ViTSpec(
            img_size=size,  # type: ignore[arg-type]
            patch_size=patch,
            in_channels=channels,
            embed_dim=int(arch["hidden_size"]),
            depth=int(arch["num_layers"]),
            num_heads=int(arch["num_heads"]),
            mlp_dim=int(arch["mlp_dim"]),
            qkv_bias=bool(arch["qkv_bias"]),
            global_pool=global_pool,
            num_classes=int(num_classes),
            eps=eps,
        )
        model: nn.Module = MonaiViTBackbone(spec, dropout_rate=dropout_rate)
        mapped = {"vit." + k: v for k, v in state.items()}
        fresh = []
        if spec.use_fc_norm:
            for k in ("vit.norm.weight", "vit.norm.bias"):
                if mapped.pop(k, None) is not None:
                    report.ignored[k] = "MAE fine-tuning protocol: pooled model has fc_norm instead of the final norm"
            fresh += ["fc_norm.weight", "fc_norm.bias"]
        if num_classes:
            fresh += ["head.weight", "head.bias"]
        load_into(model, mapped, strict=strict, fresh=fresh, report=report, context="MonaiViTBackbone (mae_vit)")
    elif dims == 3:
        from monai.networks.nets import ViT

        if global_pool != "avg" and global_pool != "token":
            raise ConfigError(f"global_pool must be 'avg' or 'token', got {global_pool!r}.")
        vit = ViT(
            in_channels=channels,
            img_size=size,
            patch_size=patch,
            hidden_size=int(arch["hidden_size"]),
            mlp_dim=int(arch["mlp_dim"]),
            num_layers=int(arch["num_layers"]),
            num_heads=int(arch["num_heads"]),
            proj_type="conv",
            pos_embed_type="learnable",
            classification=True,
            num_classes=max(int(num_classes), 1),
            dropout_rate=dropout_rate,
            spatial_dims=3,
            post_activation=None,
            qkv_bias=bool(arch["qkv_bias"]),
        )
        for sub in vit.modules():
            if isinstance(sub, nn.LayerNorm):
                sub.eps = eps
        if not num_classes:
            vit.classification_head = nn.Identity()
        report.notes.append("3D: MONAI ViT pools the CLS token after the pretrained final norm")
        fresh = ["blocks.*.norm_cross_attn.*"] + (["classification_head.*"] if num_classes else [])
        load_into(vit, state, strict=strict, fresh=fresh, report=report, context="monai.networks.nets.ViT (mae_vit)")
        if num_classes:
            from monai_peft.networks.heads.init import init_new_head

            init_new_head(
                vit.classification_head[0]
                if isinstance(vit.classification_head, nn.Sequential)
                else vit.classification_head
            )
        model = vit
    else:
        raise CheckpointError(f"{folder / META_FILE}: spatial_dims must be 2 or 3, got {dims}.")
    if head_norm == "batchnorm":
        head_attr = "head" if dims == 2 else "classification_head"
        setattr(model, head_attr, _with_batchnorm(getattr(model, head_attr), int(arch["hidden_size"])))
        report.notes.append(f"{head_attr}: BatchNorm1d(affine=False) before the linear head (MAE linear probing)")
    model.mae_vit_meta = meta  # type: ignore[assignment]
    return model.eval(), report


def _with_batchnorm(head: nn.Module, width: int) -> nn.Sequential:
    """``Sequential(BatchNorm1d(width, affine=False, eps=1e-6), head)``; the head's own layers follow the norm."""
    layers = list(head) if isinstance(head, nn.Sequential) else [head]
    return nn.Sequential(nn.BatchNorm1d(width, affine=False, eps=1e-6), *layers)


def load_mae_vit(source: str | Path | None, **kwargs: Any) -> nn.Module:
    """:func:`load_mae_vit_with_report` without the report."""
    return load_mae_vit_with_report(source, **kwargs)[0]
