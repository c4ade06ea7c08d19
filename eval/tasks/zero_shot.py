"""Zero-shot classification: score each image against prompt embeddings of every candidate label; AUC per label
(one-vs-rest) and macro (mean over labels with a defined AUC), each with a bootstrap 95% CI over images.

Scores (`score` option):
- "softmax": softmax over labels of `logit_scale * cosine(image, label prompts)` (CLIP; single-label sets);
- "pos_neg": CheXzero's softmax over ("{label}" prompts, "no {label}" prompts) per label (multi-label sets);
- "cosine": the raw cosine with each label's prompts;
- "auto" (default): "pos_neg" when `negative_templates` are given or the set is multi-label, else "softmax".
Templates are ensembled (mean of normalised embeddings, `pedclip.prompts.label_embeddings`). With
`body_part_prompts=True` each image is scored with prompts naming its body part (`{body_part}` templates).
`eligibility="body_part"` evaluates each label only on rows of body parts where it occurs in the split
(`pedclip.evaluation.finding_eligibility`); a dict {label: [parts]} names them.

`pedclip.evaluation.zero_shot_auc` (the training demo's number) is the options
`templates=["{label}"], negative_templates=["no {label}"], eligibility="body_part"` (`CHEXZERO_OPTIONS`).
"""

from __future__ import annotations

import numpy as np

from eval.cache import cached_embeddings
from eval.metrics import bootstrap_options, label_aucs, with_ci
from pedclip.prompts import (
    BODY_PART_NEGATIVE_TEMPLATES, BODY_PART_TEMPLATES, DEFAULT_NEGATIVE_TEMPLATES, DEFAULT_TEMPLATES,
    label_embeddings, label_text, positive_negative_scores, softmax_scores,
)  # fmt: skip
from eval.registry import register_task
from eval.tasks.common import as_bool, as_list, is_single_label, label_matrix, resolve_label_names, select_split
from pedclip.evaluation import finding_eligibility

SCORES = ("auto", "softmax", "pos_neg", "cosine")
CHEXZERO_OPTIONS = {"templates": ["{label}"], "negative_templates": ["no {label}"], "eligibility": "body_part"}


def eligibility_mask(y: np.ndarray, names: list[str], body_parts, eligibility) -> np.ndarray:
    """`[N, L]` bool: which rows evaluate which label. None/"all": every row; "body_part": rows of the body parts
    where the label occurs in this split (the `finding_eligibility` rule); a dict {label: [body parts]}."""
    if eligibility in (None, "all", "none"):
        return np.ones(y.shape, bool)
    if body_parts is None:
        raise ValueError("eligibility by body part needs a body_part column")
    if eligibility == "body_part":
        rows = [[names[l] for l in np.flatnonzero(row)] for row in y]
        eligible = finding_eligibility(rows, list(body_parts))
        return np.stack([np.asarray(eligible.get(name, [False] * len(y)), bool) for name in names], axis=1)
    if isinstance(eligibility, dict):
        parts = np.asarray(body_parts, dtype=object)
        return np.stack([np.isin(parts, list(eligibility.get(name, parts))) for name in names], axis=1)
    raise ValueError(f"eligibility must be None, 'body_part' or a dict, got {eligibility!r}")


def _resolve_score(score: str, negative_templates, y: np.ndarray) -> str:
    if score not in SCORES:
        raise ValueError(f"score must be one of {SCORES}, got {score!r}")
    if score != "auto":
        return score
    return "pos_neg" if negative_templates or not is_single_label(y) else "softmax"


def _score(adapter, images: np.ndarray, words: list[str], score: str, templates, negatives, part=None):
    positive = label_embeddings(adapter, words, templates, part)
    if score == "pos_neg":
        return positive_negative_scores(images, positive, label_embeddings(adapter, words, negatives, part))
    if score == "softmax":
        return softmax_scores(images, positive, adapter.logit_scale)
    return images @ positive.T


def _templates(options: dict, by_part: bool) -> tuple[list[str], list[str]]:
    """(positive, negative) templates: the options', else the defaults (body-part-aware ones with `by_part`)."""
    positive = BODY_PART_TEMPLATES if by_part else DEFAULT_TEMPLATES
    negative = BODY_PART_NEGATIVE_TEMPLATES if by_part else DEFAULT_NEGATIVE_TEMPLATES
    return (
        as_list(options.get("templates"), sep=None) or list(positive),
        as_list(options.get("negative_templates"), sep=None) or list(negative),
    )


def zero_shot_scores(adapter, dataset, label_names=None, **options) -> dict:
    """{"names", "labels" [N, L] bool, "scores" [N, L], "mask" [N, L] bool, "score"} of `dataset` (one split):
    what the task's AUCs are computed from (also for ROC plots). Options as `zero_shot`."""
    column = options.get("label_column", "labels")
    names = resolve_label_names(dataset, label_names, column)
    y = label_matrix(dataset, names, column)
    images = cached_embeddings(
        adapter, dataset, "image", options.get("image_column", "image"), options.get("cache_dir"),
        options.get("batch_size"),
    )  # fmt: skip
    score = _resolve_score(options.get("score", "auto"), options.get("negative_templates"), y)
    words = [label_text(name, options.get("label_text")) for name in names]
    body_part_column = options.get("body_part_column", "body_part")
    parts = list(dataset[body_part_column]) if body_part_column in dataset.column_names else None
    by_part = as_bool(options.get("body_part_prompts", False))
    templates, negatives = _templates(options, by_part)
    if not by_part:
        scores = _score(adapter, images, words, score, templates, negatives)
    elif parts is None:
        raise ValueError(f"body_part_prompts needs a {body_part_column!r} column")
    else:
        scores = np.zeros(y.shape, np.float32)
        for part in sorted(set(parts)):
            rows = np.asarray([p == part for p in parts])
            scores[rows] = _score(adapter, images[rows], words, score, templates, negatives, part)
    mask = eligibility_mask(y, names, parts, options.get("eligibility"))
    return {"names": names, "labels": y, "scores": np.asarray(scores, np.float32), "mask": mask, "score": score}


def auc_metrics(names: list[str], y: np.ndarray, scores: np.ndarray, mask: np.ndarray, **bootstrap) -> dict:
    """`auc/<label>` for each label with both classes among its rows, `auc/macro` (their mean), with CIs. A
    bootstrap resample where one of them lacks a class is skipped for that label and for the macro."""
    defined = np.isfinite(label_aucs(y, scores, mask))
    if not defined.any():
        raise ValueError("no label has both positive and negative images: AUC is undefined")
    keys = [f"auc/{name}" for name, ok in zip(names, defined) if ok] + ["auc/macro"]

    def metric(y_, s_, m_):
        aucs = label_aucs(y_[:, defined], s_[:, defined], m_[:, defined])
        return np.append(aucs, aucs.mean())  # NaN macro when a label is undefined in the resample

    return with_ci(keys, metric, y, scores, mask, **bootstrap)


@register_task("zero_shot")
def zero_shot(adapter, data, split: str = "test", label_names=None, **options) -> dict[str, float]:
    """Zero-shot AUC per label and macro on `data[split]`. Options: `templates`, `negative_templates`, `score`,
    `body_part_prompts`, `eligibility`, `label_text` ({label: prompt words}), `label_column` ("labels"),
    `image_column` ("image"), `body_part_column` ("body_part"), `cache_dir`, `batch_size`, bootstrap
    `n_resamples` (1000) / `seed` (0) / `alpha` (0.05)."""
    result = zero_shot_scores(adapter, select_split(data, split), label_names, **options)
    return auc_metrics(
        result["names"], result["labels"], result["scores"], result["mask"], **bootstrap_options(options)
    )
