"""Concept alignment: how linearly readable each concept (a bool / 0-1 column, e.g. "growth plate visible",
"cardiomegaly") is from the frozen image embeddings. One binary linear probe per concept (as `linear_probe`:
standardised features, logistic regression, C chosen on validation); AUC per concept and macro, with CIs."""

from __future__ import annotations

from eval.registry import register_task
from eval.tasks.common import column_matrix, concept_columns, train_validation_test
from eval.tasks.linear_probe import probe_metrics


@register_task("concept_alignment")
def concept_alignment(adapter, data, split: str = "test", concepts=None, **options) -> dict[str, float]:
    """`auc/<concept>` and `auc/macro` on `data[split]`. `concepts`: the concept columns (default: every bool
    column). Other options as `linear_probe` (`fraction`, `Cs`, `max_iter`, `seed`, `n_resamples`, ...)."""
    options.pop("label_names", None)
    splits = train_validation_test(
        data, split, options.get("train_split", "train"), options.get("validation_split", "validation"),
        seed=int(options.get("seed", 0)),
    )  # fmt: skip
    names = concept_columns(splits[0], concepts)
    # each concept is its own binary problem, even when the concepts happen to be mutually exclusive
    return probe_metrics(adapter, splits, lambda d: (names, column_matrix(d, names)), multi_label=True, **options)
