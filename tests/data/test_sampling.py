"""Per-class data-fraction and K-shot sampling: counts, determinism, nesting, multi-label."""

from __future__ import annotations

import numpy as np
import pytest

from monai_peft.data import class_counts, k_shot_indices, per_class_fraction_indices
from monai_peft.errors import ConfigError, InputDataError

LABELS = np.array([0] * 1214 + [1] * 3494 + [2] * 7)[np.random.default_rng(3).permutation(4715)]


@pytest.mark.parametrize(("fraction", "expected"), [(0.001, {0: 1, 1: 3, 2: 1}), (0.01, {0: 12, 1: 35, 2: 1}),
                                                     (0.1, {0: 121, 1: 349, 2: 1}), (1.0, {0: 1214, 1: 3494, 2: 7})])  # fmt: skip
def test_fraction_counts_per_class_with_at_least_one(fraction, expected):
    idx = per_class_fraction_indices(LABELS, fraction, seed=0)
    assert class_counts(LABELS[idx]) == expected
    assert idx.dtype == np.int64 and np.all(np.diff(idx) > 0)  # sorted, unique


def test_fraction_is_deterministic_nested_and_seed_dependent():
    a = per_class_fraction_indices(LABELS[:, None], 0.01, seed=7)  # (N, 1) labels work too
    assert np.array_equal(a, per_class_fraction_indices(LABELS, 0.01, seed=7))
    assert not np.array_equal(a, per_class_fraction_indices(LABELS, 0.01, seed=8))
    small, big = (per_class_fraction_indices(LABELS, f, seed=7) for f in (0.01, 0.1))
    assert set(small) <= set(big)


def test_fraction_arguments():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match=r"fraction must be in \(0, 1\]"):
            per_class_fraction_indices(LABELS, bad)
    assert class_counts(LABELS[per_class_fraction_indices(LABELS, 0.001, min_per_class=5)])[2] == 5
    with pytest.raises(InputDataError, match="empty"):
        per_class_fraction_indices([], 0.1)
    with pytest.raises(InputDataError, match="integers"):
        per_class_fraction_indices([0.5, 1.0], 0.5)


def test_k_shot_counts_determinism_and_nesting():
    idx = k_shot_indices(LABELS, 5, seed=0)
    assert class_counts(LABELS[idx]) == {0: 5, 1: 5, 2: 5}
    assert np.array_equal(idx, k_shot_indices(LABELS, 5, seed=0))
    assert not np.array_equal(idx, k_shot_indices(LABELS, 5, seed=1))
    assert set(k_shot_indices(LABELS, 1, seed=4)) <= set(k_shot_indices(LABELS, 5, seed=4))


def test_k_shot_too_few_samples():
    with pytest.raises(InputDataError, match=r"10-shot sampling impossible.*class 2: 7"):
        k_shot_indices(LABELS, 10)
    idx = k_shot_indices(LABELS, 10, strict=False)
    assert class_counts(LABELS[idx]) == {0: 10, 1: 10, 2: 7}
    with pytest.raises(ConfigError, match="k must be >= 1"):
        k_shot_indices(LABELS, 0)


def _multilabel(n=400, c=5, seed=0):
    rng = np.random.default_rng(seed)
    y = (rng.random((n, c)) < np.array([0.02, 0.1, 0.3, 0.5, 0.05])).astype(np.uint8)
    return y


def test_multilabel_k_shot_counts_each_positive_class():
    y = _multilabel()
    idx = k_shot_indices(y, 4, seed=0)
    per_class = y[idx].sum(axis=0)
    assert np.all(per_class >= 4)  # every class has at least K positives
    # a sample counts for all its positive classes: at most K picks per class, fewer when samples overlap
    assert len(idx) <= 4 * y.shape[1]
    assert len(idx) < int(per_class.sum())  # some picked samples are positive for several classes
    rarest = int(np.argmin(y.sum(axis=0)))
    assert per_class[rarest] >= 4
    assert np.array_equal(idx, k_shot_indices(y, 4, seed=0))


def test_multilabel_fraction_includes_negative_only_samples():
    y = _multilabel(seed=2)
    none = int((y.sum(axis=1) == 0).sum())
    assert none > 0
    idx = per_class_fraction_indices(y, 0.1, seed=0)
    sub = y[idx]
    counts = class_counts(y)
    for c in range(y.shape[1]):
        assert sub[:, c].sum() >= max(1, round(0.1 * counts[c]))
    assert int((sub.sum(axis=1) == 0).sum()) >= max(1, round(0.1 * none))
    with pytest.raises(InputDataError, match="multi-hot"):
        per_class_fraction_indices(np.array([[0, 2], [1, 0]]), 0.5)
