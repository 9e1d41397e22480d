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
    fast = _VECTORISED.get(metric) if isinstance(metric, str) else None
    if fast is not None and (metric != "auroc" or all(p.shape[1] == 2 for p in sets)):
        idx = _resamples(rng, y, n_boot, max_redraws, needs_both_classes=metric == "auroc")
        values = np.mean([fast(np.asarray(p, dtype=np.float64), y, idx) for p in sets], axis=0)
    else:
        values = np.empty(n_boot, dtype=np.float64)
        for b in range(n_boot):
            for _ in range(max_redraws):
                idx = rng.integers(0, n, size=n)
                value = float(np.mean([fn(p[idx], y[idx]) for p in sets]))
                if math.isfinite(value):
                    break
            else:
                raise InputDataError(_UNDEFINED.format(max_redraws))
            values[b] = value
    lo, hi = np.percentile(values, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return float(lo), float(hi)


_UNDEFINED = "the metric is undefined on {} bootstrap resamples in a row (too few test images of a class?)."


def _resamples(
    rng: np.random.Generator, y: np.ndarray, n_boot: int, max_redraws: int, *, needs_both_classes: bool
) -> np.ndarray:
    """``(n_boot, N)`` resample indices, drawn from ``rng`` exactly as the per-resample loop draws them (a
    resample without both classes is drawn again when the metric needs them)."""
    n = len(y)
    out = np.empty((n_boot, n), dtype=np.int64)
    for b in range(n_boot):
        for _ in range(max_redraws):
            idx = rng.integers(0, n, size=n)
            if not needs_both_classes or 0 < y[idx].sum() < n:
                break
        else:
            raise InputDataError(_UNDEFINED.format(max_redraws))
        out[b] = idx
    return out


def _auroc_binary_resampled(p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Binary AUROC of every resample ``idx[b]`` at once: the Mann-Whitney statistic on ``p[:, 1]`` with average
    ranks for ties, ``(R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg)`` (equal to the ROC area)."""
    from scipy.stats import rankdata

    ranks = rankdata(p[:, 1][idx], method="average", axis=1)
    pos = y[idx] == 1
    n_pos = pos.sum(1).astype(np.float64)
    n_neg = idx.shape[1] - n_pos
    return ((ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def _accuracy_resampled(p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return (p.argmax(1) == y)[idx].mean(1)


def _macro_f1_resampled(p: np.ndarray, y: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Macro-F1 of every resample: per class ``2 TP / (2 TP + FP + FN)`` (0 where that is 0 / 0), averaged."""
    pred, true = p.argmax(1)[idx], y[idx]
    scores = []
    for c in range(p.shape[1]):
        tp = ((pred == c) & (true == c)).sum(1)
        denom = (pred == c).sum(1) + (true == c).sum(1)
        scores.append(np.divide(2.0 * tp, denom, out=np.zeros(len(idx)), where=denom > 0))
    return np.mean(scores, axis=0)


#: Metrics whose bootstrap runs on all resamples at once (the same values as the per-resample loop; AUROC for
#: two classes only, more classes take the loop).
_VECTORISED: dict[str, Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]] = {
    "auroc": _auroc_binary_resampled,
    "accuracy": _accuracy_resampled,
    "macro_f1": _macro_f1_resampled,
}
