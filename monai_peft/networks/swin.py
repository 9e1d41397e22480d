"""MONAI SwinUNETR self-supervised encoder weights (``model_swinvit.pt``) into ``SwinUNETR.swinViT``.

The self-supervised Swin-ViT weights of Tang et al. ("Self-Supervised Pre-Training of Swin Transformers for
3D Medical Image Analysis", CVPR 2022; 5,050 CT volumes, inpainting + rotation + contrastive pretext tasks)
are published by the MONAI model zoo / research-contributions as ``model_swinvit.pt``
(https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt). Layout of
that file (as documented by MONAI's own ``SwinUNETR.load_from`` and the research-contributions issues)::

    {"state_dict": {
        "module.patch_embed.proj.weight"                  (48, 1, 2, 2, 2)
        "module.layers1.0.blocks.0.norm1.weight"          ...
        "module.layers1.0.blocks.0.attn.relative_position_bias_table / relative_position_index"
        "module.layers1.0.blocks.0.attn.qkv / proj"
        "module.layers1.0.blocks.0.mlp.fc1 / fc2"          <- MONAI's MLPBlock calls them linear1 / linear2
        "module.layers1.0.downsample.reduction / norm"
        ... layers2-4 ...
        "module.norm.weight / bias"                        <- final norm of the pretraining encoder, unused
    }, ...}

i.e. the DistributedDataParallel ``module.`` prefix, no ``swinViT.`` segment and timm/Swin ``fc1``/``fc2``
MLP names. Also accepted: the same keys under ``swinViT.`` / ``swin_vit.`` (SSLHead pretraining checkpoints,
old and new naming, with their ``rotation_head``/``contrastive_head``/``conv`` heads ignored) and full
SwinUNETR checkpoints (everything outside ``swinViT`` ignored).

Architecture of the released encoder: ``feature_size=48``, ``depths=(2, 2, 2, 2)``, ``num_heads=(3, 6, 12,
24)``, ``window_size=7``, ``patch_size=2``, 3D, 1 input channel (CT). :func:`infer_swin_config` reads these from
any such checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from monai_peft.errors import CheckpointError, ConfigError
from monai_peft.networks.adapt import adapt_input_channels
from monai_peft.networks.reports import LoadReport, load_into
from monai_peft.networks.sources import SourceLike, describe_source, extract_state_dict, load_state_dict_from_source

__all__ = [
    "SWINVIT_SSL_URL",
    "build_swinunetr_ssl",
    "infer_swin_config",
    "load_swinunetr_ssl",
    "swinvit_ssl_to_monai_state_dict",
]

#: Where MONAI publishes the self-supervised Swin-ViT encoder (no digest is published with it).
SWINVIT_SSL_URL = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt"

_ENCODER_PREFIXES = ("swinViT.", "swin_vit.")
_SSL_HEADS = re.compile(r"^(rotation_head|rotation_pre|contrastive_head|contrastive_pre|conv)\b")
_ENCODER_ROOT = re.compile(r"^(patch_embed|layers[1-4]c?)\.")


def swinvit_ssl_to_monai_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Convert a ``model_swinvit.pt``-style state dict to ``SwinUNETR.swinViT`` keys.

    Returns:
        ``(state, ignored)``: tensors keyed like ``SwinTransformer.state_dict()`` and the checkpoint keys that
        were dropped on purpose, with the reason.
    """
    ignored: dict[str, str] = {}
    stripped = {(k[len("module.") :] if k.startswith("module.") else k): v for k, v in state_dict.items()}
    nested = any(k.startswith(_ENCODER_PREFIXES) for k in stripped)
    state: dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        inner = key
        if nested:
            for prefix in _ENCODER_PREFIXES:
                if key.startswith(prefix):
                    inner = key[len(prefix) :]
                    break
            else:
                reason = "SSL pretraining head" if _SSL_HEADS.match(key) else "outside swinViT (decoder / head)"
                ignored[key] = reason
                continue
        if inner in ("norm.weight", "norm.bias"):
            ignored[key] = "final norm of the pretraining encoder (MONAI's SwinTransformer has none)"
            continue
        if _SSL_HEADS.match(inner):
            ignored[key] = "SSL pretraining head"
            continue
        inner = inner.replace(".mlp.fc1.", ".mlp.linear1.").replace(".mlp.fc2.", ".mlp.linear2.")
        state[inner] = value
    return state, ignored


def infer_swin_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Read ``feature_size``, ``in_channels``, ``patch_size``, ``depths``, ``num_heads``, ``window_size`` and
    ``spatial_dims`` of a Swin-ViT encoder from its weights (any layout accepted by
    :func:`swinvit_ssl_to_monai_state_dict`).

    Raises:
        CheckpointError: not a Swin-ViT encoder checkpoint.
    """
    state, _ = swinvit_ssl_to_monai_state_dict(state_dict)
    proj = state.get("patch_embed.proj.weight")
    if proj is None:
        raise CheckpointError(
            f"not a Swin-ViT encoder checkpoint: no patch_embed.proj.weight; first keys: {list(state_dict)[:8]}"
        )
    spatial_dims = proj.ndim - 2
    depths, heads = [], []
    window = None
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"^layers{stage}\.0\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise CheckpointError(f"Swin-ViT checkpoint has no blocks for stage layers{stage}")
        depths.append(max(blocks) + 1)
        table = state[f"layers{stage}.0.blocks.0.attn.relative_position_bias_table"]
        heads.append(int(table.shape[1]))
        side = round(table.shape[0] ** (1.0 / spatial_dims))
        if side**spatial_dims != table.shape[0]:
            raise CheckpointError("relative_position_bias_table size is not (2 * window - 1) ** spatial_dims")
        window = (side + 1) // 2
    return {
        "in_channels": int(proj.shape[1]),
        "feature_size": int(proj.shape[0]),
        "patch_size": int(proj.shape[2]),
        "depths": tuple(depths),
        "num_heads": tuple(heads),
        "window_size": window,
        "spatial_dims": spatial_dims,
    }


def _swin_encoder(model: nn.Module) -> nn.Module:
    encoder = getattr(model, "swinViT", model)
    if not hasattr(encoder, "patch_embed") or not hasattr(encoder, "layers1"):
        raise ConfigError(f"expected a monai SwinUNETR or its swinViT (SwinTransformer), got {type(model).__name__}")
    return encoder


def load_swinunetr_ssl(
    model: nn.Module,
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    strict: bool = True,
    adapt_in_channels: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
) -> LoadReport:
    """Load self-supervised Swin-ViT weights into ``model.swinViT`` (or into a bare ``SwinTransformer``).

    Args:
        model: ``monai.networks.nets.SwinUNETR`` (its ``swinViT`` is loaded) or a ``SwinTransformer``.
        source: path/URL/``hf://`` source of ``model_swinvit.pt`` (URL needs ``sha256``).
        state_dict: in-memory checkpoint instead of ``source`` (raw file content or its state dict).
        strict: raise :class:`~monai_peft.errors.StateDictKeyError` naming missing/unexpected keys.
            SwinUNETR-v2's ``layers*c`` residual blocks (not part of the SSL encoder) and
            ``relative_position_index`` buffers (deterministic) are never counted as missing.
        adapt_in_channels: if the model has another number of input channels than the checkpoint (e.g. 4 MR
            sequences vs 1 CT channel), adapt the patch-embedding kernel (see
            :func:`~monai_peft.networks.adapt.adapt_input_channels`) instead of failing.

    Returns:
        the :class:`LoadReport` (keys relative to ``swinViT``).
    """
    raw = _raw_state(source, state_dict, sha256=sha256, cache_dir=cache_dir)
    encoder = _swin_encoder(model)
    state, ignored = swinvit_ssl_to_monai_state_dict(raw)
    report = LoadReport(source=describe_source(source), ignored=ignored)
    proj_key = "patch_embed.proj.weight"
    target_proj = encoder.state_dict()[proj_key]
    if proj_key in state and state[proj_key].shape[1] != target_proj.shape[1] and adapt_in_channels:
        old = state[proj_key].shape[1]
        state[proj_key] = adapt_input_channels(state[proj_key], int(target_proj.shape[1]))
        report.adapted[proj_key] = f"in-channels {old} -> {target_proj.shape[1]}"
    fresh = ["layers[1-4]c.*", "*.relative_position_index"]
    return load_into(encoder, state, strict=strict, fresh=fresh, report=report, context="SwinUNETR.swinViT")


def build_swinunetr_ssl(
    source: SourceLike | None = None,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    out_channels: int = 14,
    in_channels: int | None = None,
    strict: bool = True,
    sha256: str | None = None,
    cache_dir: SourceLike | None = None,
    **swinunetr_kwargs: Any,
) -> tuple[nn.Module, LoadReport]:
    """A ``monai.networks.nets.SwinUNETR`` whose encoder matches the checkpoint and carries its weights.

    ``feature_size``, ``depths``, ``num_heads``, ``window_size``, ``patch_size`` and ``spatial_dims`` are read
    from the checkpoint; ``in_channels`` defaults to the checkpoint's (1 for ``model_swinvit.pt``; other values
    adapt the first kernel); ``out_channels`` (default 14, BTCV) and other SwinUNETR arguments are free. The
    decoder is randomly initialised. Returned in eval mode.
    """
    from monai.networks.nets import SwinUNETR

    raw = _raw_state(source, state_dict, sha256=sha256, cache_dir=cache_dir)
    config = infer_swin_config(raw)
    for name in ("feature_size", "depths", "num_heads", "window_size", "patch_size", "spatial_dims"):
        given = swinunetr_kwargs.get(name)
        if given is not None and _norm(given) != _norm(config[name]):
            raise ConfigError(f"{name}={given} does not match the checkpoint's {config[name]}")
    kwargs = {k: v for k, v in config.items() if k != "in_channels"}
    kwargs.update(swinunetr_kwargs)
    model = SwinUNETR(in_channels=in_channels or config["in_channels"], out_channels=out_channels, **kwargs)
    report = load_swinunetr_ssl(model, state_dict=raw, strict=strict)
    report.source = describe_source(source)
    return model.eval(), report


def _raw_state(
    source: SourceLike | None,
    state_dict: Mapping[str, Any] | None,
    *,
    sha256: str | None,
    cache_dir: SourceLike | None,
) -> dict[str, torch.Tensor]:
    if (source is None) == (state_dict is None):
        raise ConfigError("pass exactly one of source= (path/URL/hub id) or state_dict=")
    if state_dict is not None:
        return extract_state_dict(state_dict)
    return load_state_dict_from_source(source, sha256=sha256, cache_dir=cache_dir)  # type: ignore[arg-type]


def _norm(value: Any) -> Any:
    """Compare ``7`` and ``(7, 7, 7)`` as equal."""
    if isinstance(value, (list, tuple)):
        values = tuple(int(v) for v in value)
        return values[0] if len(set(values)) == 1 else values
    return int(value)
