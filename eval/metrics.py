"""Metrics, all computed offline with scikit-learn / numpy, and seeded bootstrap confidence intervals.

`bootstrap_ci` resamples rows (images) with replacement; a resample where a metric is undefined (e.g. an AUC whose
labels have one class) is skipped for that metric. Every reported metric `m` goes out with `m_ci_low`, `m_ci_high`
(see `with_ci`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from sklearn.metrics import auc, mean_absolute_error, roc_curve

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"


def roc_auc(y_true, scores) -> float:
    """Binary ROC AUC by scikit-learn, NaN when `y_true` holds a single class or a score is NaN (e.g. a probe that
    could not be trained for this label). `roc_curve` + `auc` is what `roc_auc_score` computes for binary labels
    (the same number), minus its input checks: twice as fast, which matters inside a bootstrap."""
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores, dtype=np.float64)
    if y_true.size == 0 or y_true.all() or not y_true.any() or np.isnan(scores).any():
        return float("nan")
    fpr, tpr, _ = roc_curve(y_true, scores)
    return float(auc(fpr, tpr))


def label_aucs(y_true, scores, mask=None) -> np.ndarray:
    """Per-column AUC of `[N, L]` labels/scores, each column over the rows where `mask[:, l]` (default all);
    NaN for a column whose (masked) labels have one class."""
    y_true, scores = np.asarray(y_true).astype(bool), np.asarray(scores)
    mask = np.ones(y_true.shape, bool) if mask is None else np.asarray(mask, bool)
    return np.array([roc_auc(y_true[mask[:, l], l], scores[mask[:, l], l]) for l in range(y_true.shape[1])])


def macro_auc(y_true, scores, mask=None) -> float:
    """Mean of `label_aucs` over the columns where it is defined (NaN if none is)."""
    aucs = label_aucs(y_true, scores, mask)
    return float(np.mean(aucs[np.isfinite(aucs)])) if np.isfinite(aucs).any() else float("nan")


def mae(y_true, y_pred) -> float:
    return float(mean_absolute_error(np.asarray(y_true, float), np.asarray(y_pred, float)))


def dice(pred, target, eps: float = 1e-8) -> float:
    """Dice overlap 2|P∩T| / (|P|+|T|) of two binary masks (any shape; nonzero = foreground); 1.0 when both empty."""
    pred, target = np.asarray(pred) != 0, np.asarray(target) != 0
    total = pred.sum() + target.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(pred, target).sum() / (total + eps))


def bootstrap_ci(
    metric: Callable, *arrays, n_resamples: int = 1000, seed: int = 0, alpha: float = 0.05
) -> tuple:
    """Percentile bootstrap `(low, high)` of `metric(*arrays)`, resampling rows (the first axis, shared by all
    `arrays`) with replacement, `n_resamples` times from `np.random.default_rng(seed)`. A resample whose metric is
    not finite (a one-class AUC) is skipped. A metric returning a vector gets per-entry bounds (arrays; NaN for an
    entry with no finite resample)."""
    arrays = [np.asarray(a) for a in arrays]
    n = len(arrays[0])
    if any(len(a) != n for a in arrays):
        raise ValueError(f"arrays differ in length: {[len(a) for a in arrays]}")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        index = rng.integers(0, n, n)
        values.append(np.asarray(metric(*(a[index] for a in arrays)), dtype=np.float64))
    values = np.stack(values) if values else np.full((1,), np.nan)
    finite = np.isfinite(values)
    low, high = np.full(values.shape[1:], np.nan), np.full(values.shape[1:], np.nan)
    for index in np.ndindex(values.shape[1:]):
        column = values[(slice(None), *index)][finite[(slice(None), *index)]]
        if column.size:
            low[index], high[index] = np.percentile(column, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(low), float(high)) if low.ndim == 0 else (low, high)


def with_ci(names: str | Sequence[str], metric: Callable, *arrays, **bootstrap) -> dict[str, float]:
    """`{name: value, name_ci_low: ..., name_ci_high: ...}` for a metric (one name) or a vector metric (one name
    per entry); `bootstrap` goes to `bootstrap_ci` (n_resamples, seed, alpha)."""
    single = isinstance(names, str)
    names = [names] if single else list(names)
    point = np.atleast_1d(np.asarray(metric(*arrays), dtype=np.float64))
    low, high = (np.atleast_1d(b) for b in bootstrap_ci(metric, *arrays, **bootstrap))
    if len(point) != len(names):
        raise ValueError(f"metric returned {len(point)} values for {len(names)} names")
    out = {}
    for name, p, lo, hi in zip(names, point, low, high):
        out.update({name: float(p), name + CI_LOW: float(lo), name + CI_HIGH: float(hi)})
    return out


def bootstrap_options(options: dict) -> dict:
    """The bootstrap options (`n_resamples`, `seed`, `alpha`) among task `options`, typed, for `with_ci`."""
    keys = {"n_resamples": int, "seed": int, "alpha": float}
    return {key: cast(options[key]) for key, cast in keys.items() if options.get(key) is not None}
