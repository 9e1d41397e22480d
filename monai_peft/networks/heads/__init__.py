"""Task heads for token and multi-scale encoders: classification and 2D/3D segmentation.

Token utilities (``tokens_to_map`` ...), classification (``ClassificationHead``,
``ClassificationModel``), segmentation heads (``UNETRHead``, ``SETRPUPHead``,
``ProgressiveUpsamplingHead``, ``HierarchicalDecoderHead``), the encoder-decoder wrapper
``SegmentationModel`` and feature extractors for MONAI ViT / SwinUNETR, timm ViT / Swin and TinyViT
(LiteMedSAM). See ``docs/heads.md`` for which head suits which encoder.
"""

from monai_peft.networks.heads.classification import ClassificationHead, ClassificationModel
from monai_peft.networks.heads.extractors import (
    FeatureExtractor,
    MonaiViTFeatures,
    SwinUNETRFeatures,
    TimmHierarchicalFeatures,
    TimmViTFeatures,
    TinyViTFeatures,
    TokenHookFeatures,
    capture_outputs,
    evenly_spaced_indices,
)
from monai_peft.networks.heads.factory import SEGMENTATION_HEADS, build_segmentation_model
from monai_peft.networks.heads.init import HEAD_INIT_STD, init_new_head
from monai_peft.networks.heads.segmentation import (
    HierarchicalDecoderHead,
    ProgressiveUpsamplingHead,
    SegmentationModel,
    SETRPUPHead,
    UNETRHead,
)
from monai_peft.networks.heads.tokens import (
    grid_from_image,
    infer_grid,
    map_to_tokens,
    split_prefix_tokens,
    tokens_to_map,
)

__all__ = [
    "HEAD_INIT_STD",
    "SEGMENTATION_HEADS",
    "ClassificationHead",
    "ClassificationModel",
    "FeatureExtractor",
    "HierarchicalDecoderHead",
    "MonaiViTFeatures",
    "ProgressiveUpsamplingHead",
    "SETRPUPHead",
    "SegmentationModel",
    "SwinUNETRFeatures",
    "TimmHierarchicalFeatures",
    "TimmViTFeatures",
    "TinyViTFeatures",
    "TokenHookFeatures",
    "UNETRHead",
    "build_segmentation_model",
    "capture_outputs",
    "evenly_spaced_indices",
    "grid_from_image",
    "infer_grid",
    "init_new_head",
    "map_to_tokens",
    "split_prefix_tokens",
    "tokens_to_map",
]
