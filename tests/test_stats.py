"""pexr.stats: counts, text lengths (words or tokenizer tokens) and rejects of a build folder, as Markdown and PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pexr.build import features, png16, write_parquet
from pexr.stats import collect_stats, histogram, stats_markdown, write_stats

IMAGE = {"bytes": png16(np.zeros((4, 4))), "path": None}


def row(text: str, part: str) -> dict:
    return {"image": IMAGE, "text": text, "body_part": part, "study_id": "s", "patient_id": "p", "age_years": 5.0}


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "data").mkdir()
    schema = features().arrow_schema
    write_parquet([row("a b c", "hand"), row("a b c", "hand"), row("d " * 130, "chest")],
                  tmp_path / "data" / "train-00000-of-00002.parquet", schema)  # fmt: skip
    write_parquet([row("e f", "hand")], tmp_path / "data" / "test-00001-of-00002.parquet", schema)
    rejects = [{"reason": "missing file"}, {"reason": "no pixel data"}, {"reason": "missing file"}]
    (tmp_path / "rejects.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejects))
    return tmp_path


def test_counts_per_body_part_split_and_reason(folder):
    stats = collect_stats(folder)
    assert dict(stats.images) == {("hand", "train"): 2, ("chest", "train"): 1, ("hand", "test"): 1}
    assert {part: len(texts) for part, texts in stats.texts.items()} == {"hand": 2, "chest": 1}
    assert sorted(stats.lengths) == [2, 3, 3, 130] and stats.rejects == {"missing file": 2, "no pixel data": 1}
    markdown = stats_markdown(stats)
    assert "| chest | 1 | 0 | 1 | 1 |" in markdown and "| hand | 2 | 1 | 3 | 2 |" in markdown  # vocabulary order
    assert markdown.index("| chest |") < markdown.index("| hand |") and "| **total** | 3 | 1 | 4 | 3 |" in markdown
    assert "| missing file | 2 |" in markdown and "| no pixel data | 1 |" in markdown
    assert "Longer than max_length 120: 1 (25.0%)" in markdown and "4 images (train 3, test 1)" in markdown


def test_text_sources_come_from_the_shard_markers(folder):
    assert "Texts by source" not in stats_markdown(collect_stats(folder))  # no markers: the build's count unknown
    (folder / "shards").mkdir()
    markers = [{"text_sources": {"llm": 2, "rules after LLM failure": 1}}, {"text_sources": {"llm": 1, "rules": 1}}]
    for index, marker in enumerate(markers):
        (folder / "shards" / f"{index:05d}.done.json").write_text(json.dumps(marker))
    stats = collect_stats(folder)
    assert stats.text_sources == {"llm": 3, "rules": 1, "rules after LLM failure": 1}
    markdown = stats_markdown(stats)
    assert "| rules | 1 |\n| llm | 3 |\n| rules after LLM failure | 1 |" in markdown


def test_tokenizer_counts_tokens_with_special_tokens(folder):
    from pedclip_testing import minilm_path

    stats = collect_stats(folder, tokenizer=minilm_path(), max_length=4)
    assert sorted(stats.lengths) == [4, 5, 5, 132] and stats.unit == "tokens"
    assert "Longer than max_length 4: 3 (75.0%)" in stats_markdown(stats)


def test_write_stats_makes_markdown_and_a_png(folder):
    write_stats(folder)
    assert (folder / "stats.md").read_text().startswith("# PeXR build statistics")
    with Image.open(folder / "stats.png") as plot:
        assert plot.format == "PNG"
        plot.verify()


def test_empty_build_folder(tmp_path):
    write_stats(tmp_path)
    markdown = (tmp_path / "stats.md").read_text()
    assert "0 images (none); 0 records rejected." in markdown and "No texts." in markdown
    assert (tmp_path / "stats.png").exists()


def test_histogram_bins_are_round_and_cover_max_length():
    counts, edges = histogram([1, 5, 52], max_length=120)
    assert edges[1] - edges[0] in (10, 20) and edges[-1] > 120 and counts.sum() == 3
    counts, edges = histogram([400], max_length=120, bins=30)
    assert edges[-1] > 400 and counts.sum() == 1
