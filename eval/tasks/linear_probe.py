"""Linear probe: frozen (cached) image embeddings -> standardised -> logistic regression (scikit-learn), the inverse
regularisation C picked from `Cs` by the validation macro AUC, trained on a `label_fraction` of the training rows
(1%, 10%, 100%: a seeded subset that keeps both classes of every label); AUC per label and macro on the test split
with bootstrap 95% CIs.

Single-label sets (one label per row) fit one multinomial model; multi-label sets one binary model per label.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from eval.cache import cached_embeddings
from eval.metrics import bootstrap_options, macro_auc
from eval.registry import register_task
from eval.tasks.common import (
    as_bool, as_list, is_single_label, label_matrix, resolve_label_names, train_validation_test,
)  # fmt: skip
from eval.tasks.zero_shot import auc_metrics

DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)


def parse_fraction(value) -> float:
    """0.1, "0.1" or "10%" -> 0.1 (in (0, 1])."""
    text = str(value).strip()
    fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {value!r}")
    return fraction


def subsample_rows(y: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a seeded `fraction` of the rows of `[N, L]` labels `y` (at least one row), plus, for each
    label with both classes in `y`, the first rows (in the seeded order) that give the subset both classes."""
    order = np.random.default_rng(seed).permutation(len(y))
    chosen = set(order[: max(1, math.ceil(fraction * len(y)))].tolist())
    for column in y.T:
        for value in (True, False):
            if column.any() and not column.all() and not any(column[i] == value for i in chosen):
                chosen.add(int(next(i for i in order if column[i] == value)))
    return np.array(sorted(chosen))


def _fit(x: np.ndarray, target: np.ndarray, C: float, max_iter: int, seed: int):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter, random_state=seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, target)


def _predict(models: list, x: np.ndarray, num_labels: int, single_label: bool) -> np.ndarray:
    """`[N, L]` scores: class probabilities (single-label) or each label's positive probability (NaN where the
    label could not be trained: one class in its training rows)."""
    scores = np.full((len(x), num_labels), np.nan)
    if single_label:
        model = models[0]
        proba = model.predict_proba(x)
        scores[:] = 0.0
        scores[:, model.classes_] = proba  # a class absent from training scores 0
        return scores
    for column, model in enumerate(models):
        if model is not None:
            scores[:, column] = model.predict_proba(x)[:, 1]
    return scores


def fit_probe(
    x_train, y_train, x_val, y_val, Cs=DEFAULT_CS, max_iter: int = 1000, seed: int = 0, multi_label=None
):  # fmt: skip
    """Fit the probe for each C, keep the one with the best validation macro AUC (first of ties). One multinomial
    model when every row has one label (unless `multi_label`), else one binary model per label. Returns
    (predict: x -> `[N, L]` scores, C)."""
    single = is_single_label(y_train) if multi_label is None else not as_bool(multi_label)
    best = (-np.inf, None, None)
    for C in Cs:
        if single:
            models = [_fit(x_train, y_train.argmax(1), C, max_iter, seed)]
        else:
            models = [
                _fit(x_train, column, C, max_iter, seed) if column.any() and not column.all() else None
                for column in y_train.T
            ]
        val_auc = macro_auc(y_val, _predict(models, x_val, y_train.shape[1], single))
        val_auc = -1.0 if math.isnan(val_auc) else val_auc
        if val_auc > best[0]:
            best = (val_auc, models, C)
    models = best[1]
    return (lambda x: _predict(models, x, y_train.shape[1], single)), best[2]


def probe_metrics(adapter, splits, y_of, **options) -> dict[str, float]:
    """Shared by `linear_probe` and `concept_alignment`: `y_of(dataset) -> (names, [N, L] bool)`."""
    train, validation, test = splits
    embed = lambda d: cached_embeddings(  # noqa: E731
        adapter, d, "image", options.get("image_column", "image"), options.get("cache_dir"), options.get("batch_size")
    )
    names, y_train = y_of(train)
    fraction = options.get("label_fraction", options.get("fraction"))
    rows = subsample_rows(y_train, parse_fraction(1.0 if fraction is None else fraction), int(options.get("seed", 0)))
    predict, _ = fit_probe(
        embed(train)[rows], y_train[rows], embed(validation), y_of(validation)[1],
        Cs=as_list(options.get("Cs"), float) or DEFAULT_CS, max_iter=int(options.get("max_iter", 1000)),
        seed=int(options.get("seed", 0)), multi_label=options.get("multi_label"),
    )  # fmt: skip
    scores = predict(embed(test))
    y_test = y_of(test)[1]
    trained = ~np.isnan(scores).any(0)
    names = [n for n, ok in zip(names, trained) if ok]
    return auc_metrics(
        names, y_test[:, trained], scores[:, trained], np.ones(y_test[:, trained].shape, bool),
        **bootstrap_options(options),
    )  # fmt: skip


@register_task("linear_probe")
def linear_probe(adapter, data, split: str = "test", label_names=None, **options) -> dict[str, float]:
    """Linear-probe AUC per label and macro on `data[split]`, trained on `data["train"]` (`train_split`), C chosen
    on `data["validation"]` (`validation_split`; else 20% of train). A single `Dataset` is split 60/20/20.
    Options: `label_fraction` (alias `fraction`; 1.0, e.g. 0.01 or "10%"), `multi_label` (default: unless every
    row has one label), `Cs`, `max_iter`, `label_column`, `image_column`, `cache_dir`, `batch_size`, `seed`,
    `n_resamples`, `alpha`."""
    splits = train_validation_test(
        data, split, options.get("train_split", "train"), options.get("validation_split", "validation"),
        seed=int(options.get("seed", 0)),
    )  # fmt: skip
    column = options.get("label_column", "labels")
    names = resolve_label_names(splits[0], label_names, column)
    return probe_metrics(adapter, splits, lambda d: (names, label_matrix(d, names, column)), **options)
