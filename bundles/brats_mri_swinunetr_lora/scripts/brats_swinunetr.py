"""Helpers of the ``brats_mri_swinunetr_lora`` bundle: input checks, masked normalisation, the network, base weights.

The configs import this file as a module named ``brats_swinunetr`` (``scripts/`` is put on ``sys.path`` by the
``helpers`` expression of each config), so nothing here clashes with another bundle's ``scripts`` package.

Data layout (BraTS 2013 as shipped in ``../shared/data/brats``): one folder per case holding
``Flair_subtrMeanDivStd.nii.gz`` and ``T1c_subtrMeanDivStd.nii.gz`` (240 x 240 x 155, 1 mm, z-scored within the
brain, constant background), ``OTMultiClass.nii.gz`` (0 background, 1 necrosis, 2 edema, 3 non-enhancing tumour,
4 enhancing tumour) and ``brainmask.nii.gz``.

Tensor shapes: images are channel-first ``(C=2, X, Y, Z)`` ``MetaTensor`` (FLAIR, T1c), labels ``(1, X, Y, Z)``;
the network maps ``(B, 2, X, Y, Z)`` to logits ``(B, 5, X, Y, Z)`` with ``X, Y, Z`` multiples of 32.
"""

from __future__ import annotations

import json
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.nets import SwinUNETR
from monai.transforms import MapTransform

from monai_peft.bundle.base_weights import read_base_weights, save_base_weights
from monai_peft.bundle.label_metrics import label_map_dice
from monai_peft.errors import CheckpointError, InputDataError

__all__ = [
    "CLASS_NAMES",
    "LABEL_FILE",
    "MODALITIES",
    "CheckMRInputd",
    "ForegroundZScored",
    "WholeTumourd",
    "brats_cases",
    "build_network",
    "foreground",
    "load_base_network",
    "save_base_weights",
]

#: file names of the input modalities inside a case folder, in channel order.
MODALITIES: tuple[str, ...] = ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")
#: the manual label map inside a case folder.
LABEL_FILE = "OTMultiClass.nii.gz"
#: output channels of the bundle's network.
CLASS_NAMES: dict[int, str] = {
    0: "background",
    1: "necrosis",
    2: "edema",
    3: "non-enhancing tumour",
    4: "enhancing tumour",
}

#: SwinUNETR hyper-parameters of the bundle (small enough to train on a CPU).
NETWORK_KWARGS: dict[str, Any] = {"in_channels": 2, "feature_size": 12, "spatial_dims": 3, "use_checkpoint": False}


def _source_names(meta: Mapping[str, Any] | None) -> str:
    """The file(s) an image came from, for error messages."""
    if not meta:
        return "<in-memory image>"
    src = meta.get("filename_or_obj")
    if isinstance(src, (list, tuple)):
        return ", ".join(str(s) for s in src)
    return str(src) if src else "<in-memory image>"


class CheckMRInputd(MapTransform):
    """Refuse an input the 3D bundle cannot segment, naming its file(s) and what to do.

    Checks, on the loaded channel-first image ``(C, X, Y, Z)``: 3 spatial dimensions each larger than
    ``min_size`` voxels (a 2D slice or a single-slice volume is refused), exactly ``num_channels`` channels
    (one per modality), and only finite voxels (NaN / Inf).

    Args:
        keys: image key(s).
        num_channels: number of modalities the network takes.
        modalities: their names, for the message.
        min_size: smallest accepted spatial extent in voxels.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_channels: int = 2,
        modalities: Sequence[str] = MODALITIES,
        min_size: int = 8,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = int(num_channels)
        self.modalities = list(modalities)
        self.min_size = int(min_size)

    def check(self, img: Any, where: str) -> None:
        """Raise :class:`~monai_peft.errors.InputDataError` if ``img`` (channel-first) is unusable."""
        shape = tuple(img.shape)
        if len(shape) != 4 or min(shape[1:]) < self.min_size:
            spatial = shape[1:] if len(shape) >= 2 else shape
            raise InputDataError(
                f"{where}: this is a 3D bundle and the image has spatial shape {spatial} (channel-first {shape}); it "
                f"needs 3D volumes of at least {self.min_size} voxels along each axis, one per modality "
                f"{self.modalities}. A 2D image or a single slice cannot be segmented by it: pass the whole volume."
            )
        if shape[0] != self.num_channels:
            raise InputDataError(
                f"{where}: the network takes {self.num_channels} channels ({', '.join(self.modalities)}) and the input "
                f"has {shape[0]}. Give one 3D file per modality, in that order (a case folder with those file names, "
                f"or a list of {self.num_channels} files), or one 4D file with {self.num_channels} channels."
            )
        arr = img.as_tensor() if isinstance(img, MetaTensor) else torch.as_tensor(np.asarray(img))
        finite = torch.isfinite(arr)
        if not bool(finite.all()):
            bad = (~finite).flatten(1).sum(1).tolist()
            per = ", ".join(f"{m}: {int(n)}" for m, n in zip(self.modalities, bad, strict=False))
            raise InputDataError(
                f"{where}: the volume holds NaN or infinite voxels ({per}). Fix or re-export the image (e.g. replace "
                "NaN by the background value) before running the bundle."
            )

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            meta = img.meta if isinstance(img, MetaTensor) else d.get(f"{key}_meta_dict")
            self.check(img, f"input '{_source_names(meta)}'")
        return d


def foreground(img: torch.Tensor) -> torch.Tensor:
    """Head mask of a channel-first MR volume ``(C, X, Y, Z)``: voxels above their channel's minimum in any channel.

    The BraTS volumes are z-scored within the brain with a constant background (the channel minimum); raw MR has a
    background of 0 = its minimum. Returns a boolean ``(1, X, Y, Z)`` tensor (``CropForegroundd``'s ``select_fn``).
    """
    x = torch.as_tensor(img)
    lo = x.flatten(1).amin(dim=1).view(-1, *([1] * (x.ndim - 1)))
    return (x > lo).any(dim=0, keepdim=True)


def _nonzero(img: torch.Tensor) -> torch.Tensor:
    """Voxels that are not 0 in any channel (the head after :class:`ForegroundZScored`)."""
    return (torch.as_tensor(img) != 0).any(dim=0, keepdim=True)


class ForegroundZScored(MapTransform):
    """Z-score each channel within the head mask (:func:`foreground`) and set the background to 0.

    ``x_c <- (x_c - mean_c) / std_c`` over the mask, 0 outside, so that zero padding (sliding window, training
    patches) equals the background. On the BraTS files (already z-scored within the brain) this is close to the
    identity inside the brain; on raw MR it gives the same statistics.
    """

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            mask = foreground(img)[0]
            out = torch.zeros_like(torch.as_tensor(img), dtype=torch.float32)
            src = torch.as_tensor(img).float()
            if bool(mask.any()):
                for c in range(src.shape[0]):
                    v = src[c][mask]
                    std = float(v.std()) if v.numel() > 1 else 0.0
                    out[c][mask] = (v - v.mean()) / (std if std > 1e-8 else 1.0)
            d[key] = MetaTensor(out, meta=img.meta) if isinstance(img, MetaTensor) else out
            if isinstance(img, MetaTensor):
                d[key].applied_operations = img.applied_operations  # not an invertible op: keep the trace
        return d


class WholeTumourd(MapTransform):
    """Labels 1-4 -> 1 (whole tumour), 0 stays 0: the base network's task."""

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = (d[key] > 0).to(torch.float32) if isinstance(d[key], torch.Tensor) else (np.asarray(d[key]) > 0)
        return d


def brats_cases(root: str | os.PathLike, names: Sequence[str], with_label: bool = True) -> list[dict[str, Any]]:
    """Datalist of BraTS case folders ``root/<name>``: ``{"image": [FLAIR, T1c], "label": OTMultiClass, "case"}``."""
    out = []
    for name in names:
        folder = Path(root) / name
        item: dict[str, Any] = {"image": [str(folder / m) for m in MODALITIES], "case": name}
        if with_label:
            item["label"] = str(folder / LABEL_FILE)
        missing = [p for p in [*item["image"], item.get("label")] if p and not Path(p).is_file()]
        if missing:
            raise InputDataError(f"BraTS case '{folder}' lacks {missing}; pass --data_root to the folder of the cases.")
        out.append(item)
    return out


def build_network(num_classes: int = 5, seed: int | None = 0) -> SwinUNETR:
    """The bundle's SwinUNETR ``(B, 2, X, Y, Z) -> (B, num_classes, X, Y, Z)`` (feature size 12, 4.1 M parameters).

    With ``seed`` set, the random initialisation is reproducible and does not touch the global RNG.
    """
    if seed is None:
        return SwinUNETR(out_channels=num_classes, **NETWORK_KWARGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return SwinUNETR(out_channels=num_classes, **NETWORK_KWARGS)


def load_base_network(base_file: str | os.PathLike, num_classes: int = 5, sha256: str | None = None) -> SwinUNETR:
    """The bundle's network with the base weights of ``base_file`` (safetensors, float16 stored, float32 in memory).

    The base was trained for whole-tumour segmentation (2 output channels: background, tumour). Every weight except
    the 1x1x1 output convolution is copied; the ``num_classes``-channel output convolution starts from the base's:
    channel 0 from its background channel, channels 1..num_classes-1 from its tumour channel, so the network
    initially predicts "tumour" for every tumour sub-class and the fine-tuning splits it (this is deterministic, so
    the adapter's base fingerprint does not depend on a random head).

    Args:
        base_file: ``models/base/base_model.safetensors`` (rebuild it with ``scripts/train_base.py``).
        num_classes: output channels of the bundle network.
        sha256: if given, the file's sha256 must equal it.

    Raises:
        CheckpointError: missing file, wrong hash, or weights of another architecture.
    """
    p = Path(base_file)
    tensors = read_base_weights(p, sha256, rebuild=f"python {Path(__file__).parent / 'train_base.py'}")
    net = build_network(num_classes, seed=0)
    state = net.state_dict()
    extra = sorted(set(tensors) - set(state))
    missing = sorted(set(state) - set(tensors))
    if extra or missing:
        raise CheckpointError(
            f"'{p}' does not hold the weights of this bundle's SwinUNETR ({len(missing)} missing, e.g. {missing[:3]}; "
            f"{len(extra)} unexpected, e.g. {extra[:3]}). Rebuild it with scripts/train_base.py."
        )
    new_state = {}
    for k, v in state.items():
        t = tensors[k].to(torch.float32)
        if k.startswith("out."):
            if t.shape[0] != 2:
                raise CheckpointError(
                    f"'{p}': output convolution {k} has {t.shape[0]} channels, expected 2 (base task)"
                )
            t = torch.cat([t[:1], t[1:2].expand(num_classes - 1, *t.shape[1:])], dim=0)
        if t.shape != v.shape:
            raise CheckpointError(f"'{p}': {k} has shape {tuple(t.shape)}, the network needs {tuple(v.shape)}")
        new_state[k] = t.clone()
    net.load_state_dict(new_state)
    return net


def preprocessing(
    stage: str = "inference",
    pixdim: Sequence[float] = (3.0, 3.0, 3.0),
    roi_size: Sequence[int] = (64, 64, 64),
    with_label: bool | None = None,
    whole_tumour: bool = False,
    num_channels: int = 2,
    modalities: Sequence[str] = MODALITIES,
    margin: int = 2,
) -> Any:
    """The bundle's MONAI transform chain for ``stage`` in ``{"train", "validate", "inference"}``.

    ``image`` (a list of one file or DICOM series folder per modality, loaded by ``monai_peft``'s ``LoadVolumed``
    with a geometry check between the modalities) -> ``(2, X, Y, Z)`` float32, RAS,
    z-scored within the head (:func:`foreground`, background set to 0), cropped to the head on the input grid, then
    resampled to ``pixdim`` (zero padding = background). Training
    pads to at least ``roi_size`` and draws one ``roi_size`` patch with a left-right flip and intensity jitter.
    ``label`` (when ``with_label``; default: not for inference) goes through the same spatial steps (nearest).
    Every spatial step is invertible, so ``Invertd`` maps a prediction back to the input grid.
    """
    from monai.transforms import (
        Compose,
        CropForegroundd,
        EnsureTyped,
        Orientationd,
        RandFlipd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        RandSpatialCropd,
        Spacingd,
        SpatialPadd,
    )

    from monai_peft.transforms import LoadVolumed

    if stage not in ("train", "validate", "inference"):
        raise ValueError(f"stage must be 'train', 'validate' or 'inference', got {stage!r}")
    if with_label is None:
        with_label = stage != "inference"
    keys = ["image", "label"] if with_label else ["image"]
    modes = ["bilinear", "nearest"] if with_label else ["bilinear"]
    xs: list[Any] = [
        LoadVolumed(keys=keys, reference_key=None),
        CheckMRInputd(keys="image", num_channels=num_channels, modalities=modalities),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
        Orientationd(keys=keys, axcodes="RAS"),
        ForegroundZScored(keys="image"),
        CropForegroundd(keys=keys, source_key="image", select_fn=_nonzero, margin=margin, allow_smaller=True),
        Spacingd(keys=keys, pixdim=list(pixdim), mode=modes, padding_mode="zeros"),
    ]
    if with_label and whole_tumour:
        xs.append(WholeTumourd(keys="label"))
    if stage == "train":
        xs += [
            SpatialPadd(keys=keys, spatial_size=list(roi_size)),
            RandSpatialCropd(keys=keys, roi_size=list(roi_size), random_size=False),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=0),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    return Compose(xs)


#: LoRA targets of the bundle: q and v of the fused qkv of every Swin attention block, and every convolution /
#: transposed convolution of the convolutional decoder (SwinUNETR's ``encoder1..4, encoder10, decoder1..5``).
LORA_TARGETS = r"swinViT\.layers[1-4]\.0\.blocks\.\d+\.attn\.qkv|(encoder(1|2|3|4|10)|decoder[1-5])\..*\.conv"
#: trained in full beside the LoRA matrices: the 1x1x1 segmentation head (5 classes).
HEAD_MODULES: tuple[str, ...] = ("out",)

#: the SwinUNETR modules outside the Swin encoder (the convolutional decoder and the segmentation head), trained in
#: full beside the LoRA matrices.
DECODER_MODULES: tuple[str, ...] = (
    "encoder1", "encoder2", "encoder3", "encoder4", "encoder10",
    "decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out",
)  # fmt: skip


def one_hot(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(B, 1, X, Y, Z)`` integer labels -> ``(B, num_classes, X, Y, Z)`` float one-hot."""
    return torch.nn.functional.one_hot(label[:, 0].long(), num_classes).permute(0, 4, 1, 2, 3).float()


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> list[float]:
    """Dice of each foreground class ``1..num_classes-1`` between label maps ``(1, X, Y, Z)`` (NaN where both are empty)."""
    return label_map_dice(pred, label, num_classes)


def fit(
    network: torch.nn.Module,
    train_data: Any,
    val_data: Any,
    *,
    num_classes: int,
    epochs: int,
    lr: float,
    val_every: int,
    roi_size: Sequence[int] = (64, 64, 64),
    weight_decay: float = 1e-5,
    log: Any = print,
) -> dict[str, Any]:
    """Train ``network`` (its parameters with ``requires_grad``) with DiceCE + AdamW, batch 1, one thread.

    Validation every ``val_every`` epochs (and after the last): sliding-window prediction on the preprocessed grid,
    mean Dice over the foreground classes; the best state (on validation) is loaded back at the end.

    Returns:
        ``{"best_metric", "best_epoch", "log", "wall_s"}``.
    """
    import time

    from monai.data import DataLoader
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    loader = DataLoader(train_data, batch_size=1, shuffle=True, num_workers=0)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    params = [p for p in network.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    best, best_epoch, best_state, history = -1.0, -1, None, []
    t0 = time.time()
    for epoch in range(1, epochs + 1):
        network.train()
        losses = []
        for batch in loader:
            opt.zero_grad()
            loss = loss_fn(network(batch["image"]), batch["label"])
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": sum(losses) / len(losses),
            "time_s": round(time.time() - t0, 1),
        }
        if epoch % val_every == 0 or epoch == epochs:
            network.eval()
            scores = []
            with torch.no_grad():
                for item in val_data:
                    logits = sliding_window_inference(item["image"][None], list(roi_size), 1, network, 0.25, "gaussian")
                    d = dice_per_class(logits.argmax(1, keepdim=True)[0], item["label"], num_classes)
                    scores.append(float(np.nanmean(d)) if not all(np.isnan(d)) else 0.0)
            entry["val_mean_dice"] = float(np.mean(scores))
            if entry["val_mean_dice"] > best:
                best, best_epoch = entry["val_mean_dice"], epoch
                best_state = {k: v.detach().clone() for k, v in network.state_dict().items()}
                entry["best"] = True
        history.append(entry)
        log(json.dumps(entry))
    if best_state is not None:
        network.load_state_dict(best_state)
    return {"best_metric": best, "best_epoch": best_epoch, "log": history, "wall_s": round(time.time() - t0, 1)}
