"""Helpers of the ``ct_totalseg_dynunet_lora`` bundle: label mapping, input checks, slabs, the network, base weights.

The configs import this file as a module named ``ct_dynunet`` (``scripts/`` is put on ``sys.path`` by the
``helpers`` expression of each config), so nothing here clashes with another bundle's helpers.

Data (``../shared/data``, never copied into the bundle):

* ``ct_dicom_series/``: one real CT series, 20 axial slices of 512 x 512, 0.977 mm pixels, 2 mm apart (JPEG 2000);
* ``totalseg/ct_dicom_series_label.nii.gz``: its TotalSegmentator label map (model output, 117-label v2 table);
* ``totalseg/example_ct_sm.nii.gz`` + ``example_seg.nii.gz``: another patient, 122 x 101 x 30 at 3 mm (base task).

Tensor shapes: images are channel-first ``(1, X, Y, Z)`` ``MetaTensor`` in RAS (Z = inferior -> superior), HU mapped
to ``[0, 1]`` by the abdomen window; labels ``(1, X, Y, Z)`` with the bundle's classes 0..6 (:data:`CLASS_NAMES`);
the network maps ``(B, 1, X, Y, Z)`` to logits ``(B, 7, X, Y, Z)`` with ``X, Y`` multiples of 8 and ``Z`` of 4.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.networks.nets import DynUNet
from monai.transforms import MapTransform

from monai_peft.bundle.base_weights import read_base_weights, save_base_weights
from monai_peft.bundle.label_metrics import label_map_dice
from monai_peft.errors import CheckpointError, InputDataError

__all__ = [
    "CLASS_NAMES",
    "HEAD_MODULES",
    "LORA_TARGETS",
    "NETWORK_KWARGS",
    "TOTALSEG_V2_IDS",
    "CheckCTVolumed",
    "ScoreSlabd",
    "SlabCropd",
    "TotalSegLabelsd",
    "build_network",
    "ct_cases",
    "dice_per_class",
    "load_base_network",
    "preprocessing",
    "save_base_weights",
    "segment_types",
    "totalseg_label_table",
]

#: output channels of the bundle's network (bundle label value -> TotalSegmentator class name).
CLASS_NAMES: dict[int, str] = {
    0: "background",
    1: "spleen",
    2: "liver",
    3: "stomach",
    4: "aorta",
    5: "autochthon_left",
    6: "autochthon_right",
}
#: TotalSegmentator v2 label ids of those classes (used only when a label file carries no label table; when it
#: does, the ids are read from the table by name and must agree with these).
TOTALSEG_V2_IDS: dict[str, int] = {
    "spleen": 1,
    "liver": 5,
    "stomach": 6,
    "aorta": 52,
    "autochthon_left": 86,
    "autochthon_right": 87,
}

#: DynUNet (nnU-Net-like) hyper-parameters: 4 levels, anisotropic last stride (thin stacks of 2 mm slices).
NETWORK_KWARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "kernel_size": [[3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]],
    "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 1]],
    "upsample_kernel_size": [[2, 2, 2], [2, 2, 2], [2, 2, 1]],
    "filters": [8, 16, 32, 64],
    "norm_name": ["INSTANCE", {"affine": True}],
    "res_block": False,
}

#: LoRA targets: every 3x3x3 convolution of the encoder, bottleneck and decoder, and the transposed convolutions.
LORA_TARGETS = (
    r"(input_block|downsamples\.\d|bottleneck|upsamples\.\d\.conv_block)\.conv\d\.conv|upsamples\.\d\.transp_conv\.conv"
)
#: trained in full beside the LoRA matrices: the 1x1x1 segmentation head (119 parameters).
HEAD_MODULES: tuple[str, ...] = ("output_block",)


def _source(meta: Mapping[str, Any] | None) -> str:
    if not meta:
        return "<in-memory image>"
    src = meta.get("filename_or_obj")
    return str(src) if src else "<in-memory image>"


# ---------------------------------------------------------------------------------------------------- labels
_CARET_LABEL = re.compile(r'<Label Key="(\d+)"[^>]*><!\[CDATA\[([^\]]+)\]\]></Label>')


@lru_cache(maxsize=8)
def totalseg_label_table(label_file: str) -> dict[str, int]:
    """``{class name: label id}`` from the label table a TotalSegmentator NIfTI carries (Caret XML extension).

    Returns ``{}`` when the file has no such table (then :data:`TOTALSEG_V2_IDS` is used).
    """
    import nibabel as nib

    img = nib.load(label_file)
    table: dict[str, int] = {}
    for ext in getattr(img.header, "extensions", []):
        text = ext.get_content()
        text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
        for key, name in _CARET_LABEL.findall(text):
            table[name.strip()] = int(key)
    return table


def class_ids(label_file: str | None) -> dict[int, int]:
    """``{TotalSegmentator id: bundle label value}`` for ``label_file``, names matched against its label table.

    Raises:
        InputDataError: the file's table lacks one of the bundle's classes, or gives it another id than
            TotalSegmentator v2 (another label convention: remap the file first).
    """
    table = totalseg_label_table(label_file) if label_file and str(label_file).endswith((".nii", ".nii.gz")) else {}
    out: dict[int, int] = {}
    for value, name in CLASS_NAMES.items():
        if value == 0:
            continue
        if table:
            if name not in table:
                raise InputDataError(
                    f"label file '{label_file}' has a label table without '{name}' (it names {len(table)} classes, "
                    f"e.g. {sorted(table)[:5]}); this bundle needs TotalSegmentator v2 labels {sorted(TOTALSEG_V2_IDS)}."
                )
            if table[name] != TOTALSEG_V2_IDS[name]:
                raise InputDataError(
                    f"label file '{label_file}' gives '{name}' the id {table[name]}, not the TotalSegmentator v2 id "
                    f"{TOTALSEG_V2_IDS[name]}: remap the labels to the v2 table before training."
                )
        out[TOTALSEG_V2_IDS[name]] = value
    return out


class TotalSegLabelsd(MapTransform):
    """Map TotalSegmentator label ids to the bundle's classes (:data:`CLASS_NAMES`), every other id to 0.

    ``(1, X, Y, Z)`` TotalSegmentator label map (ids 0..117) -> ``(1, X, Y, Z)`` float32 with values 0..6. The ids
    come from the file's own label table when it has one (:func:`class_ids`).
    """

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            lab = d[key]
            meta = lab.meta if isinstance(lab, MetaTensor) else {}
            lut_map = class_ids(_source(meta) if meta else None)
            arr = torch.as_tensor(lab).long()
            if int(arr.min()) < 0:
                raise InputDataError(f"label '{_source(meta)}' has negative values; it is not a TotalSegmentator map.")
            lut = torch.zeros(max(int(arr.max()), max(lut_map)) + 1, dtype=torch.float32)
            for src, dst in lut_map.items():
                lut[src] = float(dst)
            mapped = lut[arr]
            if isinstance(lab, MetaTensor):
                out = MetaTensor(mapped, meta=lab.meta)
                out.applied_operations = lab.applied_operations
                d[key] = out
            else:
                d[key] = mapped
        return d


# ---------------------------------------------------------------------------------------------------- checks
class CheckCTVolumed(MapTransform):
    """Refuse an image the 3D CT bundle cannot segment: not 3D, a too thin stack, or more than one channel.

    Checks the loaded channel-first image ``(C, X, Y, Z)``: ``C == 1`` and every spatial extent ``>= min_size``
    voxels. NaN / Inf voxels are refused by ``monai_peft.transforms.CheckFinited`` just before.
    """

    def __init__(self, keys: KeysCollection, min_size: int = 4, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = int(min_size)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            where = _source(img.meta if isinstance(img, MetaTensor) else None)
            shape = tuple(img.shape)
            if len(shape) != 4 or min(shape[1:]) < self.min_size:
                raise InputDataError(
                    f"input '{where}': this 3D CT bundle needs a volume of at least {self.min_size} voxels along each "
                    f"axis, and the image has shape {shape[1:] if len(shape) > 1 else shape} (channel-first {shape}). "
                    "A single slice or 2D image cannot be segmented: pass the whole series folder or 3D file."
                )
            if shape[0] != 1:
                raise InputDataError(
                    f"input '{where}' has {shape[0]} channels; the network takes one CT channel (HU). Pass a single "
                    "grey-level CT volume (one DICOM series or one 3D NIfTI file) per case."
                )
        return d


class SlabCropd(MapTransform):
    """Keep the axial slices ``slab = (lo, hi)`` (RAS Z indices, ``lo`` inclusive, ``hi`` exclusive) of every key.

    Used for the bundle's split of the single CT series: training slab, validation slab, held-out slab. The crop is
    a ``monai.transforms.SpatialCropd`` (the affine follows); a volume with fewer than ``hi`` slices is refused.
    """

    def __init__(self, keys: KeysCollection, slab: Sequence[int], allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        lo, hi = (int(v) for v in slab)
        if not 0 <= lo < hi:
            raise ValueError(f"slab must be (lo, hi) with 0 <= lo < hi, got {tuple(slab)}")
        self.slab = (lo, hi)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        from monai.transforms import SpatialCropd

        d = dict(data)
        keys = list(self.key_iterator(d))
        for key in keys:
            if d[key].shape[-1] < self.slab[1]:
                raise InputDataError(
                    f"'{_source(getattr(d[key], 'meta', None))}' has {d[key].shape[-1]} slices, fewer than the slab "
                    f"{self.slab} needs; override the slabs (train_slab, val_slab, test_slab) for this series."
                )
        big = 1 << 30
        return SpatialCropd(keys, roi_start=[0, 0, self.slab[0]], roi_end=[big, big, self.slab[1]])(d)


class ScoreSlabd(MapTransform):
    """Keep slices ``slab = (lo, hi)`` of the last axis of one-hot predictions and labels ``(C, X, Y, Z)`` before a
    metric, so Dice is computed on that slab only (e.g. the held-out slices 14-19 of the series)."""

    def __init__(self, keys: KeysCollection, slab: Sequence[int] | None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slab = None if slab is None else tuple(int(v) for v in slab)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.slab is None:
            return d
        lo, hi = self.slab
        for key in self.key_iterator(d):
            if d[key].shape[-1] < hi:
                raise InputDataError(f"cannot score slices {lo}..{hi - 1}: '{key}' has {d[key].shape[-1]} slices")
            d[key] = d[key][..., lo:hi]
        return d


# ---------------------------------------------------------------------------------------------------- data
def ct_cases(data_root: str | os.PathLike, series: str, label: str) -> list[dict[str, Any]]:
    """Datalist of one labelled case: ``[{"image": data_root/series, "label": data_root/label, "case": name}]``."""
    image, lab = Path(data_root) / series, Path(data_root) / label
    missing = [str(p) for p in (image, lab) if not p.exists()]
    if missing:
        raise InputDataError(f"training data {missing} not found; pass --data_root to the shared data folder.")
    return [{"image": str(image), "label": str(lab), "case": Path(series).name.split(".")[0]}]


def preprocessing(
    stage: str = "inference",
    pixdim: Sequence[float] = (3.0, 3.0, 2.0),
    roi_size: Sequence[int] = (64, 64, 16),
    window: str | Sequence[float] = "abdomen",
    slab: Sequence[int] | None = None,
    with_label: bool | None = None,
    num_samples: int = 2,
) -> Any:
    """The bundle's MONAI transform chain for ``stage`` in ``{"train", "validate", "inference"}``.

    ``image`` (a DICOM series folder or a 3D NIfTI/NRRD file, ``monai_peft.transforms.LoadVolumed``) ->
    NaN/Inf check -> 3D / one-channel check -> (label: geometry check against the image, TotalSegmentator ids ->
    classes 0..6) -> RAS -> optional axial ``slab`` -> resampled to ``pixdim`` mm (bilinear image, nearest label)
    -> abdomen window (HU -160..240 -> 0..1) -> float32 ``(1, X, Y, Z)``. Training pads to ``roi_size`` and draws
    ``num_samples`` patches centred on a voxel of a class drawn uniformly (background included, so small organs are sampled as often as the liver) with intensity jitter; no left-right flip (the classes
    include left and right muscles). Every spatial step of the inference chain is invertible (``Invertd``).
    """
    from monai.transforms import (
        EnsureTyped,
        Orientationd,
        RandCropByLabelClassesd,
        RandScaleIntensityd,
        RandShiftIntensityd,
        Spacingd,
        SpatialPadd,
    )

    from monai_peft.transforms import CheckFinited, CheckGeometryd, HUWindowd, LoadVolumed, PresetCompose

    if stage not in ("train", "validate", "inference"):
        raise ValueError(f"stage must be 'train', 'validate' or 'inference', got {stage!r}")
    if with_label is None:
        with_label = stage != "inference"
    keys = ["image", "label"] if with_label else ["image"]
    win = window if isinstance(window, str) else tuple(float(v) for v in window)
    xs: list[Any] = [
        LoadVolumed(keys=keys, reference_key="image"),
        CheckFinited(keys=keys),
        CheckCTVolumed(keys="image"),
    ]
    if with_label:
        xs += [CheckGeometryd(keys=keys, match_orientation=True), TotalSegLabelsd(keys="label")]
    xs.append(Orientationd(keys=keys, axcodes="RAS", labels=None))
    if slab is not None:
        xs.append(SlabCropd(keys=keys, slab=slab))
    xs += [
        Spacingd(keys=keys, pixdim=tuple(pixdim), mode=["bilinear", "nearest"][: len(keys)], padding_mode="zeros"),
        HUWindowd(keys="image", window=win),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True),
    ]
    if stage == "train":
        xs += [
            SpatialPadd(keys=keys, spatial_size=list(roi_size)),
            RandCropByLabelClassesd(
                keys=keys,
                label_key="label",
                spatial_size=list(roi_size),
                num_classes=len(CLASS_NAMES),
                num_samples=num_samples,
                warn=False,
            ),  # fmt: skip
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=0.5),
        ]
    return PresetCompose(xs)


def segment_types() -> dict[int, Any]:
    """SNOMED CT codes of the segmented property type of each class, for the DICOM SEG."""
    from pydicom.sr.codedict import codes

    return {
        1: codes.SCT.Spleen,
        2: codes.SCT.Liver,
        3: codes.SCT.Stomach,
        4: codes.SCT.Aorta,
        5: codes.SCT.ErectorSpinaeMuscle,
        6: codes.SCT.ErectorSpinaeMuscle,
    }


def segment_category() -> Any:
    """Segmented property category of every segment (SNOMED CT 'Anatomical Structure')."""
    from pydicom.sr.codedict import codes

    return codes.SCT.AnatomicalStructure


# ---------------------------------------------------------------------------------------------------- network
def build_network(num_classes: int = 7, seed: int | None = 0) -> DynUNet:
    """The bundle's DynUNet ``(B, 1, X, Y, Z) -> (B, num_classes, X, Y, Z)`` (1.37 M parameters).

    With ``seed`` set, the initialisation is reproducible and leaves the global RNG untouched.
    """
    if seed is None:
        return DynUNet(out_channels=num_classes, **NETWORK_KWARGS)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DynUNet(out_channels=num_classes, **NETWORK_KWARGS)


def load_base_network(base_file: str | os.PathLike, num_classes: int = 7, sha256: str | None = None) -> DynUNet:
    """The bundle's DynUNet with the base weights of ``base_file`` (float16 on disk, float32 in memory).

    Args:
        base_file: ``models/base/base_model.safetensors`` (rebuild it with ``scripts/train_base.py``).
        num_classes: output channels (the base was trained for the same 7 classes on another CT).
        sha256: if given, the file's sha256 must equal it (the base the shipped adapter was trained on).

    Raises:
        CheckpointError: missing file, another sha256, or weights of another architecture.
    """
    p = Path(base_file)
    tensors = read_base_weights(p, sha256, rebuild=f"python {Path(__file__).parent / 'train_base.py'}")
    net = build_network(num_classes, seed=0)
    state = net.state_dict()
    missing, extra = sorted(set(state) - set(tensors)), sorted(set(tensors) - set(state))
    bad = [k for k in state if k in tensors and tuple(tensors[k].shape) != tuple(state[k].shape)]
    if missing or extra or bad:
        raise CheckpointError(
            f"'{p}' does not hold this bundle's DynUNet with {num_classes} classes ({len(missing)} missing, e.g. "
            f"{missing[:2]}; {len(extra)} unexpected, e.g. {extra[:2]}; {len(bad)} of another shape, e.g. {bad[:2]}). "
            "Rebuild it with scripts/train_base.py."
        )
    net.load_state_dict({k: tensors[k].to(torch.float32) for k in state})
    return net


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int = 7) -> dict[str, float]:
    """Dice of each foreground class between label maps of equal shape (NaN where both are empty).

    ``2 |P_c & G_c| / (|P_c| + |G_c|)`` for ``c = 1..num_classes-1``, keyed by class name.
    """
    scores = label_map_dice(pred, label, num_classes)
    return {CLASS_NAMES.get(c, str(c)): v for c, v in enumerate(scores, start=1)}


def mean_dice(scores: Mapping[str, float]) -> float:
    """Mean of the non-NaN class Dice values (0.0 when all are NaN)."""
    vals = [v for v in scores.values() if not np.isnan(v)]
    return float(np.mean(vals)) if vals else 0.0
