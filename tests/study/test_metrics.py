"""Metrics with known answers: AUROC, accuracy, macro-F1, mean ± std, and the bootstrap 95 % CI."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_peft.study.metrics import accuracy, auroc, bootstrap_ci, classification_metrics, macro_f1, mean_std


def _probs(p1):
    p1 = np.asarray(p1, dtype=float)
    return np.stack([1 - p1, p1], 1)


def test_known_values():
    y = np.array([0, 0, 1, 1])
    assert auroc(_probs([0.1, 0.4, 0.35, 0.8]), y) == pytest.approx(0.75)  # 3 of 4 pairs ordered
    assert auroc(_probs([0.9, 0.8, 0.1, 0.2]), y) == 0.0
    assert accuracy(_probs([0.1, 0.6, 0.7, 0.2]), y) == 0.5
    # predictions 0,1,1,1 vs labels 0,0,1,1: F1(class 0) = 2/3, F1(class 1) = 0.8 -> macro (2/3 + 0.8) / 2
    assert macro_f1(_probs([0.1, 0.6, 0.7, 0.9]), y) == pytest.approx((2 / 3 + 0.8) / 2)
    assert math.isnan(auroc(_probs([0.1, 0.2]), np.array([1, 1])))
    three = np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.2 / 3
    assert classification_metrics(three, np.array([0, 1, 2, 0])) == {"auroc": 1.0, "accuracy": 1.0, "macro_f1": 1.0}


def test_mean_std():
    assert mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample std (ddof = 1)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert mean_std([1.0, float("nan"), 3.0]) == (2.0, pytest.approx(math.sqrt(2)))


def test_bootstrap_ci_known_answer_for_accuracy():
    """Accuracy is a mean of 0/1 values: its bootstrap CI is p ± 1.96 sqrt(p (1 - p) / n) for large n."""
    n, p = 2000, 0.8
    y = np.zeros(n, dtype=int)
    correct = np.zeros(n, dtype=bool)
    correct[: int(p * n)] = True
    probs = _probs(np.where(correct, 0.1, 0.9))  # right on the first 80 %, wrong on the rest
    lo, hi = bootstrap_ci(probs, y, "accuracy", n_boot=2000, seed=0)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert lo == pytest.approx(p - half, abs=0.004) and hi == pytest.approx(p + half, abs=0.004)
    assert bootstrap_ci(probs, y, "accuracy", n_boot=2000, seed=0) == (lo, hi)  # seeded
    assert bootstrap_ci(probs, y, "accuracy", n_boot=2000, seed=1) != (lo, hi)


def test_bootstrap_ci_degenerate_and_seed_mean():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    perfect = _probs(y * 0.8 + 0.1)
    assert bootstrap_ci(perfect, y, "auroc", n_boot=100) == (1.0, 1.0)
    noisy = _probs(np.clip(y * 0.3 + rng.random(200) * 0.7, 0, 1))
    single = bootstrap_ci(noisy, y, "auroc", n_boot=200, seed=3)
    assert bootstrap_ci([noisy, noisy], y, "auroc", n_boot=200, seed=3) == single  # mean of identical seeds
    mixed = bootstrap_ci([noisy, perfect], y, "auroc", n_boot=200, seed=3)
    assert single[0] < mixed[0] and mixed[1] <= 1.0
    point = auroc(noisy, y)
    assert single[0] < point < single[1]


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("metric", ["auroc", "accuracy", "macro_f1"])
def test_vectorised_bootstrap_equals_the_per_resample_loop(metric, k):
    """The all-resamples-at-once bootstrap of the built-in metrics gives the intervals of the per-resample loop
    over scikit-learn (a callable metric takes the loop): tied scores, several seeds, a rare class whose absence
    forces redraws, and 3 classes."""
    from monai_peft.study.metrics import METRICS, bootstrap_ci

    rng = np.random.default_rng(k)
    n = 41
    labels = np.r_[np.zeros(n - 3, int), np.ones(3, int)] if k == 2 else rng.integers(0, k, n)
    sets = []
    for _ in range(3):
        logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[labels]
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        sets.append(np.round(p, 1) / np.round(p, 1).sum(1, keepdims=True))  # ties in the scores
    loop = bootstrap_ci(sets, labels, lambda p, y: METRICS[metric](p, y), n_boot=300, seed=7)
    fast = bootstrap_ci(sets, labels, metric, n_boot=300, seed=7)
    assert fast == pytest.approx(loop, abs=1e-12)
    single = bootstrap_ci(sets[0], labels, metric, n_boot=300, seed=3)
    assert single == pytest.approx(bootstrap_ci(sets[0], labels, METRICS[metric], n_boot=300, seed=3), abs=1e-12)
