"""On-disk cache of embeddings: computed once per (model, data set, kind, column), then read back.

Key = sha256 of the adapter's `fingerprint`, the dataset's `_fingerprint` (datasets' content/transform hash), the
kind ("image", "text" or "gate") and the column. Files are `<key>.npy` in `cache_dir`, default `PEDCLIP_EVAL_CACHE`
or `~/.cache/pedclip/eval`, written to a temporary name and renamed (atomic: a crash never leaves half a file).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

KINDS = ("image", "text", "gate")
CACHE_VERSION = "1"
CHUNK_ROWS = 256  # rows decoded at a time (images stay out of memory)


def default_cache_dir() -> Path:
    return Path(os.environ.get("PEDCLIP_EVAL_CACHE") or Path.home() / ".cache" / "pedclip" / "eval")


def cache_key(adapter, dataset, kind: str, column: str) -> str:
    fingerprint = getattr(dataset, "_fingerprint", None)
    if not fingerprint:
        raise ValueError("the dataset has no _fingerprint (pass a datasets.Dataset)")
    parts = (CACHE_VERSION, adapter.fingerprint, fingerprint, kind, column, str(len(dataset)))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


def _compute(adapter, dataset, kind: str, column: str, batch_size: int | None) -> np.ndarray:
    embed = {"image": adapter.embed_images, "text": adapter.embed_texts, "gate": adapter.gate_logits}[kind]
    kwargs = {"batch_size": batch_size} if batch_size and kind != "gate" else {}
    chunks = []
    for start in range(0, len(dataset), CHUNK_ROWS):
        values = list(dataset[start : start + CHUNK_ROWS][column])
        chunk = embed(values, **kwargs)
        if chunk is None:
            raise ValueError(f"{adapter.name} has no gate logits (not a mixture-of-experts model)")
        chunks.append(np.asarray(chunk, dtype=np.float32))
    return np.concatenate(chunks) if chunks else np.zeros((0, 0), np.float32)


def _save_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_embeddings(
    adapter, dataset, kind: str, column: str, cache_dir: str | Path | None = None, batch_size: int | None = None
) -> np.ndarray:
    """`[N, D]` float32 embeddings of `dataset[column]` by `adapter` (`kind` "image" or "text": L2-normalised;
    "gate": the gate logits `[N, E]`), from the cache when there, else computed and stored. `cache_dir=False`
    disables the cache."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if cache_dir is False:
        return _compute(adapter, dataset, kind, column, batch_size)
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(adapter, dataset, kind, column)}.npy"
    if path.is_file():
        return np.load(path)
    array = _compute(adapter, dataset, kind, column, batch_size)
    _save_atomic(path, array)
    return array
