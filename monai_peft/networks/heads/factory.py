"""Build a :class:`SegmentationModel` from a feature extractor and a head name."""

from __future__ import annotations

from typing import Any

from monai_peft.errors import ConfigError
from monai_peft.networks.heads.extractors import FeatureExtractor
from monai_peft.networks.heads.segmentation import (
    HierarchicalDecoderHead,
    ProgressiveUpsamplingHead,
    SegmentationModel,
    SETRPUPHead,
    UNETRHead,
)

__all__ = ["SEGMENTATION_HEADS", "build_segmentation_model"]

SEGMENTATION_HEADS = ("unetr", "setr_pup", "pup", "hierarchical")


def build_segmentation_model(
    encoder: FeatureExtractor, head: str = "unetr", out_channels: int = 2, **head_kwargs: Any
) -> SegmentationModel:
    """``SegmentationModel(encoder, <head>)`` with the head's shapes read from the extractor.

    Args:
        encoder: a feature extractor (``MonaiViTFeatures``, ``TimmViTFeatures``, ``SwinUNETRFeatures``,
            ``TimmHierarchicalFeatures``, ``TinyViTFeatures`` ...).
        head: ``"unetr"`` (:class:`UNETRHead`), ``"setr_pup"`` (:class:`SETRPUPHead`), ``"pup"``
            (:class:`ProgressiveUpsamplingHead`) for token encoders; ``"hierarchical"``
            (:class:`HierarchicalDecoderHead`) for multi-scale encoders.
        out_channels: number of classes.
        head_kwargs: further head arguments (``feature_size``, ``channels``, ``norm_name`` ...). For
            ``"unetr"`` and ``"hierarchical"``, ``image_channels`` defaults to the encoder's input channels.

    Raises:
        ConfigError: unknown head, a token head on a multi-scale encoder, or an encoder returning the
            wrong number of features for a UNETR head (mismatched number of skips).

    Example::

        >>> enc = MonaiViTFeatures(ViT(1, 96, 16, spatial_dims=3))       # blocks 3, 6, 9, 12
        >>> model = build_segmentation_model(enc, "unetr", out_channels=14)
    """
    if head not in SEGMENTATION_HEADS:
        raise ConfigError(f"unknown segmentation head {head!r}; choose one of {SEGMENTATION_HEADS}.")
    dims = encoder.spatial_dims
    if head == "hierarchical":
        head_kwargs.setdefault("image_channels", encoder.image_channels)
        decoder = HierarchicalDecoderHead(
            dims, encoder.feature_channels, encoder.feature_strides, out_channels, **head_kwargs
        )
        return SegmentationModel(encoder, decoder)
    patch = getattr(encoder, "patch_size", None)
    if patch is None:
        raise ConfigError(
            f"head {head!r} decodes the tokens of a plain ViT, but {type(encoder).__name__} is a multi-scale encoder; "
            "use head='hierarchical'."
        )
    width = encoder.feature_channels[-1]
    if head == "unetr":
        head_kwargs.setdefault("image_channels", encoder.image_channels)
        decoder = UNETRHead(dims, width, out_channels, patch_size=patch, **head_kwargs)
        if len(encoder.feature_channels) != decoder.num_features:
            indices = getattr(encoder, "indices", None)
            raise ConfigError(
                f"UNETRHead for patch size {patch} needs {decoder.num_features} encoder features "
                f"({decoder.num_features - 1} skips + bottleneck), the encoder returns {len(encoder.feature_channels)} "
                f"(indices {indices}): mismatched number of skips. Build the extractor with "
                f"indices=evenly_spaced_indices(num_layers, {decoder.num_features})."
            )
    elif head == "setr_pup":
        decoder = SETRPUPHead(dims, width, out_channels, patch_size=patch, **head_kwargs)
    else:
        decoder = ProgressiveUpsamplingHead(dims, width, out_channels, patch_size=patch, **head_kwargs)
    return SegmentationModel(encoder, decoder)
