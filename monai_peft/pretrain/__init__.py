"""monai_peft.pretrain: make your own foundation model - MAE self-supervised pretraining on unlabelled images.

``monai-peft pretrain DATA --out FOLDER`` or::

    from monai_peft.pretrain import MAEPretrainConfig, pretrain_mae, load_mae_vit
    pretrain_mae(MAEPretrainConfig(data="../shared/data/medmnist/pneumoniamnist_28.npz", out="runs/mae"))
    vit = load_mae_vit("runs/mae", num_classes=2)        # or load_backbone("mae_vit", "runs/mae", ...)

In a study file the result is the backbone ``{name: mae_vit, source: runs/mae}``. Modules:
:mod:`~monai_peft.pretrain.data` (npz / NIfTI folder), :mod:`~monai_peft.pretrain.mae` (training, resume),
:mod:`~monai_peft.pretrain.backbone` (the exported encoder and its loader).
"""

from monai_peft.pretrain.backbone import (
    load_mae_vit,
    load_mae_vit_with_report,
    read_mae_vit_meta,
)
from monai_peft.pretrain.data import UnlabelledImages, load_unlabelled
from monai_peft.pretrain.mae import MAEPretrainConfig, PretrainFolderError, build_mae, mae_loss, patchify, pretrain_mae

__all__ = [
    "MAEPretrainConfig",
    "PretrainFolderError",
    "UnlabelledImages",
    "build_mae",
    "load_mae_vit",
    "load_mae_vit_with_report",
    "load_unlabelled",
    "mae_loss",
    "patchify",
    "pretrain_mae",
    "read_mae_vit_meta",
]
