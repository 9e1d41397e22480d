"""Seeded training-subset selection for data-efficiency studies: per-class data fractions and K-shot.

Both functions return sorted indices into the training set and are deterministic for a given ``seed``. For
single-label data they are also **nested**: for one seed, the 1 % subset is contained in the 10 % subset and the
5-shot subset in the 10-shot one (each class is shuffled once per seed and the first ``n`` are taken), so results
across budgets differ only by the added data.

Labels may be single-label class ids ``(N,)`` / ``(N, 1)`` or multi-label multi-hot ``(N, C)`` with ``C > 1``. In the
multi-label case a sample counts for **every** positive class: classes are filled rarest first, greedily, and
samples with no positive class (e.g. "no finding") form their own group.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from monai_peft.errors import ConfigError, InputDataError

__all__ = ["class_counts", "is_multilabel", "k_shot_indices", "per_class_fraction_indices"]


def _as_labels(labels: np.ndarray | Sequence, multilabel: bool | None) -> tuple[np.ndarray, bool]:
    y = np.asarray(labels)
    if y.size == 0:
        raise InputDataError("labels are empty: nothing to sample from.")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if multilabel is None:
        multilabel = y.ndim == 2
    if multilabel:
        if y.ndim != 2:
            raise InputDataError(f"multi-label sampling needs (N, C) multi-hot labels, got shape {y.shape}.")
        if not np.isin(y, (0, 1)).all():
            raise InputDataError("multi-label labels must be 0/1 multi-hot; got other values.")
        return y.astype(bool), True
    if y.ndim != 1:
        raise InputDataError(f"single-label sampling needs (N,) or (N, 1) class ids, got shape {y.shape}.")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.array_equal(y, np.round(y)):
            raise InputDataError("class labels must be integers.")
        y = y.astype(np.int64)
    return y, False


def is_multilabel(labels: np.ndarray | Sequence) -> bool:
    """True for ``(N, C)`` labels with ``C > 1`` (multi-hot)."""
    y = np.asarray(labels)
    return y.ndim == 2 and y.shape[1] > 1


def class_counts(labels: np.ndarray | Sequence) -> dict[int, int]:
    """Samples per class (``-1`` counts multi-label samples with no positive class)."""
    y, multi = _as_labels(labels, None)
    if multi:
        counts = {int(c): int(y[:, c].sum()) for c in range(y.shape[1])}
        none = int((~y.any(axis=1)).sum())
        if none:
            counts[-1] = none
        return counts
    values, n = np.unique(y, return_counts=True)
    return {int(v): int(c) for v, c in zip(values, n)}


def _class_rng(seed: int, cls: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(cls) + 2])  # independent stream per (seed, class)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _greedy_multilabel(y: np.ndarray, targets: dict[int, int], seed: int) -> np.ndarray:
    """Fill each class up to its target with positives, rarest class first; a sample counts for all its classes."""
    groups = {c: np.flatnonzero(y[:, c]) for c in range(y.shape[1])}
    none = np.flatnonzero(~y.any(axis=1))
    if none.size:
        groups[-1] = none
    chosen = np.zeros(len(y), dtype=bool)
    counts = {c: 0 for c in groups}
    for cls in sorted(groups, key=lambda c: (len(groups[c]), c)):
        for idx in groups[cls][_class_rng(seed, cls).permutation(len(groups[cls]))]:
            if counts[cls] >= targets.get(cls, 0):
                break
            if chosen[idx]:
                continue
            chosen[idx] = True
            pos = np.flatnonzero(y[idx])
            for c in pos if pos.size else [-1]:
                counts[int(c)] += 1
    return np.flatnonzero(chosen)


def per_class_fraction_indices(
    labels: np.ndarray | Sequence,
    fraction: float,
    *,
    seed: int = 0,
    min_per_class: int = 1,
    multilabel: bool | None = None,
) -> np.ndarray:
    """Indices of a stratified ``fraction`` of the data: ``max(min_per_class, round(fraction * n_c))`` of class c.

    Args:
        labels: ``(N,)`` / ``(N, 1)`` class ids or ``(N, C)`` multi-hot labels.
        fraction: in ``(0, 1]``, e.g. ``0.001`` (0.1 %), ``0.01``, ``0.1``.
        seed: random seed (deterministic, nested across fractions).
        min_per_class: every class keeps at least this many samples (never more than it has).
        multilabel: force the label interpretation (default: ``(N, C>1)`` is multi-label).

    Returns:
        Sorted ``int64`` indices.

    Example::

        idx = per_class_fraction_indices(train_labels, 0.01, seed=0)   # 1 % of each class, >= 1 each
        subset = torch.utils.data.Subset(dataset, idx.tolist())
    """
    if not 0.0 < float(fraction) <= 1.0:
        raise ConfigError(f"fraction must be in (0, 1], got {fraction} (e.g. 0.01 for 1 %).")
    if min_per_class < 0:
        raise ConfigError(f"min_per_class must be >= 0, got {min_per_class}.")
    y, multi = _as_labels(labels, multilabel)
    counts = class_counts(y if not multi else y.astype(np.uint8))
    targets = {c: min(n, max(min_per_class, _round_half_up(fraction * n))) for c, n in counts.items()}
    if multi:
        return _greedy_multilabel(y, targets, seed).astype(np.int64)
    picked = []
    for cls in sorted(counts):
        members = np.flatnonzero(y == cls)
        perm = members[_class_rng(seed, cls).permutation(len(members))]
        picked.append(perm[: targets[cls]])
    return np.sort(np.concatenate(picked)).astype(np.int64)


def k_shot_indices(
    labels: np.ndarray | Sequence,
    k: int,
    *,
    seed: int = 0,
    strict: bool = True,
    multilabel: bool | None = None,
) -> np.ndarray:
    """Indices of a K-shot training set: ``k`` samples of every class.

    Args:
        labels: ``(N,)`` / ``(N, 1)`` class ids or ``(N, C)`` multi-hot labels (a sample counts for each of its
            positive classes, so the set may hold fewer than ``k * C`` samples).
        k: shots per class (``>= 1``).
        seed: random seed (deterministic, nested across ``k``).
        strict: raise when a class has fewer than ``k`` samples; ``False`` takes all of them.
        multilabel: force the label interpretation.

    Returns:
        Sorted ``int64`` indices.

    Raises:
        ConfigError: ``k < 1``.
        InputDataError: a class has fewer than ``k`` samples and ``strict``.
    """
    if int(k) < 1:
        raise ConfigError(f"k must be >= 1, got {k}.")
    y, multi = _as_labels(labels, multilabel)
    counts = class_counts(y if not multi else y.astype(np.uint8))
    short = {c: n for c, n in counts.items() if n < k and c != -1}
    if short and strict:
        detail = ", ".join(f"class {c}: {n}" for c, n in sorted(short.items()))
        raise InputDataError(
            f"{k}-shot sampling impossible: some classes have fewer than {k} samples ({detail}). Use a smaller k, "
            "or strict=False to take all samples of those classes."
        )
    targets = {c: min(int(k), n) for c, n in counts.items()}
    if multi:
        targets.pop(-1, None)  # K-shot is defined over the positive classes
        return _greedy_multilabel(y, targets, seed).astype(np.int64)
    picked = []
    for cls in sorted(counts):
        members = np.flatnonzero(y == cls)
        perm = members[_class_rng(seed, cls).permutation(len(members))]
        picked.append(perm[: targets[cls]])
    return np.sort(np.concatenate(picked)).astype(np.int64)
