"""Study data of ``dataset.kind: segmentation_datalist``: 3D images and label maps behind the test-split guard.

The dataset is a MONAI (Decathlon-style) datalist: a JSON file (``dataset.path``; relative paths are relative to
the JSON's folder) or the same mapping inline (``dataset.datalist``; relative paths are relative to
``dataset.root``, which may use ``${MONAI_PEFT_SHARED_DATA:-../shared/data}``)::

    {"training":   [{"image": ["case1/flair.nii.gz", "case1/t1c.nii.gz"], "label": "case1/seg.nii.gz"}, ...],
     "validation": [...],
     "test":       [...]}

``image`` is one file (3D, or 4D with the channels last) or a list of one 3D file per modality (stacked as
channels in that order); ``label`` is an integer label map of the same grid with values ``0..num_classes-1``.
An optional ``"case"`` names the item (default: the label file's folder and name). Without ``"validation"`` /
``"test"`` lists, the **split rule** applies to ``"training"``: the items are shuffled with a fixed seed (0), the
first ``max(1, round(0.2 n))`` are the test split, the next ``max(1, round(0.2 n))`` the validation split, the
rest the training split (at least one case each; so ``n >= 3``).

Keys (``dataset.*``): ``channels`` (modalities per image, checked against every item), ``num_classes`` (required),
``roi_size`` (required: training patch and sliding-window size, e.g. ``[64, 64, 64]``; multiples of 32 for
SwinUNETR), ``spacing`` (mm; null keeps each image's grid), ``class_names`` (one per label value, tables),
``modalities`` (one per channel, messages), ``samples_per_case`` (random patches per training case per epoch,
default 1).

Preprocessing of every case (:func:`load_case`): load -> channel-first ``(C, X, Y, Z)`` float32 + label
``(1, X, Y, Z)`` -> RAS orientation -> resample to ``spacing`` (bilinear / nearest) -> z-score of each channel
within the head (voxels above the channel's minimum in any channel; the background, also the padding value, set to
0). The whole volume is kept (no crop): the test is sliding-window inference on the full volume.

:class:`SegSplits` is a :class:`~monai_peft.study.data.GuardedSplits`: ``train()`` / ``val()`` return lists of
:class:`SegCase`, ``test()`` raises :class:`~monai_peft.study.data.TestAccessError` before
``finalize_selection``. Volumes are read lazily, on the first access of their split, so the test files are not
even opened before the selection is final (``read_log`` records which split's files were read, in order).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from monai_peft.errors import ConfigError, InputDataError
from monai_peft.study.data import GuardedSplits, TestAccessError
from monai_peft.study.schema import BudgetSpec, DatasetSpec

__all__ = [
    "SegCase",
    "SegSplits",
    "case_budget",
    "load_case",
    "load_seg_splits",
    "read_datalist",
    "validate_seg_dataset",
    "write_datalist",
]

SPLIT_SEED = 0
SPLIT_FRACTION = 0.2
_KEYS = {"training": "train", "validation": "val", "test": "test"}


def validate_seg_dataset(spec: DatasetSpec) -> None:
    """Schema checks of a ``segmentation_datalist`` dataset (no file is read)."""
    where = "dataset (segmentation_datalist)"
    if bool(spec.path) == (spec.datalist is not None):
        raise ConfigError(
            f"{where} needs exactly one of path: (a datalist JSON) or datalist: (the mapping inline, paths relative "
            "to root:)."
        )
    if spec.datalist is not None and not isinstance(spec.datalist, dict):
        raise ConfigError(f"{where}: datalist: must be a mapping with a 'training' list, got {spec.datalist!r}.")
    if not isinstance(spec.channels, int) or isinstance(spec.channels, bool) or spec.channels < 1:
        raise ConfigError(f"{where}: channels must be the number of modalities (>= 1), got {spec.channels!r}.")
    if spec.num_classes is None or not isinstance(spec.num_classes, int) or spec.num_classes < 2:
        raise ConfigError(
            f"{where} needs num_classes: (label values 0..num_classes-1 with 0 = background; >= 2), got "
            f"{spec.num_classes!r}."
        )
    if spec.roi_size is None or len(spec.roi_size) != 3 or any(not isinstance(v, int) or v < 4 for v in spec.roi_size):
        raise ConfigError(
            f"{where} needs roi_size: [X, Y, Z] (three integers >= 4: training patch and sliding-window size), got "
            f"{spec.roi_size!r}."
        )
    if spec.spacing is not None and (
        len(spec.spacing) != 3 or any(not isinstance(v, (int, float)) or not v > 0 for v in spec.spacing)
    ):
        raise ConfigError(f"{where}: spacing must be three positive numbers in mm (or null), got {spec.spacing!r}.")
    if spec.class_names is not None and len(spec.class_names) != spec.num_classes:
        raise ConfigError(
            f"{where}: class_names has {len(spec.class_names)} names but num_classes is {spec.num_classes} (one name "
            "per label value, the background first)."
        )
    if spec.modalities is not None and len(spec.modalities) != spec.channels:
        raise ConfigError(
            f"{where}: modalities has {len(spec.modalities)} names but channels is {spec.channels} (one per channel)."
        )
    if spec.samples_per_case is not None and (not isinstance(spec.samples_per_case, int) or spec.samples_per_case < 1):
        raise ConfigError(f"{where}: samples_per_case must be an integer >= 1, got {spec.samples_per_case!r}.")


def class_names(spec: DatasetSpec) -> tuple[str, ...]:
    """A name per label value: ``class_names``, else ``"0"``, ``"1"``, ..."""
    return tuple(spec.class_names) if spec.class_names else tuple(str(i) for i in range(int(spec.num_classes)))


@dataclass(frozen=True)
class SegItem:
    """One datalist entry: ``image`` files (one per modality, or one multi-channel file), ``label`` file."""

    case: str
    image: tuple[str, ...]
    label: str


def _items(entries: Any, base: Path, key: str, source: str) -> list[SegItem]:
    if not isinstance(entries, list):
        raise InputDataError(f"{source}: '{key}' must be a list of {{'image': ..., 'label': ...}}, got {entries!r}.")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or "image" not in e:
            raise InputDataError(f"{source}: {key}[{i}] needs an 'image' (a path or a list of paths per modality).")
        if "label" not in e:
            raise InputDataError(
                f"{source}: {key}[{i}] ({e.get('image')!r}) has no 'label'; every case of a segmentation study needs "
                "a label map (add 'label': <path>, or remove the case)."
            )
        images = e["image"] if isinstance(e["image"], list) else [e["image"]]
        paths = tuple(str(p if Path(p).is_absolute() else base / p) for p in images)
        label = str(e["label"] if Path(e["label"]).is_absolute() else base / e["label"])
        name = e.get("case") or f"{Path(label).parent.name}/{Path(label).name.split('.')[0]}"
        out.append(SegItem(str(name), paths, label))
    return out


def read_datalist(spec: DatasetSpec) -> tuple[dict[str, list[SegItem]], str]:
    """``({"train": [...], "val": [...], "test": [...]}, source)``; files are checked to exist, not read.

    Raises:
        InputDataError: missing JSON / files, entries without a label, a split with no case.
    """
    if spec.path:
        path = Path(spec.path)
        if not path.is_file():
            raise InputDataError(f"datalist JSON {path} does not exist (dataset.path).")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise InputDataError(f"datalist {path} is not valid JSON: {exc}") from exc
        base, source = path.parent, f"datalist {path}"
    else:
        data, base = spec.datalist, Path(spec.root or ".")
        source = f"inline datalist (root {base})"
    if not isinstance(data, dict) or "training" not in data:
        raise InputDataError(f"{source} needs a 'training' list (and optionally 'validation' and 'test').")
    unknown = sorted(set(data) - set(_KEYS) - {"name", "description", "labels", "modality", "numTraining"})
    if unknown:
        raise InputDataError(f"{source}: unknown list(s) {unknown}; the lists are 'training', 'validation', 'test'.")
    splits = {_KEYS[k]: _items(v, base, k, source) for k, v in data.items() if k in _KEYS}
    if "val" not in splits and "test" not in splits:
        items = list(splits["train"])
        n = len(items)
        if n < 3:
            raise InputDataError(
                f"{source} lists {n} training case(s) and no 'validation' / 'test'; the split rule needs at least 3 "
                "(or give 'validation' and 'test' lists)."
            )
        random.Random(SPLIT_SEED).shuffle(items)
        k = max(1, round(SPLIT_FRACTION * n))
        splits = {"test": items[:k], "val": items[k : 2 * k], "train": items[2 * k :]}
    for split in ("train", "val", "test"):
        if not splits.get(split):
            raise InputDataError(
                f"{source}: the {split} split has no case; a study needs training, validation and test cases (give "
                "both 'validation' and 'test', or neither for the documented split rule)."
            )
    missing = [p for items in splits.values() for it in items for p in (*it.image, it.label) if not Path(p).is_file()]
    if missing:
        raise InputDataError(
            f"{source}: {len(missing)} listed file(s) do not exist, e.g. {missing[:3]}; fix the paths."
        )
    for items in splits.values():
        for it in items:
            if len(it.image) > 1 and len(it.image) != spec.channels:
                raise InputDataError(
                    f"{source}: case {it.case!r} lists {len(it.image)} image files but dataset.channels is "
                    f"{spec.channels}; give one file per modality{_modalities(spec)}."
                )
    return splits, source


def _modalities(spec: DatasetSpec) -> str:
    return f" ({', '.join(spec.modalities)})" if spec.modalities else ""


@dataclass(frozen=True)
class SegCase:
    """One preprocessed case: ``image`` float32 ``(C, X, Y, Z)``, ``label`` int64 ``(1, X, Y, Z)``."""

    case: str
    image: torch.Tensor
    label: torch.Tensor


def _foreground_zscore(img: torch.Tensor) -> torch.Tensor:
    """Z-score each channel of ``(C, X, Y, Z)`` within the head (above the channel minimum in any channel); 0 outside."""
    lo = img.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
    mask = (img > lo).any(dim=0)
    out = torch.zeros_like(img)
    if bool(mask.any()):
        for c in range(img.shape[0]):
            v = img[c][mask]
            std = float(v.std()) if v.numel() > 1 else 0.0
            out[c][mask] = (v - v.mean()) / (std if std > 1e-8 else 1.0)
    return out


def load_case(item: SegItem, spec: DatasetSpec) -> SegCase:
    """Read and preprocess one case (see the module docstring).

    Raises:
        InputDataError: wrong channel count, not 3D, image and label grids differ, label values outside
            ``0..num_classes-1``, non-finite voxels.
    """
    from monai.data import MetaTensor
    from monai.transforms import LoadImage, Orientationd, Spacingd

    loader = LoadImage(image_only=True, ensure_channel_first=True)
    try:
        parts = [loader(p) for p in item.image]
        label = loader(item.label)
    except Exception as exc:
        raise InputDataError(f"case {item.case!r}: cannot read {item.image} / {item.label}: {exc}") from exc
    for p, t in zip(item.image, parts, strict=True):
        if t.ndim != 4:
            raise InputDataError(f"case {item.case!r}: {p} has shape {tuple(t.shape)}; a 3D volume is needed.")
    shapes = {tuple(t.shape[1:]) for t in parts}
    if len(shapes) > 1:
        raise InputDataError(f"case {item.case!r}: the modalities have different grids {sorted(shapes)}.")
    image = MetaTensor(torch.cat([t.as_tensor() for t in parts]).float(), meta=parts[0].meta)
    if image.shape[0] != spec.channels:
        raise InputDataError(
            f"case {item.case!r}: the image has {image.shape[0]} channel(s) but dataset.channels is {spec.channels}; "
            f"give {spec.channels} modalities{_modalities(spec)} (a list of files or one 4D file)."
        )
    if tuple(label.shape[1:]) != tuple(image.shape[1:]) or label.shape[0] != 1:
        raise InputDataError(
            f"case {item.case!r}: label {item.label} has shape {tuple(label.shape[1:])}, the image "
            f"{tuple(image.shape[1:])}; the label map must be one channel on the image's grid."
        )
    if not bool(torch.isfinite(image.as_tensor()).all()):
        raise InputDataError(f"case {item.case!r}: the image holds NaN or infinite voxels; fix the file(s).")
    d: dict[str, Any] = {"image": image, "label": MetaTensor(label.as_tensor().float(), meta=label.meta)}
    d = Orientationd(keys=["image", "label"], axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(d)
    if spec.spacing is not None:
        d = Spacingd(keys=["image", "label"], pixdim=list(spec.spacing), mode=["bilinear", "nearest"])(d)
    lab = torch.as_tensor(d["label"]).round().long()
    values = sorted(int(v) for v in torch.unique(lab))
    bad = [v for v in values if not 0 <= v < int(spec.num_classes)]
    if bad:
        raise InputDataError(
            f"case {item.case!r}: label {item.label} holds values {bad} outside 0..{spec.num_classes - 1} "
            f"(num_classes {spec.num_classes}); set num_classes or fix the labels."
        )
    img = _foreground_zscore(torch.as_tensor(d["image"]).float().contiguous())
    return SegCase(item.case, img, lab.contiguous())


#: preprocessed cases by (files, preprocessing keys), kept for the life of the process (cells reuse them).
_CACHE: dict[tuple, SegCase] = {}


def _cached(item: SegItem, spec: DatasetSpec) -> SegCase:
    key = (item, spec.channels, spec.spacing, spec.num_classes)
    if key not in _CACHE:
        _CACHE[key] = load_case(item, spec)
    return _CACHE[key]


@dataclass
class SegSplits(GuardedSplits):
    """Guarded train / val / test of a segmentation datalist; see the module docstring."""

    spec: DatasetSpec | None = None
    items: dict[str, list[SegItem]] = field(default_factory=dict)
    read_log: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.spec.channels)

    def _load(self, split: str) -> list[SegCase]:
        if split not in self._splits:
            self.read_log.append(split)
            self._splits[split] = [_cached(it, self.spec) for it in self.items[split]]  # type: ignore[assignment]
        return self._splits[split]  # type: ignore[return-value]

    def train(self) -> list[SegCase]:  # type: ignore[override]
        self.access_log.append("train")
        return self._load("train")

    def val(self) -> list[SegCase]:  # type: ignore[override]
        self.access_log.append("val")
        return self._load("val")

    def test(self) -> list[SegCase]:  # type: ignore[override]
        """The test cases; raises :class:`~monai_peft.study.data.TestAccessError` before ``finalize_selection``."""
        if self._selection is None:
            raise TestAccessError(
                "the test split was requested before model selection on validation was final; select the model "
                "(epoch, learning rate) on the validation split, call finalize_selection(), then evaluate on test."
            )
        self.access_log.append("test")
        return self._load("test")

    def train_labels(self) -> np.ndarray:
        return np.zeros(len(self.items["train"]), dtype=np.int64)

    def counts(self) -> dict[str, dict[int, int]]:
        """Cases per split (``{split: {0: n}}``, the shape of the classification counts)."""
        return {s: {0: len(v)} for s, v in self.items.items()}


def load_seg_splits(spec: DatasetSpec) -> SegSplits:
    """The guarded splits of a datalist (files checked to exist; volumes read on first access)."""
    spec.validate()
    items, source = read_datalist(spec)
    return SegSplits({}, class_names(spec), source, spec=spec, items=items)


def case_budget(n_train: int, budget: str, budgets: BudgetSpec, seed: int) -> list[int]:
    """Indices of the training cases of ``budget`` for ``seed``: ``k<K>`` = K cases, ``f<f>`` = round(f n) cases.

    The cases are the first of a permutation seeded by ``seed`` (sorted), so a smaller budget's cases are part of a
    larger one's for the same seed.

    Raises:
        ConfigError: more cases than the training split has, or a fraction that rounds to no case.
    """
    if budget.startswith("k"):
        k = int(budget[1:])
        if k > n_train:
            raise ConfigError(
                f"budget of {k} training cases (k_shots: {k}) but the training split has {n_train}; use k_shots <= "
                f"{n_train}."
            )
    else:
        f = float(budget[1:])
        k = max(int(round(f * n_train)), budgets.min_per_class)
        k = min(k, n_train)
        if k == 0:
            need = 1.0 / (2 * n_train)
            raise ConfigError(
                f"training fraction {f:g} of {n_train} cases leaves no case (round({f:g} x {n_train}) = 0); use a "
                f"fraction of at least {need:.2g}, k_shots, or budgets.min_per_class: 1."
            )
    perm = np.random.default_rng(seed).permutation(n_train)
    return sorted(int(i) for i in perm[:k])


def write_datalist(
    root: str | Path, out: str | Path, splits: dict[str, list[str]], modalities: list[str], label: str
) -> Path:
    """Write a datalist JSON for case folders under ``root`` (paths relative to ``out``'s folder).

    Args:
        root: folder of the case folders.
        out: the JSON file to write.
        splits: ``{"training": [case folder names], "validation": [...], "test": [...]}``.
        modalities: file names inside a case folder, one per channel (e.g. ``["Flair.nii.gz", "T1c.nii.gz"]``).
        label: the label file name inside a case folder.
    """
    import os

    out = Path(out)
    base = out.resolve().parent

    def rel(p: Path) -> str:
        return os.path.relpath(p.resolve(), base)

    data = {
        key: [
            {"case": c, "image": [rel(Path(root) / c / m) for m in modalities], "label": rel(Path(root) / c / label)}
            for c in cases
        ]
        for key, cases in splits.items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out
