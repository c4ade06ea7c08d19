"""Helpers the tasks share: picking splits, label names and label matrices, option parsing."""

from __future__ import annotations

import json
from typing import Sequence

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Value


def as_list(value, cast=None, sep: str | None = ",") -> list | None:
    """A list from a list/tuple, a JSON list string or a `sep`-separated string (CLI options; `sep=None`: one
    item); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            value = json.loads(text)
        else:
            value = [v.strip() for v in text.split(sep) if v.strip()] if sep else [text]
    value = list(value) if isinstance(value, (list, tuple)) else [value]
    return [cast(v) for v in value] if cast else value


def as_bool(value) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def select_split(data: Dataset | DatasetDict, split: str = "test") -> Dataset:
    """`data[split]` of a `DatasetDict`; a `Dataset` as is."""
    if isinstance(data, DatasetDict):
        if split not in data:
            raise KeyError(f"no split {split!r} (splits: {list(data)})")
        return data[split]
    return data


def train_validation_test(
    data: Dataset | DatasetDict, split: str = "test", train_split: str = "train",
    validation_split: str = "validation", seed: int = 0, validation_fraction: float = 0.2,
) -> tuple[Dataset, Dataset, Dataset]:  # fmt: skip
    """(train, validation, test) for trained evaluations. A `DatasetDict` gives `train_split` and `split`, and
    `validation_split` when present, else a seeded `validation_fraction` of train. A single `Dataset` is split
    60/20/20 by a seeded permutation of its rows."""
    if isinstance(data, DatasetDict):
        train, test = data[train_split], select_split(data, split)
        if validation_split in data and len(data[validation_split]):
            return train, data[validation_split], test
        parts = train.train_test_split(test_size=validation_fraction, seed=seed)
        return parts["train"], parts["test"], test
    order = np.random.default_rng(seed).permutation(len(data))
    cut1, cut2 = int(0.6 * len(data)), int(0.8 * len(data))
    return data.select(order[:cut1]), data.select(order[cut1:cut2]), data.select(order[cut2:])


def _feature_names(feature) -> list[str] | None:
    inner = getattr(feature, "feature", feature)  # List(ClassLabel) / Sequence(ClassLabel)
    return list(inner.names) if isinstance(inner, ClassLabel) else None


def resolve_label_names(dataset: Dataset, label_names=None, column: str = "labels") -> list[str]:
    """Candidate labels: `label_names` when given; else the column's `ClassLabel` names; else every label that
    occurs in the column, sorted."""
    names = as_list(label_names)
    if names:
        return [str(n) for n in names]
    names = _feature_names(dataset.features[column])
    if names:
        return names
    seen = {label for row in dataset[column] for label in ([row] if isinstance(row, (str, int)) else row)}
    return sorted(str(label) for label in seen)


def _row_labels(row, feature_names: list[str] | None) -> list[str]:
    row = [row] if isinstance(row, (str, int, np.integer)) else list(row or [])
    return [feature_names[v] if feature_names and not isinstance(v, str) else str(v) for v in row]


def label_matrix(dataset: Dataset, names: Sequence[str], column: str = "labels") -> np.ndarray:
    """`[N, L]` bool: row i has label `names[l]`. The column holds a label or a list of labels per row (names,
    or ClassLabel ids)."""
    feature_names = _feature_names(dataset.features[column])
    index = {name: i for i, name in enumerate(names)}
    matrix = np.zeros((len(dataset), len(names)), bool)
    for row, labels in enumerate(dataset[column]):
        for label in _row_labels(labels, feature_names):
            if label in index:
                matrix[row, index[label]] = True
    return matrix


def is_single_label(matrix: np.ndarray) -> bool:
    """Every row has exactly one label (a multi-class set) and there are at least two labels."""
    return matrix.shape[1] > 1 and bool((matrix.sum(1) == 1).all())


def concept_columns(dataset: Dataset, concepts=None) -> list[str]:
    """`concepts` when given; else every bool column of `dataset`."""
    concepts = as_list(concepts)
    if concepts:
        missing = [c for c in concepts if c not in dataset.column_names]
        if missing:
            raise KeyError(f"concept columns {missing} not in {dataset.column_names}")
        return concepts
    found = [c for c, f in dataset.features.items() if isinstance(f, Value) and f.dtype == "bool"]
    if not found:
        raise ValueError("no bool concept columns; name them with the `concepts` option")
    return found


def column_matrix(dataset: Dataset, columns: Sequence[str]) -> np.ndarray:
    """`[N, C]` bool from 0/1 or bool columns."""
    return np.stack([np.asarray(list(dataset[c]), dtype=float) > 0.5 for c in columns], axis=1)
