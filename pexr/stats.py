"""Statistics of a built PeXR folder (`pexr.build`): what went in, what was rejected, how long the texts are.

`write_stats(output_dir)` reads `data/*.parquet` (only the text and body_part columns; a file's split is its
name's prefix, as `pedclip.data.load_training_dataset` reads it), `rejects.jsonl` and the shard done markers
(`shards/*.done.json`, for how the texts were produced), and writes:

- `stats.md`: images per body part and split with unique texts per body part, text length summary and histogram,
  texts by source (rules, llm, rules after LLM failure; only when the markers record it), rejects by reason
  (Markdown tables);
- `stats.png`: the same as four plots (matplotlib's object API with the Agg canvas: no pyplot, no global backend).

Text length counts whitespace-separated words by default. With `tokenizer` (a tokenizer folder or Hub id, loaded
by `transformers.AutoTokenizer`) it counts the tokens the text tower sees, [CLS] and [SEP] included, and the
fraction of texts that `max_length` (120, the paper's) truncates is reported; words undercount word pieces.
Lengths are over rows (every image's text, as training sees them).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from configuration_pedclip import DEFAULT_BODY_PARTS
from pexr.reports import TEXT_SOURCES

SPLITS = ("train", "validation", "test")
MAX_LENGTH = 120
HISTOGRAM_BINS = 12
ROUND_WIDTHS = (1, 2, 5, *(int(w * 10**e) for e in range(1, 9) for w in (1, 2, 2.5, 5)))


@dataclass
class BuildStats:
    images: Counter = field(default_factory=Counter)  # (body part, split) -> images
    texts: dict[str, set] = field(default_factory=dict)  # body part -> its distinct texts
    lengths: list[int] = field(default_factory=list)  # text length of every row
    rejects: Counter = field(default_factory=Counter)  # reason -> rejected records
    text_sources: Counter = field(default_factory=Counter)  # rows per `SplitResult.source`
    unit: str = "words"  # "words" or "tokens"
    max_length: int = MAX_LENGTH

    @property
    def body_parts(self) -> list[str]:
        present = {part for part, _ in self.images}
        return [p for p in DEFAULT_BODY_PARTS if p in present] + sorted(present - set(DEFAULT_BODY_PARTS))

    @property
    def splits(self) -> list[str]:
        present = {split for _, split in self.images}
        return [s for s in SPLITS if s in present] + sorted(present - set(SPLITS))


def split_of_file(path: Path) -> str:
    return next((split for split in SPLITS if path.name.startswith(split)), "train")


def text_lengths(texts: list[str], tokenizer: str | None = None) -> list[int]:
    """Whitespace words per text, or tokenizer tokens (special tokens included) when `tokenizer` is given."""
    if tokenizer is None:
        return [len(text.split()) for text in texts]
    from transformers import AutoTokenizer

    encoded = AutoTokenizer.from_pretrained(tokenizer)(texts, add_special_tokens=True, truncation=False)
    return [len(ids) for ids in encoded["input_ids"]]


def collect_stats(output_dir: str | os.PathLike, tokenizer: str | None = None, max_length: int = MAX_LENGTH):
    """`BuildStats` of a build folder (see the module docstring)."""
    out = Path(output_dir)
    stats = BuildStats(unit="words" if tokenizer is None else "tokens", max_length=max_length)
    all_texts = []
    for path in sorted((out / "data").glob("*.parquet")):
        table = pq.read_table(path, columns=["text", "body_part"]).to_pydict()
        split = split_of_file(path)
        for text, part in zip(table["text"], table["body_part"]):
            stats.images[part, split] += 1
            stats.texts.setdefault(part, set()).add(text)
        all_texts += table["text"]
    stats.lengths = text_lengths(all_texts, tokenizer) if all_texts else []
    rejects = out / "rejects.jsonl"
    if rejects.exists():
        lines = rejects.read_text(encoding="utf-8").splitlines()
        stats.rejects.update(json.loads(line)["reason"] for line in lines if line.strip())
    for marker in sorted((out / "shards").glob("*.done.json")):
        stats.text_sources.update(json.loads(marker.read_text(encoding="utf-8")).get("text_sources", {}))
    return stats


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def histogram(lengths: list[int], max_length: int, bins: int = HISTOGRAM_BINS) -> tuple[np.ndarray, np.ndarray]:
    """Counts and integer edges of at most `bins` equal bins of a round width (1, 2, 5, 10, 20, 25, 50, ...)
    covering 0 to max(lengths, max_length)."""
    top = max(max(lengths, default=0), max_length) + 1
    width = next(w for w in ROUND_WIDTHS if w * bins >= top)
    edges = np.arange(0, width * int(np.ceil(top / width)) + 1, width)
    return np.histogram(lengths, bins=edges)[0], edges


def _body_part_table(stats: BuildStats) -> list[str]:
    splits = stats.splits
    rows = [[part, *(stats.images[part, s] for s in splits), sum(stats.images[part, s] for s in splits),
             len(stats.texts[part])] for part in stats.body_parts]  # fmt: skip
    totals = [sum(row[i] for row in rows) for i in range(1, len(splits) + 2)]
    distinct = len(set().union(*stats.texts.values())) if stats.texts else 0
    rows.append(["**total**", *totals, distinct])
    return _table(["body part", *splits, "images", "unique texts"], rows)


def _length_section(stats: BuildStats) -> list[str]:
    lengths = np.asarray(stats.lengths)
    if not len(lengths):
        return ["No texts."]
    over = int((lengths > stats.max_length).sum())
    lines = [
        f"{len(lengths)} texts, {stats.unit} per text: mean {lengths.mean():.1f}, median {np.median(lengths):g}, "
        f"95th percentile {np.percentile(lengths, 95):g}, max {lengths.max()}. Longer than max_length "
        f"{stats.max_length}: {over} ({over / len(lengths):.1%}).",
        "",
    ]
    counts, edges = histogram(stats.lengths, stats.max_length)
    rows = [[f"{edges[i]}-{edges[i + 1] - 1}", count] for i, count in enumerate(counts)]
    return lines + _table([stats.unit, "texts"], rows)


def _source_section(stats: BuildStats) -> list[str]:
    """Texts per source, known sources first; nothing when the build recorded none."""
    if not stats.text_sources:
        return []
    sources = stats.text_sources
    order = [s for s in TEXT_SOURCES if s in sources] + sorted(set(sources) - set(TEXT_SOURCES))
    return ["## Texts by source", "", *_table(["source", "texts"], [[s, sources[s]] for s in order]), ""]


def stats_markdown(stats: BuildStats) -> str:
    """The Markdown report of `stats`."""
    images = sum(stats.images.values())
    per_split = ", ".join(f"{s} {sum(n for (_, sp), n in stats.images.items() if sp == s)}" for s in stats.splits)
    lines = ["# PeXR build statistics", "",
             f"{images} images ({per_split or 'none'}); {sum(stats.rejects.values())} records rejected.", "",
             "## Images per body part and split", "", *_body_part_table(stats), "",
             f"## Text length ({stats.unit})", "", *_length_section(stats), "", *_source_section(stats),
             "## Rejected records by reason", ""]  # fmt: skip
    rejects = sorted(stats.rejects.items(), key=lambda item: (-item[1], item[0]))
    lines += _table(["reason", "records"], [list(item) for item in rejects]) if rejects else ["None."]
    return "\n".join(lines) + "\n"


def plot_stats(stats: BuildStats, path: str | os.PathLike) -> None:
    """Four panels: images per body part (stacked by split), unique texts per body part, the text length histogram
    with `max_length` marked, rejects by reason."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 9), layout="constrained")
    (images, texts), (lengths, rejects) = figure.subplots(2, 2)
    parts, left = stats.body_parts, np.zeros(len(stats.body_parts))
    for split in stats.splits:
        counts = np.array([stats.images[part, split] for part in parts])
        images.barh(parts, counts, left=left, label=split)
        left += counts
    images.set(title="Images per body part", xlabel="images")
    if stats.splits:
        images.legend()
    texts.barh(parts, [len(stats.texts[part]) for part in parts], color="tab:green")
    texts.set(title="Unique texts per body part", xlabel="texts")
    counts, edges = histogram(stats.lengths, stats.max_length, bins=30)
    lengths.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:gray")
    lengths.axvline(stats.max_length, color="tab:red", linestyle="--", label=f"max_length {stats.max_length}")
    lengths.set(title=f"Text length ({stats.unit})", xlabel=stats.unit, ylabel="texts")
    lengths.legend()
    reasons = sorted(stats.rejects, key=lambda reason: stats.rejects[reason])  # the most frequent on top
    rejects.barh(reasons, [stats.rejects[reason] for reason in reasons], color="tab:red")
    if not reasons:
        rejects.text(0.5, 0.5, "no rejected records", ha="center", va="center", transform=rejects.transAxes)
        rejects.set(xticks=[], yticks=[])
    rejects.set(title="Rejected records by reason", xlabel="records")
    for axes in (images, texts):
        axes.invert_yaxis()  # body parts top-down in vocabulary order
    figure.savefig(path, dpi=100)


def write_stats(output_dir: str | os.PathLike, tokenizer: str | None = None, max_length: int = MAX_LENGTH):
    """Write `stats.md` and `stats.png` into a build folder; returns the `BuildStats`."""
    out = Path(output_dir)
    stats = collect_stats(out, tokenizer, max_length)
    (out / "stats.md").write_text(stats_markdown(stats), encoding="utf-8")
    plot_stats(stats, out / "stats.png")
    return stats


__all__ = ["BuildStats", "collect_stats", "histogram", "plot_stats", "stats_markdown", "text_lengths", "write_stats"]
