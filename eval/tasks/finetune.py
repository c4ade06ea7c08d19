"""`finetune`: train the vision tower (fully, with LoRA, or not at all) and a linear classification head; ROC AUC.

Labels come from the `labels` column (`label_column`: a list of positive label names per row) and `label_names` (the
candidate labels; default the column's ClassLabel names, else every label seen in train). A set where every row has
exactly one candidate label is single-label (softmax + cross-entropy), any other multi-label (sigmoid + BCE; rows
whose labels are no candidates, e.g. "normal", are all-negative); force either with `multi_label=`. The epoch with
the best validation macro AUC is kept. Test metrics: `auc/<label>` (labels with both classes in the test split),
`auc/macro`, and `accuracy` for single-label sets, each with a bootstrap 95% CI (`eval.tasks.zero_shot.auc_metrics`).

Modes:
- `full`: every tower parameter and the head train (AdamW; `lr` for the tower, `head_lr` for the head).
- `lora` (default): `peft` LoRA (rank `lora_r`, scale `lora_alpha / lora_r`; `pedclip.lora.lora_config`) on the
  tower's attention projections and MLPs: by default every `nn.Linear` whose name is one of
  `pedclip.lora.DEFAULT_LORA_TARGETS` (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2` in PedCLIP, CLIP and
  SigLIP towers; `o_proj`, `query`/`key`/`value`, `qkv` in other ViTs) plus, in PedCLIP, the MoBE experts' stacked
  weights `fc1_weight` / `fc2_weight` (rank `lora_r` per expert, through peft's `target_parameters`: peft's module
  LoRA only wraps `nn.Linear`/conv/embedding layers; no `lora_dropout` there). `lora_targets` names the modules
  instead; `lora_experts` forces the experts on or off (default: on when `lora_targets` is not given). The base
  tower is frozen: only the LoRA matrices and the head train.
- `head`: the tower stays frozen; its pooled features are computed once and only the head trains (fast).

Training works on a private copy of the adapter's model; the adapter passed in is left as it was. The run is
deterministic given `seed` (validation carve-out, label fraction, head/LoRA init, shuffling, bootstrap).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from eval.heads import ClassificationHead, VisionClassifier
from eval.metrics import bootstrap_options, macro_auc, with_ci
from eval.registry import register_task
from eval.tasks.common import (
    as_bool, as_list, is_single_label, label_matrix, resolve_label_names, train_validation_test,
)  # fmt: skip
from eval.tasks.zero_shot import auc_metrics
from eval.training import BatchSource, column, fit, predict, private_adapter, seeded, set_trainable, subsample
from pedclip.lora import lora_config, lora_targets_of  # noqa: F401 (lora_targets_of: part of this module's API)

MODES = ("full", "lora", "head")
DEFAULT_LR = {"full": 3e-5, "lora": 5e-4, "head": 1e-3}
VALIDATION_FRACTION = 0.1  # of train, when the data has no validation split
TRAINING_OPTIONS = ("lr", "head_lr", "lora_r", "lora_alpha", "lora_targets", "lora_experts", "lora_dropout",
                    "pixel_cache_mb")  # fmt: skip


# ------------------------------------------------------------------------------------------------------ LoRA


def apply_lora(tower: torch.nn.Module, r: int = 8, alpha: float = 16, targets=None, experts: bool | None = None,
               dropout: float = 0.0) -> torch.nn.Module:  # fmt: skip
    """Inject LoRA adapters into `tower` in place (peft; targets as `pedclip.lora.lora_config`) and freeze everything
    else; returns `tower`. `experts=None` adapts the MoBE experts when `targets` is None and the tower has them."""
    from peft import inject_adapter_in_model

    experts = None if experts is None else as_bool(experts)
    config = lora_config(tower, r, alpha, as_list(targets), experts, dropout)
    set_trainable(tower, False)
    inject_adapter_in_model(config, tower)
    for name, param in tower.named_parameters():
        param.requires_grad_("lora_" in name)
    return tower


# ------------------------------------------------------------------------------------------------------ models


def pixel_source(adapter, dataset, budget_mb: float = 1024) -> BatchSource:
    """`adapter.pixel_values` of a split's images, on the CPU (kept in memory when they fit in `budget_mb`)."""
    return BatchSource(len(dataset), lambda i: adapter.pixel_values(column(dataset, "image", i)).cpu(), budget_mb)


def pooled_source(adapter, dataset, batch_size: int = 32) -> BatchSource:
    """Frozen pooled vision features of a split, computed once and kept in memory (CPU)."""

    def make(indices):
        with torch.no_grad():
            pixels = adapter.pixel_values(column(dataset, "image", indices)).to(adapter.device)
            return adapter.vision_features(pixels)[0].float().cpu()

    return BatchSource(len(dataset), make, budget_mb=float("inf"), chunk=batch_size)


def build_classifier(adapter, num_outputs: int, in_features: int, mode: str, extra_features: int = 0,
                     lr: float | None = None, head_lr: float = 1e-3, lora_r: int = 8, lora_alpha: float = 16,
                     lora_targets=None, lora_experts: bool | None = None, lora_dropout: float = 0.0):  # fmt: skip
    """(`VisionClassifier` on a private copy of `adapter`, AdamW parameter groups) for mode `full` or `lora`."""
    work = private_adapter(adapter)
    tower = work.vision_tower()
    if mode == "lora":
        apply_lora(tower, lora_r, lora_alpha, lora_targets, lora_experts, lora_dropout)
    else:
        set_trainable(tower, True)
    head = ClassificationHead(in_features, num_outputs, extra_features).to(adapter.device)
    tower_params = [p for p in tower.parameters() if p.requires_grad]
    groups = [{"params": tower_params, "lr": lr or DEFAULT_LR[mode]}, {"params": [*head.parameters()], "lr": head_lr}]
    return VisionClassifier(work, head), groups


def setup_training(adapter, splits, mode: str, num_outputs: int, extra_features: int = 0, batch_size: int = 32,
                   lr: float | None = None, pixel_cache_mb: float = 1024, **tower_options):  # fmt: skip
    """(model, AdamW parameter groups, one input source per split) for `mode`. Every model is called as
    `model(source(indices).to(device), extra)`: in `head` mode the model is the head and the sources hold frozen
    pooled features; otherwise it is a `VisionClassifier` (tower + head) and the sources hold pixel values.
    `tower_options`: `head_lr` and the `lora_*` options of `build_classifier`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if mode == "head":
        sources = [pooled_source(adapter, split, batch_size) for split in splits]
        head = ClassificationHead(sources[0].cached.shape[-1], num_outputs, extra_features).to(adapter.device)
        return head, [{"params": list(head.parameters()), "lr": lr or DEFAULT_LR["head"]}], sources
    width = pooled_source(adapter, splits[0].select(range(1))).cached.shape[-1]
    model, groups = build_classifier(adapter, num_outputs, width, mode, extra_features, lr, **tower_options)
    return model, groups, [pixel_source(adapter, split, pixel_cache_mb) for split in splits]


def run_outputs(model, source: BatchSource, device, batch_size: int, extra: np.ndarray | None = None) -> np.ndarray:
    """The model's outputs for every row of `source` (no gradients), float32 `[N, outputs]`."""
    return predict(lambda i: model(source(i).to(device), rows_of(extra, i, device)), len(source), batch_size)


def rows_of(extra: np.ndarray | None, indices: np.ndarray, device) -> torch.Tensor | None:
    return None if extra is None else torch.as_tensor(extra[indices], device=device)


def training_splits(data, split: str, train_split: str, validation_split: str, seed: int, fraction=None):
    """(train, validation, test): `eval.tasks.common.train_validation_test` with a 10% validation carve-out; train
    cut to a seeded `fraction` of its rows when given (`eval.training.subsample`)."""
    splits = train_validation_test(data, split, train_split, validation_split, seed, VALIDATION_FRACTION)
    train, validation, test = splits
    if fraction is not None:
        train = train.select(subsample(len(train), fraction, seed))
    return train, validation, test


# ------------------------------------------------------------------------------------------------------ task


@register_task("finetune")
def finetune(adapter, data, split: str = "test", label_names=None, *, mode: str = "lora", multi_label=None,
             epochs: int = 10, batch_size: int = 32, weight_decay: float = 1e-4, label_fraction=None, seed: int = 0,
             train_split: str = "train", validation_split: str = "validation", label_column: str = "labels",
             **options) -> dict[str, float]:  # fmt: skip
    """Fine-tune on train, select the epoch on validation, evaluate on `data[split]` (see the module docstring).
    Options: `lr` (tower; default 3e-5 full, 5e-4 LoRA, 1e-3 head), `head_lr` (1e-3), `lora_r` (8), `lora_alpha`
    (16), `lora_targets`, `lora_experts`, `lora_dropout` (0), `pixel_cache_mb` (1024: pixel values kept in memory
    up to this size), `label_fraction` (alias `fraction`; 0.1 or "10%": a seeded subset of train keeping both
    classes of every label), bootstrap `n_resamples` (1000) / `alpha` (0.05). Other options are ignored."""
    splits = training_splits(data, split, train_split, validation_split, seed)
    names = resolve_label_names(splits[0], label_names, label_column)
    ys = [label_matrix(s, names, label_column).astype(np.float32) for s in splits]
    rows = subsample(len(splits[0]), label_fraction or options.get("fraction"), seed, ys[0].astype(bool))
    splits, ys[0] = (splits[0].select(rows), *splits[1:]), ys[0][rows]
    single = is_single_label(np.concatenate(ys)) if multi_label is None else not as_bool(multi_label)
    training = {k: options[k] for k in TRAINING_OPTIONS if options.get(k) is not None}
    device = adapter.device
    with seeded(seed):
        model, groups, sources = setup_training(adapter, splits, mode, len(names), batch_size=batch_size, **training)
        scores = lambda k: _scores(run_outputs(model, sources[k], device, batch_size), single)  # noqa: E731
        fit(
            model, groups, lambda i: _loss(model(sources[0](i).to(device)), ys[0][i], single),
            lambda: macro_auc(ys[1], scores(1)), num_rows=len(splits[0]), epochs=int(epochs),
            batch_size=int(batch_size), seed=seed, weight_decay=weight_decay,
        )  # fmt: skip
        test_scores = scores(2)
    return classification_metrics(names, ys[2], test_scores, single, **bootstrap_options({**options, "seed": seed}))


def classification_metrics(names, y: np.ndarray, scores: np.ndarray, single_label: bool, **bootstrap) -> dict:
    """`auc_metrics` (per label, macro) plus `accuracy` (argmax) for single-label sets, all with CIs."""
    metrics = auc_metrics(list(names), y.astype(bool), scores, np.ones(y.shape, bool), **bootstrap)
    if single_label:
        accuracy = lambda t, s: float(np.mean(t.argmax(1) == s.argmax(1)))  # noqa: E731
        metrics.update(with_ci("accuracy", accuracy, y, scores, **bootstrap))
    return metrics


def _loss(logits: torch.Tensor, y: np.ndarray, single: bool) -> torch.Tensor:
    y = torch.as_tensor(y, device=logits.device)
    if single:
        return F.cross_entropy(logits.float(), y.argmax(1))
    return F.binary_cross_entropy_with_logits(logits.float(), y)


def _scores(logits: np.ndarray, single: bool) -> np.ndarray:
    logits = torch.as_tensor(logits)
    return (logits.softmax(-1) if single else logits.sigmoid()).numpy()
