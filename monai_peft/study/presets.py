"""Targeting preset for the study's :class:`TinyViTClassifier` (LiteMedSAM's TinyViT with a pooled linear head); the
ViT backbones (``MonaiViTBackbone``: the ViT-B/16 checkpoints and ``mae_vit``) have a built-in preset in
:mod:`monai_peft.targeting`.

With them, ``target_modules=None`` finds the paper defaults on these networks (LoRA on q, v of every attention
block, adapters after the attention / MLP sub-layers, norm tuning on the LayerNorms ...), so every method of issue
12 that applies to a backbone runs there with its defaults. Registered with
:func:`monai_peft.targeting.register_preset`, without replacing a preset of the same name that another part of the
package registered first.
"""

from __future__ import annotations

from monai_peft.networks.heads import ClassificationModel
from monai_peft.targeting import NetworkPreset, TargetSpec, _tinyvit_roles, list_presets, register_preset

__all__ = ["TinyViTClassifier", "register_study_presets"]


class TinyViTClassifier(ClassificationModel):
    """LiteMedSAM TinyViT features (``encoder.backbone``) + :class:`~monai_peft.networks.heads.ClassificationHead`.

    A type of its own so that its preset never applies to a ``ClassificationModel`` around another encoder.
    Input ``(B, 3, 256, 256)`` -> logits ``(B, num_classes)``.
    """


def _tinyvit_classifier_preset() -> NetworkPreset:
    roles = _tinyvit_roles("encoder.backbone.")
    roles["head"] = TargetSpec(modules=["head"])
    roles["image_input"] = TargetSpec(modules=r"encoder\.backbone\.patch_embed")
    return NetworkPreset("monai_peft.study.TinyViTClassifier", (TinyViTClassifier,), roles)


def register_study_presets() -> None:
    """Register the preset once (a preset already registered under the same name is kept)."""
    have = set(list_presets())
    for make in (_tinyvit_classifier_preset,):
        preset = make()
        if preset.name not in have:
            register_preset(preset)
