"""monai_peft.networks: pretrained backbones and weight converters (see ``docs/backbones.md``).

* :mod:`~monai_peft.networks.sources` - resolve a weight source (path, URL + SHA-256, ``hf://``, ``pkg://``)
  and load it safely (safetensors / ``torch.load(weights_only=True)``).
* :mod:`~monai_peft.networks.vit` - timm / MAE / MRM / CXR-MAE ViT checkpoints as MONAI ViTs (and timm models).
* :mod:`~monai_peft.networks.swin` - SwinUNETR self-supervised encoder weights (``model_swinvit.pt``).
* :mod:`~monai_peft.networks.litemedsam` - LiteMedSAM TinyViT encoder and box-prompted model.
* :mod:`~monai_peft.networks.efficientnet` - EfficientNet-Lite0 ImageNet weights as a MONAI EfficientNet.
* :mod:`~monai_peft.networks.factory` - ``load_backbone(name, source=None, **kwargs)``.

Names are imported lazily (``import monai`` and ``timm`` are slow), so ``import monai_peft.networks`` is cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # sources
    "WeightSource": "sources",
    "default_cache_dir": "sources",
    "download_weights": "sources",
    "extract_state_dict": "sources",
    "load_checkpoint": "sources",
    "load_state_dict_from_source": "sources",
    "parse_source": "sources",
    "resolve_source": "sources",
    "sha256_file": "sources",
    # reports
    "LoadReport": "reports",
    "load_into": "reports",
    # adaptations
    "adapt_input_channels": "adapt",
    "resample_patch_embed": "adapt",
    "resample_pos_embed": "adapt",
    # ViT
    "MonaiViTBackbone": "vit",
    "ViTSpec": "vit",
    "build_monai_vit": "vit",
    "create_timm_vit": "vit",
    "infer_vit_spec": "vit",
    "load_monai_vit": "vit",
    "load_vit_backbone": "vit",
    "monai_to_timm_vit_state_dict": "vit",
    "timm_to_monai_vit_state_dict": "vit",
    # SwinUNETR
    "build_swinunetr_ssl": "swin",
    "infer_swin_config": "swin",
    "load_swinunetr_ssl": "swin",
    "swinvit_ssl_to_monai_state_dict": "swin",
    # LiteMedSAM
    "LiteMedSAM": "litemedsam",
    "LiteMedSAMEncoder": "litemedsam",
    "load_litemedsam": "litemedsam",
    "load_litemedsam_encoder": "litemedsam",
    "tinyvit_qkv_indices": "litemedsam",
    # EfficientNet-Lite0
    "EfficientNetLite0": "efficientnet",
    "create_timm_efficientnet_lite0": "efficientnet",
    "efficientnet_lite0_to_timm_state_dict": "efficientnet",
    "load_efficientnet_lite0": "efficientnet",
    # registry
    "BackboneInfo": "factory",
    "backbone_info": "factory",
    "list_backbones": "factory",
    "load_backbone": "factory",
    "load_backbone_with_report": "factory",
    "register_backbone": "factory",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'monai_peft.networks' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
