"""Zero-shot prompts: templates, template ensembles and the CheXzero positive-vs-negative softmax.

One implementation for `eval`'s zero-shot task and the `pedclip predict` CLI: numpy and any object with `embed_texts`.
A template is a `str.format` pattern with `{label}` and optionally `{body_part}`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

DEFAULT_TEMPLATES = (
    "{label}",
    "a pediatric x-ray showing {label}",
    "radiograph of a child with {label}",
    "findings consistent with {label}",
)
DEFAULT_NEGATIVE_TEMPLATES = (
    "no {label}",
    "a pediatric x-ray showing no {label}",
    "radiograph of a child without {label}",
    "no findings of {label}",
)
BODY_PART_TEMPLATES = (
    "{label} of the {body_part}",
    "a pediatric {body_part} x-ray showing {label}",
)
BODY_PART_NEGATIVE_TEMPLATES = (
    "no {label} of the {body_part}",
    "a pediatric {body_part} x-ray showing no {label}",
)
# The protocol of `pedclip.evaluation.zero_shot_auc` (and the training demo's number): one prompt pair per finding.
CHEXZERO_TEMPLATES, CHEXZERO_NEGATIVE_TEMPLATES = ("{label}",), ("no {label}",)


def label_text(label: str, names: dict[str, str] | None = None) -> str:
    """The words a prompt uses for `label`: `names[label]` when given, else the label with "_" as spaces."""
    return (names or {}).get(label, label.replace("_", " "))


def body_part_text(body_part: str) -> str:
    return body_part.replace("_", " ")


def format_prompts(label: str, templates: Sequence[str], body_part: str | None = None) -> list[str]:
    """`templates` filled with `label` (and `body_part`; a template naming `{body_part}` needs one)."""
    if body_part is None and any("{body_part}" in t for t in templates):
        raise ValueError(f"templates {list(templates)} name {{body_part}}: give a body part")
    part = body_part_text(body_part) if body_part is not None else ""
    return [template.format(label=label, body_part=part) for template in templates]


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def label_embeddings(
    adapter, labels: Sequence[str], templates: Sequence[str] = DEFAULT_TEMPLATES, body_part: str | None = None
) -> np.ndarray:
    """`[L, D]` prompt-ensemble embedding of each label: the mean of its normalised template embeddings,
    renormalised (one `embed_texts` call for every prompt). `labels` are prompt words (see `label_text`)."""
    templates = list(templates)
    if not templates:
        raise ValueError("need at least one template")
    return prompt_ensembles(adapter, [format_prompts(label, templates, body_part) for label in labels])


def prompt_ensembles(adapter, prompt_lists: Sequence[Sequence[str]]) -> np.ndarray:
    """`[L, D]`: for each list of prompts (lists may differ in length), the mean of its prompts' normalised
    embeddings, renormalised. One `embed_texts` call for every prompt."""
    sizes = [len(prompts) for prompts in prompt_lists]
    if not sizes:
        raise ValueError("no labels to embed prompts for")
    if min(sizes) == 0:
        raise ValueError("need at least one prompt per label")
    embeds = _normalise(np.asarray(adapter.embed_texts([p for prompts in prompt_lists for p in prompts]), np.float32))
    means = np.stack([chunk.mean(0) for chunk in np.split(embeds, np.cumsum(sizes)[:-1])])
    return _normalise(means).astype(np.float32)


def positive_negative_scores(image_embeds: np.ndarray, positive: np.ndarray, negative: np.ndarray) -> np.ndarray:
    """`[N, L]` CheXzero score: per label, the softmax over (image·positive_l, image·negative_l) taken at the
    positive prompt (cosine logits, no temperature, as `pedclip.evaluation.zero_shot_auc`)."""
    from pedclip.evaluation import positive_negative_probabilities

    return positive_negative_probabilities(image_embeds, positive, negative)


def softmax_scores(image_embeds: np.ndarray, label_embeds: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    """`[N, L]` softmax over labels of `logit_scale * cosine` (CLIP's single-label zero-shot)."""
    logits = logit_scale * (np.asarray(image_embeds, np.float64) @ np.asarray(label_embeds, np.float64).T)
    logits -= logits.max(-1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(-1, keepdims=True)).astype(np.float32)
