"""`segmentation`: a light decoder (`eval.heads.SegmentationDecoder`) on the frozen vision tower's patch tokens;
Dice on the test split, per foreground class and their mean, each with a bootstrap 95% CI (resampling images).

Images and masks (`mask` column: mode "L", 0/1 — or 0/255 — for binary, class ids for multiclass) are resized to
the model's square input size (image bilinear, mask nearest) before the model's own preprocessing, so that the
processor (letterbox or resize + centre crop) leaves the geometry as is and masks stay aligned; Dice is measured at
that size. Binary masks train with BCE + soft Dice (sigmoid > 0.5), multiclass with cross-entropy + soft Dice
(argmax). The epoch with the best validation mean Dice is kept. Per image, a class absent from both the prediction
and the mask scores Dice 1 (`eval.metrics.dice`).

The frozen patch tokens are computed once and kept in memory when they fit in `feature_cache_mb`, else recomputed
for every batch.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F

from eval.heads import SegmentationDecoder
from eval.metrics import bootstrap_options, dice, with_ci
from eval.registry import register_task
from eval.tasks.common import as_list
from eval.tasks.finetune import training_splits
from eval.training import BatchSource, batches, column, fit, seeded


def square(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """`image` resized to `size` (height, width); 16-bit images go through mode "I" (all filters support it)."""
    if image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.resize((size[1], size[0]), resample)


def load_masks(dataset, mask_column: str, size: tuple[int, int]) -> np.ndarray:
    """`[N, H, W]` int64 class ids at `size` (nearest resize)."""
    masks = [np.asarray(square(m, size, Image.Resampling.NEAREST)) for m in column(dataset, mask_column)]
    return np.stack(masks).astype(np.int64) if masks else np.zeros((0, *size), np.int64)


def class_count(masks: np.ndarray, num_classes: int | None) -> tuple[int, bool]:
    """(number of classes incl. background, whether 255 marks the foreground of a 0/255 binary mask)."""
    values = set(np.unique(masks).tolist())
    if num_classes is None and values <= {0, 255} and 255 in values:
        return 2, True
    count = num_classes or max(2, int(max(values, default=0)) + 1)
    return count, False


def foreground_names(class_names, num_classes: int) -> list[str]:
    if class_names is None:
        return ["foreground"] if num_classes == 2 else [f"class_{k}" for k in range(1, num_classes)]
    names = list(class_names)[-(num_classes - 1) :] if len(class_names) == num_classes else list(class_names)
    if len(names) != num_classes - 1:
        raise ValueError(f"class_names: {len(class_names)} names for {num_classes - 1} foreground classes")
    return names


def patch_source(adapter, dataset, size, budget_mb: float, batch_size: int) -> BatchSource:
    """Frozen patch tokens `[B, N, hidden]` (CPU) of a split's images resized to `size`."""

    def make(indices):
        images = [square(image, size, Image.Resampling.BILINEAR) for image in column(dataset, "image", indices)]
        with torch.no_grad():
            return adapter.vision_features(adapter.pixel_values(images).to(adapter.device))[1].float().cpu()

    return BatchSource(len(dataset), make, budget_mb, chunk=batch_size)


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """BCE + soft Dice (one output channel) or cross-entropy + soft Dice over the foreground classes."""
    if logits.shape[1] == 1:
        target = masks[:, None].float()
        probs, ce = logits.sigmoid(), F.binary_cross_entropy_with_logits(logits, target)
    else:
        target = F.one_hot(masks, logits.shape[1]).permute(0, 3, 1, 2)[:, 1:].float()
        probs, ce = logits.softmax(1)[:, 1:], F.cross_entropy(logits, masks)
    overlap = (probs * target).sum((2, 3))
    soft_dice = (2 * overlap + 1) / (probs.sum((2, 3)) + target.sum((2, 3)) + 1)
    return ce + (1 - soft_dice).mean()


def predict_masks(logits: torch.Tensor) -> np.ndarray:
    if logits.shape[1] == 1:
        return (logits[:, 0] > 0).long().cpu().numpy()
    return logits.argmax(1).cpu().numpy()


def dice_scores(decoder, source: BatchSource, masks: np.ndarray, batch_size: int, device) -> np.ndarray:
    """`[N, foreground classes]` per-image Dice of the decoder's predictions against `masks`."""
    classes = max(2, decoder.classifier.out_channels)
    rows = []
    with torch.no_grad():
        for indices in batches(np.arange(len(source)), batch_size):
            predicted = predict_masks(decoder(source(indices).to(device)).float())
            for pred, target in zip(predicted, masks[indices]):
                rows.append([dice(pred == k, target == k) for k in range(1, classes)])
    return np.asarray(rows, np.float64).reshape(len(rows), classes - 1)


def train_decoder(adapter, splits, masks, classes: int, size, epochs: int = 20, lr: float = 1e-3,
                  batch_size: int = 16, channels: int = 64, weight_decay: float = 1e-4, seed: int = 0,
                  feature_cache_mb: float = 2048) -> np.ndarray:  # fmt: skip
    """Train a `SegmentationDecoder` on the frozen patch tokens of `splits[0]`, keeping the epoch with the best
    validation mean Dice; returns the test split's per-image Dice `[N, classes - 1]`."""
    device = adapter.device
    sources = [patch_source(adapter, split, size, feature_cache_mb, batch_size) for split in splits]
    hidden = sources[0](np.arange(1)).shape[-1]
    decoder = SegmentationDecoder(hidden, adapter.patch_grid, size, 1 if classes == 2 else classes, channels)
    decoder = decoder.to(device)

    def batch_loss(indices):
        logits = decoder(sources[0](indices).to(device))
        return segmentation_loss(logits, torch.as_tensor(masks[0][indices], device=device))

    fit(
        decoder, [{"params": list(decoder.parameters()), "lr": lr}], batch_loss,
        lambda: float(dice_scores(decoder, sources[1], masks[1], batch_size, device).mean()),
        num_rows=len(splits[0]), epochs=epochs, batch_size=batch_size, seed=seed, weight_decay=weight_decay,
    )  # fmt: skip
    return dice_scores(decoder, sources[2], masks[2], batch_size, device)


@register_task("segmentation")
def segmentation(adapter, data, split: str = "test", *, mask_column: str = "mask", num_classes: int | None = None,
                 class_names=None, epochs: int = 20, lr: float = 1e-3, batch_size: int = 16, channels: int = 64,
                 weight_decay: float = 1e-4, label_fraction=None, seed: int = 0, train_split: str = "train",
                 validation_split: str = "validation", feature_cache_mb: float = 2048,
                 **options) -> dict[str, float]:  # fmt: skip
    """Train the decoder, evaluate on `data[split]` (see the module docstring): `dice/<class>`, `dice/mean` with CIs.
    `class_names`: the foreground classes' names (or every class's, background first); `label_fraction` (alias
    `fraction`); bootstrap `n_resamples` (1000) / `alpha` (0.05). Other options are ignored."""
    fraction = label_fraction or options.get("fraction")
    splits = training_splits(data, split, train_split, validation_split, seed, fraction)
    size = tuple(adapter.pixel_values(column(splits[0], "image", [0])).shape[-2:])
    masks = [load_masks(s, mask_column, size) for s in splits]
    classes, scaled = class_count(masks[0], num_classes)
    masks = [np.where(m == 255, 1, m) if scaled else m for m in masks]
    names = foreground_names(as_list(class_names), classes)
    with seeded(seed):
        scores = train_decoder(
            adapter, splits, masks, classes, size, int(epochs), float(lr), int(batch_size), int(channels),
            float(weight_decay), seed, float(feature_cache_mb),
        )  # fmt: skip
    bootstrap = bootstrap_options({**options, "seed": seed})
    metrics = with_ci([f"dice/{name}" for name in names], lambda d: d.mean(0), scores, **bootstrap)
    metrics.update(with_ci("dice/mean", lambda d: d.mean(), scores, **bootstrap))
    return metrics
