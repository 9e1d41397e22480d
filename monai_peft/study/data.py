"""Study data: train / val / test arrays of a MedMNIST npz, an image folder or a CSV, behind a test-split guard.

:func:`load_splits` reads a :class:`~monai_peft.study.schema.DatasetSpec` into a :class:`GuardedSplits`: images
``uint8`` ``(N, H, W)`` (grayscale) or ``(N, H, W, 3)`` (RGB), labels ``int64`` ``(N,)``. The guard hands out the
train and validation splits freely but the **test split only after** :meth:`GuardedSplits.finalize_selection`
(the model and epoch chosen on validation); reading test earlier raises :class:`TestAccessError`. Every read is
logged in :attr:`GuardedSplits.access_log`, so a test can check the order.

Folder layout: ``<path>/{train,val,test}/<class name>/<image file>`` (classes sorted by name -> ids 0..K-1).
CSV: columns ``image`` (path relative to the CSV's folder), ``label`` (class name or id), ``split``
(train / val / test). Images are read with Pillow (or numpy for ``.npy``, ``allow_pickle=False``) and resized to
the study's ``image_size`` on load.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from monai_peft.errors import ConfigError, InputDataError, MonaiPeftError
from monai_peft.study.schema import BudgetSpec, DatasetSpec

__all__ = ["GuardedSplits", "SplitArrays", "TestAccessError", "budget_indices", "load_splits"]

SPLITS = ("train", "val", "test")


class TestAccessError(MonaiPeftError, RuntimeError):
    """The test split was requested before model selection on validation was final."""

    __test__ = False  # not a pytest test class


@dataclass(frozen=True)
class SplitArrays:
    """One split: ``images`` uint8 ``(N, H, W)`` or ``(N, H, W, 3)``, ``labels`` int64 ``(N,)``."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class GuardedSplits:
    """Train / val / test with a guard on test: see the module docstring.

    Attributes:
        classes: class names, index = label id.
        source: description of where the data came from.
        access_log: ``"train"``, ``"val"``, ``"selection_final"``, ``"test"`` in the order they happened.
    """

    _splits: dict[str, SplitArrays]
    classes: tuple[str, ...]
    source: str
    access_log: list[str] = field(default_factory=list)
    _selection: object | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return 3 if self._splits["train"].images.ndim == 4 else 1

    def train(self) -> SplitArrays:
        self.access_log.append("train")
        return self._splits["train"]

    def val(self) -> SplitArrays:
        self.access_log.append("val")
        return self._splits["val"]

    def train_labels(self) -> np.ndarray:
        """Training labels only (for budget checks; does not count as reading images)."""
        return self._splits["train"].labels

    def counts(self) -> dict[str, dict[int, int]]:
        """Images per class in each split (labels only; allowed before selection)."""
        return {s: {c: int((a.labels == c).sum()) for c in range(self.num_classes)} for s, a in self._splits.items()}

    def finalize_selection(self, selection: object) -> None:
        """Declare the validation-based selection final; afterwards :meth:`test` may be read (once or more)."""
        if selection is None:
            raise ConfigError("finalize_selection needs the selection record (best epoch, learning rate ...).")
        self._selection = selection
        self.access_log.append("selection_final")

    def test(self) -> SplitArrays:
        """The test split; raises :class:`TestAccessError` before :meth:`finalize_selection`."""
        if self._selection is None:
            raise TestAccessError(
                "the test split was requested before model selection on validation was final; select the model "
                "(epoch, learning rate) on the validation split, call finalize_selection(), then evaluate on test."
            )
        self.access_log.append("test")
        return self._splits["test"]


def _resize_stack(images: list[np.ndarray], size: int, channels: int) -> np.ndarray:
    from PIL import Image

    out = []
    for img in images:
        pil = Image.fromarray(img)
        pil = pil.convert("L" if channels == 1 else "RGB")
        if pil.size != (size, size):
            pil = pil.resize((size, size), Image.BILINEAR)
        out.append(np.asarray(pil, dtype=np.uint8))
    return np.stack(out)


def _read_image(path: Path) -> np.ndarray:
    if not path.is_file():
        raise InputDataError(
            f"image file {path} does not exist (listed in the dataset); fix the path or remove the row."
        )
    try:
        if path.suffix.lower() == ".npy":
            arr = np.load(path, allow_pickle=False)
        else:
            from PIL import Image

            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB") if im.mode not in ("L", "RGB") else im)
    except Exception as exc:
        raise InputDataError(f"cannot read image {path}: {exc}") from exc
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):  # channel-first npy
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3):
        raise InputDataError(f"image {path} has shape {arr.shape}; expected a 2D grayscale or RGB image.")
    if arr.dtype != np.uint8:
        lo, hi = float(arr.min()), float(arr.max())
        arr = np.zeros(arr.shape, np.uint8) if hi <= lo else ((arr - lo) / (hi - lo) * 255).round().astype(np.uint8)
    return arr


def _from_records(records: dict[str, list[tuple[Path, str]]], size: int, channels: int, source: str) -> GuardedSplits:
    names = sorted(
        {lab for recs in records.values() for _, lab in recs},
        key=lambda s: (not s.isdigit(), int(s) if s.isdigit() else 0, s),
    )
    ids = {n: i for i, n in enumerate(names)}
    splits = {}
    for split in SPLITS:
        recs = records.get(split, [])
        if not recs:
            raise InputDataError(
                f"{source}: the {split} split has no images; a study needs train, val and test images."
            )
        images = _resize_stack([_read_image(p) for p, _ in recs], size, channels)
        splits[split] = SplitArrays(images, np.array([ids[lab] for _, lab in recs], dtype=np.int64))
    return GuardedSplits(splits, tuple(names), source)


def _load_folder(spec: DatasetSpec, size: int) -> GuardedSplits:
    root = Path(spec.path)
    if not root.is_dir():
        raise InputDataError(
            f"dataset folder {root} does not exist; expected {root}/{{train,val,test}}/<class>/<images>."
        )
    exts = {e.lower() for e in spec.extensions}
    records: dict[str, list[tuple[Path, str]]] = {}
    for split in SPLITS:
        folder = root / split
        if not folder.is_dir():
            raise InputDataError(
                f"dataset folder {root} has no {split}/ subfolder; expected {root}/{{train,val,test}}/<class>/<images>."
            )
        records[split] = [
            (p, cls.name)
            for cls in sorted(folder.iterdir())
            if cls.is_dir()
            for p in sorted(cls.iterdir())
            if p.suffix.lower() in exts
        ]
    return _from_records(records, size, spec.channels, f"image folder {root}")


def _load_csv(spec: DatasetSpec, size: int) -> GuardedSplits:
    path = Path(spec.path)
    if not path.is_file():
        raise InputDataError(f"dataset CSV {path} does not exist.")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        need = [spec.image_column, spec.label_column, spec.split_column]
        missing = [c for c in need if c not in cols]
        if missing:
            raise InputDataError(f"dataset CSV {path} lacks column(s) {missing}; its columns are {cols}.")
        records: dict[str, list[tuple[Path, str]]] = {s: [] for s in SPLITS}
        for i, row in enumerate(reader, start=2):
            split = row[spec.split_column].strip().lower()
            split = {"validation": "val", "valid": "val"}.get(split, split)
            if split not in SPLITS:
                raise InputDataError(f"{path} line {i}: split {row[spec.split_column]!r} is not train, val or test.")
            records[split].append((path.parent / row[spec.image_column], row[spec.label_column].strip()))
    return _from_records(records, size, spec.channels, f"CSV {path}")


def _load_medmnist(spec: DatasetSpec) -> GuardedSplits:
    from monai_peft.data.medmnist import default_medmnist_root, load_medmnist_npz, medmnist_filename

    if spec.path:
        path = Path(spec.path)
    else:
        path = (Path(spec.root) if spec.root else default_medmnist_root()) / medmnist_filename(spec.flag, spec.size)
    splits = {}
    for split in SPLITS:
        images, labels = load_medmnist_npz(path, split)
        if labels.shape[1] != 1:
            raise InputDataError(
                f"{path} is multi-label ({labels.shape[1]} label columns); the study runs single-label classification."
            )
        if images.ndim == 4 and images.shape[-1] != 3:
            raise InputDataError(f"{path} holds 3D volumes {images.shape[1:]}; the study runs 2D classification.")
        if spec.channels == 3 and images.ndim == 3:
            images = np.repeat(images[..., None], 3, axis=-1)
        elif spec.channels == 1 and images.ndim == 4:
            images = np.round(images.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)
        splits[split] = SplitArrays(images, labels[:, 0].astype(np.int64))
    k = int(max(int(a.labels.max()) for a in splits.values())) + 1
    return GuardedSplits(splits, tuple(str(i) for i in range(k)), f"MedMNIST {path}")


def load_splits(spec: DatasetSpec, image_size: int) -> GuardedSplits:
    """Read the three splits of the dataset (labels checked: every class in every split).

    Raises:
        InputDataError: missing files, unreadable images, a class absent from a split.
        ConfigError: a dataset kind this version does not run.
    """
    spec.validate()
    if spec.kind == "medmnist":
        data = _load_medmnist(spec)
    elif spec.kind == "folder":
        data = _load_folder(spec, image_size)
    else:
        data = _load_csv(spec, image_size)
    if data.num_classes < 2:
        raise InputDataError(f"{data.source} has {data.num_classes} class; classification needs at least 2.")
    for split, counts in data.counts().items():
        empty = [data.classes[c] for c, n in counts.items() if n == 0]
        if empty:
            raise InputDataError(
                f"{data.source}: the {split} split has no image of class(es) {empty}; AUROC and selection need every "
                "class in every split."
            )
    data.access_log.clear()
    return data


def budget_indices(
    labels: np.ndarray, budget: str, budgets: BudgetSpec, seed: int, classes: tuple[str, ...] | None = None
) -> np.ndarray:
    """Training indices of one budget (``"f0.01"`` = 1 % of each class, ``"k5"`` = 5 per class) for ``seed``.

    Raises:
        ConfigError: the budget leaves a class with no training image, or asks for more images than a class has.
    """
    from monai_peft.data.sampling import k_shot_indices, per_class_fraction_indices

    names = classes or tuple(str(c) for c in range(int(labels.max()) + 1))
    counts = {c: int((labels == c).sum()) for c in range(len(names))}
    if budget.startswith("f"):
        fraction = float(budget[1:])
        idx = per_class_fraction_indices(labels, fraction, seed=seed, min_per_class=budgets.min_per_class)
        got = {c: int((labels[idx] == c).sum()) for c in counts}
        empty = [c for c, n in got.items() if n == 0]
        if empty:
            detail = ", ".join(f"class {names[c]!r} has {counts[c]} training images" for c in empty)
            need = max(1.0 / (2 * counts[c]) for c in empty if counts[c])
            raise ConfigError(
                f"training fraction {fraction:g} leaves a class with no images ({detail}, and round({fraction:g} x n) = 0). "
                f"Use a fraction of at least {need:.2g}, K-shots, or budgets.min_per_class: 1."
            )
        return idx
    k = int(budget[1:])
    short = {c: n for c, n in counts.items() if n < k}
    if short:
        detail = ", ".join(f"class {names[c]!r}: {n}" for c, n in short.items())
        raise ConfigError(
            f"{k}-shot training needs {k} images of every class but some have fewer ({detail}); use a smaller K."
        )
    try:
        return k_shot_indices(labels, k, seed=seed)
    except InputDataError as exc:  # pragma: no cover - checked above
        raise ConfigError(str(exc)) from exc
