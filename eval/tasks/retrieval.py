"""Image <-> text retrieval: the i-th image's match is the i-th text (its report); Recall@k in both directions,
each with a bootstrap 95% CI over queries (the gallery stays the whole split)."""

from __future__ import annotations

import numpy as np

from eval.cache import cached_embeddings
from eval.metrics import bootstrap_options, with_ci
from eval.registry import register_task
from eval.tasks.common import as_list, select_split

DEFAULT_KS = (1, 5, 10)


def retrieval_hits(image_embeds: np.ndarray, text_embeds: np.ndarray, ks=DEFAULT_KS) -> dict[str, np.ndarray]:
    """{"image_to_text/R@k": [N] bool, "text_to_image/R@k": ...}: whether each query's match ranks in the top k.
    A query's rank = how many candidates score strictly higher than its match (ties count for the query)."""
    similarity = np.asarray(image_embeds, np.float64) @ np.asarray(text_embeds, np.float64).T
    hits = {}
    for direction, sim in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranks = (sim > np.diag(sim)[:, None]).sum(1)
        hits.update({f"{direction}/R@{k}": ranks < k for k in ks})
    return hits


@register_task("retrieval")
def retrieval(adapter, data, split: str = "test", **options) -> dict[str, float]:
    """`image_to_text/R@k`, `text_to_image/R@k` (k in `ks`, default 1, 5, 10) and their mean `mean_recall` on
    `data[split]`. Options: `text_column` ("text"), `image_column` ("image"), `ks`, `cache_dir`, `batch_size`,
    `n_resamples`, `seed`, `alpha`."""
    dataset = select_split(data, split)
    embed = lambda kind, column: cached_embeddings(  # noqa: E731
        adapter, dataset, kind, column, options.get("cache_dir"), options.get("batch_size")
    )
    images = embed("image", options.get("image_column", "image"))
    texts = embed("text", options.get("text_column", "text"))
    hits = retrieval_hits(images, texts, as_list(options.get("ks"), int) or DEFAULT_KS)
    names = [*hits, "mean_recall"]
    matrix = np.stack(list(hits.values()), axis=1).astype(np.float64)
    metric = lambda h: np.append(h.mean(0), h.mean())  # noqa: E731
    return with_ci(names, metric, matrix, **bootstrap_options(options))
