"""Routing of a mixture-of-body-part-experts model: which expert the gate picks (argmax of the gate logits, mean
over MoBE layers) for the images of each body part, and how often it is the body part's own expert.

Flat metrics (each with a bootstrap 95% CI over images):
- `gate_accuracy` (all images whose body part is one of the model's experts) and `gate_accuracy/<part>`;
- the body-part x expert usage matrix as `routing/<part>/<expert>`: the share of `<part>` images routed to
  `<expert>` (each part's row sums to 1; `usage="soft"` gives the mean softmax gate weight instead).
`routing_matrix(metrics)` turns those keys back into (matrix, parts, experts) for plots.
"""

from __future__ import annotations

import numpy as np

from eval.cache import cached_embeddings
from eval.metrics import CI_HIGH, CI_LOW, bootstrap_options, with_ci
from eval.registry import register_task
from eval.tasks.common import select_split

PREFIX = "routing/"


def _usage(gates: np.ndarray, soft: bool) -> np.ndarray:
    if soft:
        weights = np.exp(gates - gates.max(1, keepdims=True))
        return weights / weights.sum(1, keepdims=True)
    return np.eye(gates.shape[1])[gates.argmax(1)]


def _part_ids(adapter, parts: list[str]) -> np.ndarray:
    """Expert index of each row's body part (-1 when the model has no expert for it)."""
    lookup = {name: i for i, name in enumerate(adapter.body_parts)}
    body_part_ids = getattr(adapter.processor, "body_part_ids", None)
    ids = []
    for part in parts:
        if part in lookup or body_part_ids is None:
            ids.append(lookup.get(part, -1))
            continue
        try:
            ids.append(body_part_ids(part)[0])  # DICOM terms, spelling variants
        except ValueError:
            ids.append(-1)
    return np.asarray(ids)


def routing_matrix(metrics: dict) -> tuple[np.ndarray, list[str], list[str]]:
    """(usage `[parts, experts]`, parts, experts) from a routing result's `routing/<part>/<expert>` keys."""
    cells = {}
    for key, value in metrics.items():
        if key.startswith(PREFIX) and not key.endswith((CI_LOW, CI_HIGH)):
            part, expert = key[len(PREFIX) :].split("/", 1)
            cells[part, expert] = value
    parts = list(dict.fromkeys(p for p, _ in cells))
    experts = list(dict.fromkeys(e for _, e in cells))
    matrix = np.array([[cells.get((p, e), np.nan) for e in experts] for p in parts])
    return matrix, parts, experts


@register_task("routing")
def routing(adapter, data, split: str = "test", **options) -> dict[str, float]:
    """Gate accuracy and the body-part x expert usage matrix on `data[split]`. Options: `body_part_column`
    ("body_part"), `image_column`, `usage` ("top1" | "soft"), `cache_dir`, `batch_size`, bootstrap options."""
    if not adapter.body_parts:
        raise ValueError(f"{adapter.name} has no body-part experts to route to")
    dataset = select_split(data, split)
    gates = cached_embeddings(
        adapter, dataset, "gate", options.get("image_column", "image"), options.get("cache_dir"),
        options.get("batch_size"),
    )  # fmt: skip
    parts = list(dataset[options.get("body_part_column", "body_part")])
    ids = _part_ids(adapter, parts)
    present = sorted(set(parts), key=parts.index)
    rows = np.stack([np.asarray(parts) == p for p in present], axis=1)  # [N, P] one-hot body part
    correct = gates.argmax(1) == ids
    usage = _usage(gates, options.get("usage", "top1") == "soft")
    known = ids >= 0
    names = ["gate_accuracy"] + [f"gate_accuracy/{p}" for p in present]
    names += [f"{PREFIX}{p}/{e}" for p in present for e in adapter.body_parts]

    def metric(rows_, correct_, usage_, known_):
        with np.errstate(invalid="ignore", divide="ignore"):
            accuracy = (correct_ & known_).sum() / known_.sum()
            per_part = (rows_ & (correct_ & known_)[:, None]).sum(0) / (rows_ & known_[:, None]).sum(0)
            matrix = (rows_.T.astype(float) @ usage_) / rows_.sum(0)[:, None]
        return np.concatenate([[accuracy], per_part, matrix.ravel()])

    return with_ci(names, metric, rows, correct, usage, known, **bootstrap_options(options))
