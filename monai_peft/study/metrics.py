"""Classification metrics of the study: AUROC, accuracy, macro-F1, mean ± std over seeds, bootstrap 95 % CI.

Inputs are class-probability arrays ``probs`` ``(N, K)`` (softmax outputs, rows sum to 1) and integer labels
``labels`` ``(N,)``. AUROC is ``roc_auc_score`` on the positive-class probability for ``K = 2`` and the macro
one-vs-rest AUROC for ``K > 2``; accuracy and macro-F1 use ``argmax`` predictions (scikit-learn).

The bootstrap CI is the percentile interval: ``B`` resamples of the N test images with replacement (a seeded
``numpy`` generator), the metric on each, and the 2.5 / 97.5 percentiles. Resamples in which AUROC is undefined
(a class missing) are drawn again. :func:`bootstrap_ci` takes a *list* of probability arrays (one per seed) and
bootstraps the seed-averaged metric with the same resampled images for every seed, so the interval reflects
test-set sampling of the reported mean.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from monai_peft.errors import InputDataError

__all__ = ["METRICS", "accuracy", "auroc", "bootstrap_ci", "classification_metrics", "macro_f1", "mean_std"]


def _check(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    if p.ndim != 2 or len(p) != len(y):
        raise InputDataError(f"probs must be (N, K) with N = len(labels); got {p.shape} and {y.shape}.")
    return p, y


def auroc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: binary on ``probs[:, 1]``, macro one-vs-rest for K > 2; NaN if a class is absent."""
    from sklearn.metrics import roc_auc_score

    p, y = _check(probs, labels)
    k = p.shape[1]
    if len(np.unique(y)) < 2:
        return float("nan")
    if k == 2:
        return float(roc_auc_score(y, p[:, 1]))
    if len(np.unique(y)) < k:
        return float("nan")
    return float(
        roc_auc_score(y, p / p.sum(1, keepdims=True), multi_class="ovr", average="macro", labels=list(range(k)))
    )


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``argmax(probs) == labels``."""
    p, y = _check(probs, labels)
    return float((p.argmax(1) == y).mean())


def macro_f1(probs: np.ndarray, labels: np.ndarray) -> float:
    """Unweighted mean of the per-class F1 of ``argmax`` predictions over all K classes."""
    from sklearn.metrics import f1_score

    p, y = _check(probs, labels)
    return float(f1_score(y, p.argmax(1), average="macro", labels=list(range(p.shape[1])), zero_division=0))


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "auroc": auroc,
    "accuracy": accuracy,
    "macro_f1": macro_f1,
}


def classification_metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """``{"auroc", "accuracy", "macro_f1"}`` of one prediction set."""
    return {name: fn(probs, labels) for name, fn in METRICS.items()}


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0.0 for a single value) of finite values."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


def bootstrap_ci(
    probs: np.ndarray | Sequence[np.ndarray],
    labels: np.ndarray,
    metric: str | Callable[[np.ndarray, np.ndarray], float] = "auroc",
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    max_redraws: int = 100,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval (``1 - alpha``) of ``metric`` on the test images.

    Args:
        probs: ``(N, K)`` probabilities, or a list of them (one per seed; the metric is averaged over the list
            on every resample, the resampled images being the same for all).
        labels: ``(N,)`` class ids.
        metric: ``"auroc"``, ``"accuracy"``, ``"macro_f1"`` or a callable ``f(probs, labels) -> float``.
        n_boot: number of resamples.
        seed: seed of the resampling generator (same seed, same interval).
        alpha: 0.05 for a 95 % interval.
        max_redraws: how often a resample with an undefined metric (NaN) is drawn again before giving up.
    """
    fn = METRICS[metric] if isinstance(metric, str) else metric
    sets = [np.asarray(probs)] if isinstance(probs, np.ndarray) else [np.asarray(p) for p in probs]
    y = np.asarray(labels).astype(np.int64).reshape(-1)
    for p in sets:
        _check(p, y)
    rng = np.random.default_rng(seed)
    n = len(y)
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        for _ in range(max_redraws):
            idx = rng.integers(0, n, size=n)
            value = float(np.mean([fn(p[idx], y[idx]) for p in sets]))
            if math.isfinite(value):
                break
        else:
            raise InputDataError(
                f"the metric is undefined on {max_redraws} bootstrap resamples in a row (too few test images of a class?)."
            )
        values[b] = value
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)
