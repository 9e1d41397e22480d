"""MedMNIST-style ``.npz`` data sets as MONAI datasets of ``{"image", "label", "index"}`` dicts.

A MedMNIST file holds ``train_images``, ``train_labels``, ``val_*`` and ``test_*`` arrays: images ``uint8``
``(N, H, W)`` (grayscale), ``(N, H, W, 3)`` (RGB) or ``(N, D, H, W)`` (3D), labels ``(N, L)``. Files are read with
``numpy.load(allow_pickle=False)``: nothing is ever unpickled.

Local files are the normal path (see ``docs/data.md``); :func:`download_medmnist` uses the official ``medmnist``
package when it is installed and the machine is online.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import Dataset

from monai_peft.errors import DataDownloadError, InputDataError, require

__all__ = [
    "MEDMNIST_SPLITS",
    "MedMNISTDataset",
    "default_medmnist_root",
    "download_medmnist",
    "load_medmnist_npz",
    "medmnist_filename",
]

MEDMNIST_SPLITS = ("train", "val", "test")


def medmnist_filename(flag: str, size: int = 28) -> str:
    """Official file name: ``pneumoniamnist.npz`` for 28 px, ``pneumoniamnist_224.npz`` for other sizes."""
    return f"{flag}.npz" if int(size) == 28 else f"{flag}_{int(size)}.npz"


def default_medmnist_root() -> Path:
    """``$MEDMNIST_ROOT`` if set, else ``~/.medmnist`` (the ``medmnist`` package's default)."""
    return Path(os.environ.get("MEDMNIST_ROOT", Path.home() / ".medmnist"))


def load_medmnist_npz(path: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Read one split of a MedMNIST ``.npz`` file.

    Args:
        path: the ``.npz`` file.
        split: ``"train"``, ``"val"`` or ``"test"``.

    Returns:
        ``(images, labels)``: images as stored (``uint8``), labels as ``(N, L)``.

    Raises:
        InputDataError: missing/corrupt file, pickled content, missing keys, inconsistent lengths.
    """
    if split not in MEDMNIST_SPLITS:
        raise InputDataError(f"unknown split '{split}'; use one of {MEDMNIST_SPLITS}.")
    p = Path(path)
    if not p.is_file():
        raise InputDataError(
            f"MedMNIST file '{p}' does not exist. Point path= at a local .npz (e.g. ../shared/data/medmnist/"
            "pneumoniamnist_28.npz), use download=True when online, or MedMNISTDataset.synthetic() for a stand-in."
        )
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = set(npz.files)
            need = (f"{split}_images", f"{split}_labels")
            missing = [k for k in need if k not in keys]
            if missing:
                raise InputDataError(
                    f"'{p}' has no {', '.join(missing)}; its arrays are {sorted(keys)}. A MedMNIST file holds "
                    "train_/val_/test_ images and labels."
                )
            images, labels = npz[need[0]], npz[need[1]]
    except ValueError as exc:  # object arrays would need pickle
        raise InputDataError(
            f"'{p}' stores Python objects that only unpickling could read ({exc}); refusing to unpickle. Use a "
            "plain-array .npz."
        ) from exc
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise InputDataError(f"'{p}' is not a readable .npz file ({exc}); re-download or re-copy it.") from exc
    if labels.ndim == 1:
        labels = labels[:, None]
    if len(images) != len(labels):
        raise InputDataError(f"'{p}' {split}: {len(images)} images but {len(labels)} labels.")
    if images.ndim not in (3, 4):
        raise InputDataError(f"'{p}' {split}_images has shape {images.shape}; expected (N, H, W[, 3]) or (N, D, H, W).")
    return images, labels


def download_medmnist(
    flag: str,
    *,
    size: int = 28,
    root: str | os.PathLike | None = None,
    split: str = "train",
) -> Path:
    """Download a MedMNIST file through the official ``medmnist`` package (needs internet).

    Args:
        flag: data set name, e.g. ``"pneumoniamnist"``, ``"chestmnist"``, ``"organmnist3d"``.
        size: image size (28, or 64/128/224 with medmnist >= 3).
        root: folder to store the file (default :func:`default_medmnist_root`).
        split: split used to trigger the download (the file holds all splits).

    Returns:
        Path of the ``.npz`` file (returned at once when already there).

    Raises:
        MissingDependencyError: ``medmnist`` is not installed (``pip install medmnist``).
        InputDataError: unknown ``flag``.
        DataDownloadError: the download failed (e.g. offline); the message gives the URL to fetch by hand.
    """
    medmnist = require("medmnist", feature="Downloading MedMNIST data sets", install="medmnist")
    info_all = getattr(medmnist, "INFO", {})
    if flag not in info_all:
        raise InputDataError(f"unknown MedMNIST data set '{flag}'; known: {', '.join(sorted(info_all))}.")
    info = info_all[flag]
    folder = Path(root) if root is not None else default_medmnist_root()
    target = folder / medmnist_filename(flag, size)
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    url = info.get("url" if int(size) == 28 else f"url_{int(size)}", "the MedMNIST homepage (https://medmnist.com)")
    kwargs: dict[str, Any] = {"split": split, "download": True, "root": str(folder)}
    if int(size) != 28:
        kwargs["size"] = int(size)
    try:
        getattr(medmnist, info["python_class"])(**kwargs)
    except Exception as exc:  # medmnist reports network failures as RuntimeError / URLError / OSError
        raise DataDownloadError(
            f"downloading MedMNIST '{flag}' (size {size}) failed: {type(exc).__name__}: {exc}. This machine is "
            f"probably offline. Fetch {url} on a connected machine, save it as '{target}', and load it with "
            f"MedMNISTDataset(path='{target}')."
        ) from exc
    if not target.is_file():
        raise DataDownloadError(f"medmnist reported success but '{target}' is missing; download {url} by hand.")
    return target


class _NpzItems(Sequence):
    """Lazy sequence of ``{"image", "label", "index"}`` dicts over in-memory arrays."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, as_rgb: bool) -> None:
        self.images, self.labels, self.indices, self.as_rgb = images, labels, indices, as_rgb
        self.multilabel = labels.shape[1] > 1
        self.rgb_input = images.ndim == 4 and images.shape[-1] == 3  # (N, H, W, 3); 3D sets are (N, D, H, W)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:  # type: ignore[override]
        j = int(self.indices[i])
        img = self.images[j]
        scale = 255.0 if img.dtype == np.uint8 else 1.0
        arr = torch.as_tensor(np.ascontiguousarray(img), dtype=torch.float32) / scale
        arr = arr.permute(2, 0, 1) if self.rgb_input else arr[None]  # (C, H, W) or (1, D, H, W)
        if self.as_rgb and arr.shape[0] == 1:
            arr = arr.repeat(3, *([1] * (arr.ndim - 1)))
        lab = self.labels[j]
        label = torch.as_tensor(lab, dtype=torch.float32) if self.multilabel else torch.as_tensor(int(lab[0]))
        return {"image": arr, "label": label, "index": j}


class MedMNISTDataset(Dataset):
    """A MedMNIST split as a MONAI ``Dataset`` of ``{"image": (C, H, W) float32 in [0, 1], "label", "index"}``.

    ``label`` is a ``long`` scalar for single-label tasks and a float multi-hot vector for multi-label ones;
    ``index`` is the sample's position in the split. 3D sets give ``(1, D, H, W)`` images.

    Args:
        path: local ``.npz`` file. If ``None``, ``root / medmnist_filename(flag, size)`` is used.
        split: ``"train"``, ``"val"`` or ``"test"``.
        transform: MONAI (dictionary) transform applied to each item.
        flag: MedMNIST name (``"pneumoniamnist"`` ...) when ``path`` is not given.
        size: image size of the file to look for / download.
        root: folder with MedMNIST files (default :func:`default_medmnist_root`).
        download: fetch the file with the ``medmnist`` package if absent (online only).
        as_rgb: repeat grayscale to 3 channels.
        indices: keep only these samples (e.g. from :func:`~monai_peft.data.k_shot_indices`).

    Example::

        ds = MedMNISTDataset("../shared/data/medmnist/pneumoniamnist_28.npz", split="train")
        idx = per_class_fraction_indices(ds.labels, 0.01, seed=0)
        few = ds.subset(idx)          # 1 % of each class
        ds[0]["image"].shape          # torch.Size([1, 28, 28])
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        split: str = "train",
        transform: Callable | None = None,
        *,
        flag: str | None = None,
        size: int = 28,
        root: str | os.PathLike | None = None,
        download: bool = False,
        as_rgb: bool = False,
        indices: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        if path is None:
            if flag is None:
                raise InputDataError("MedMNISTDataset needs path= (a local .npz) or flag= (e.g. 'pneumoniamnist').")
            folder = Path(root) if root is not None else default_medmnist_root()
            path = folder / medmnist_filename(flag, size)
            if not Path(path).is_file():
                if not download:
                    raise InputDataError(
                        f"MedMNIST file '{path}' is not there. Pass download=True (needs internet and "
                        "`pip install medmnist`), point path= at a local copy, or use MedMNISTDataset.synthetic()."
                    )
                path = download_medmnist(flag, size=size, root=folder, split=split)
        images, labels = load_medmnist_npz(path, split)
        self._setup(images, labels, split, str(path), as_rgb, indices, synthetic=False)
        super().__init__(data=self._items, transform=transform)

    def _setup(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        split: str,
        source: str,
        as_rgb: bool,
        indices: Sequence[int] | np.ndarray | None,
        synthetic: bool,
    ) -> None:
        idx = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(images)):
            raise InputDataError(f"indices out of range for a split of {len(images)} samples.")
        self.split, self.source, self.as_rgb, self.is_synthetic = split, source, as_rgb, synthetic
        self._images, self._labels = images, labels
        self._items = _NpzItems(images, labels, idx, as_rgb)

    @classmethod
    def from_arrays(
        cls,
        images: np.ndarray,
        labels: np.ndarray,
        transform: Callable | None = None,
        *,
        split: str = "train",
        as_rgb: bool = False,
        indices: Sequence[int] | np.ndarray | None = None,
        source: str = "<arrays>",
        synthetic: bool = False,
    ) -> MedMNISTDataset:
        """Build the dataset from in-memory arrays shaped like a MedMNIST split."""
        labels = np.asarray(labels)
        labels = labels[:, None] if labels.ndim == 1 else labels
        if len(images) != len(labels):
            raise InputDataError(f"{len(images)} images but {len(labels)} labels.")
        obj = cls.__new__(cls)
        obj._setup(np.asarray(images), labels, split, source, as_rgb, indices, synthetic)
        Dataset.__init__(obj, data=obj._items, transform=transform)
        return obj

    @classmethod
    def synthetic(
        cls,
        split: str = "train",
        transform: Callable | None = None,
        *,
        seed: int = 0,
        as_rgb: bool = False,
        **kwargs: Any,
    ) -> MedMNISTDataset:
        """SYNTHETIC stand-in (not medical data) with the MedMNIST layout, for machines without the real file.

        See :func:`~monai_peft.data.make_synthetic_medmnist` for ``kwargs``; ``is_synthetic`` is ``True``.
        """
        from monai_peft.data.synthetic import make_synthetic_medmnist

        arrays = make_synthetic_medmnist(seed=seed, **kwargs)
        return cls.from_arrays(
            arrays[f"{split}_images"],
            arrays[f"{split}_labels"],
            transform,
            split=split,
            as_rgb=as_rgb,
            source="<synthetic>",
            synthetic=True,
        )

    def subset(self, indices: Sequence[int] | np.ndarray) -> MedMNISTDataset:
        """A new dataset with the given positions of this one (same transform); ``index`` keeps split numbering."""
        pos = np.asarray(indices, dtype=np.int64)
        return type(self).from_arrays(
            self._images,
            self._labels,
            self.transform,
            split=self.split,
            as_rgb=self.as_rgb,
            indices=self._items.indices[pos],
            source=self.source,
            synthetic=self.is_synthetic,
        )

    @property
    def labels(self) -> np.ndarray:
        """``(len, L)`` labels of the samples in this dataset (input for the samplers)."""
        return self._labels[self._items.indices]

    @property
    def indices(self) -> np.ndarray:
        """Positions of this dataset's samples in the split."""
        return self._items.indices

    @property
    def multilabel(self) -> bool:
        """True when labels are multi-hot (``L > 1``)."""
        return self._items.multilabel

    @property
    def num_classes(self) -> int:
        """Number of classes (columns for multi-label, ``max + 1`` otherwise)."""
        if self.multilabel:
            return int(self._labels.shape[1])
        return int(self._labels.max()) + 1 if self._labels.size else 0
