"""`regression`: predict a continuous target (bone age in months: the `target` column) from images; MAE in the
target's unit, with a bootstrap 95% CI.

Modes:
- `ridge` (default): frozen image embeddings (`eval.cache.cached_embeddings`, L2-normalised), standardised on
  train; scikit-learn `Ridge` with `alpha` chosen on the validation MAE among `ridge_alphas`, then refit on
  train + validation.
- `finetune` (alias `full`: the whole tower), `lora` or `head` (frozen tower, trained head): the vision tower's pooled feature and a
  linear head, trained on the standardised target with an L1 (`loss="l1"`, default) or L2 (`"l2"`) loss; the epoch
  with the best validation MAE is kept. Options as for `finetune` (`lr`, `head_lr`, `lora_*`, `epochs`, ...).

`use_sex=True` appends the one-hot sex (`sex` column: "M"/"F", also "male"/"female"; anything else all-zero) to
the features (ridge) or to the head's input (trained modes).
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import Ridge
from sklearn.preprocessing import StandardScaler

from eval.cache import cached_embeddings
from eval.metrics import bootstrap_options, mae, with_ci
from eval.registry import register_task
from eval.tasks.common import as_bool, as_list
from eval.tasks.finetune import TRAINING_OPTIONS, run_outputs, setup_training, training_splits
from eval.training import column, fit, seeded

MODES = ("ridge", "finetune", "full", "lora", "head")  # "full" = "finetune"
DEFAULT_RIDGE_ALPHAS = tuple(float(a) for a in np.logspace(-3, 3, 13))
SEX_CODES = {"m": 0, "male": 0, "f": 1, "female": 1}


def sex_one_hot(values) -> np.ndarray:
    """`[N, 2]` float32 (male, female); unknown values give zeros."""
    out = np.zeros((len(values), 2), np.float32)
    for row, value in enumerate(values):
        code = SEX_CODES.get(str(value).strip().lower()) if isinstance(value, str) else None
        if code is not None:
            out[row, code] = 1.0
    return out


def targets_of(dataset, name: str) -> np.ndarray:
    values = np.asarray(column(dataset, name), dtype=np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"column {name!r} has missing or non-finite targets")
    return values


def ridge_predict(features, targets, alphas=DEFAULT_RIDGE_ALPHAS) -> np.ndarray:
    """Test predictions of a Ridge whose `alpha` minimises the validation MAE, refit on train + validation.
    `features`: (train, validation, test) arrays; `targets`: (train, validation)."""
    (x_train, x_val, x_test), (y_train, y_val) = features, targets

    def fitted(x, y, alpha):
        scaler = StandardScaler().fit(x)
        return scaler, Ridge(alpha=alpha).fit(scaler.transform(x), y)

    def val_mae(alpha):
        scaler, model = fitted(x_train, y_train, alpha)
        return mae(y_val, model.predict(scaler.transform(x_val)))

    best = min(alphas, key=val_mae)
    scaler, model = fitted(np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val]), best)
    return model.predict(scaler.transform(x_test))


def _ridge(adapter, splits, targets, sexes, cache_dir, ridge_alphas) -> np.ndarray:
    features = [cached_embeddings(adapter, split, "image", "image", cache_dir=cache_dir) for split in splits]
    if sexes is not None:
        features = [np.concatenate([f, s], axis=1) for f, s in zip(features, sexes)]
    return ridge_predict(features, targets[:2], ridge_alphas)


def _trained(adapter, splits, targets, sexes, mode, loss, epochs, batch_size, weight_decay, seed, training):
    """Test predictions of a tower + linear head trained on the standardised target (best validation MAE)."""
    mean, std = targets[0].mean(), targets[0].std() or 1.0
    scaled = torch.as_tensor((targets[0] - mean) / std, dtype=torch.float32)
    loss_fn = {"l1": torch.nn.functional.l1_loss, "l2": torch.nn.functional.mse_loss}[loss]
    extra = sexes or [None] * 3
    device = adapter.device
    model, groups, sources = setup_training(
        adapter, splits, {"finetune": "full"}.get(mode, mode), 1, 0 if sexes is None else 2,
        batch_size=batch_size, **training,
    )  # fmt: skip
    predict = lambda k: run_outputs(model, sources[k], device, batch_size, extra[k])[:, 0] * std + mean  # noqa: E731

    def batch_loss(indices):
        x = sources[0](indices).to(device)
        sex = None if sexes is None else torch.as_tensor(sexes[0][indices], device=device)
        return loss_fn(model(x, sex)[:, 0], scaled[indices].to(device))

    fit(
        model, groups, batch_loss, lambda: mae(targets[1], predict(1)), num_rows=len(splits[0]), epochs=epochs,
        batch_size=batch_size, seed=seed, higher_is_better=False, weight_decay=weight_decay,
    )  # fmt: skip
    return predict(2)


@register_task("regression")
def regression(adapter, data, split: str = "test", *, mode: str = "ridge", use_sex=False, target_column: str = "target",
               sex_column: str = "sex", ridge_alphas=DEFAULT_RIDGE_ALPHAS, loss: str = "l1", epochs: int = 10,
               batch_size: int = 32, weight_decay: float = 1e-4, label_fraction=None, seed: int = 0,
               train_split: str = "train", validation_split: str = "validation", cache_dir=None,
               **options) -> dict[str, float]:  # fmt: skip
    """Regress `target_column`, evaluate on `data[split]` (see the module docstring): `mae` with its CI. Options
    for the trained modes as `finetune` (`lr`, `head_lr`, `lora_*`, `pixel_cache_mb`); `label_fraction` (alias
    `fraction`); bootstrap `n_resamples` (1000) / `alpha` (0.05). Other options are ignored."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if loss not in ("l1", "l2"):
        raise ValueError(f"loss={loss!r}; expected 'l1' or 'l2'")
    fraction = label_fraction or options.get("fraction")
    splits = training_splits(data, split, train_split, validation_split, seed, fraction)
    targets = [targets_of(s, target_column) for s in splits]
    sexes = [sex_one_hot(column(s, sex_column)) for s in splits] if as_bool(use_sex) else None
    with seeded(seed):
        if mode == "ridge":
            predictions = _ridge(adapter, splits, targets, sexes, cache_dir, as_list(ridge_alphas, float))
        else:
            training = {k: options[k] for k in TRAINING_OPTIONS if options.get(k) is not None}
            args = (mode, loss, int(epochs), int(batch_size), weight_decay, seed, training)
            predictions = _trained(adapter, splits, targets, sexes, *args)
    return with_ci("mae", mae, targets[2], predictions, **bootstrap_options({**options, "seed": seed}))
