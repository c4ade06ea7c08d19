"""pedclip.data: every supported dataset layout loads with the required columns; bad layouts are named."""

import json

import numpy as np
import pytest
from datasets import Dataset
from datasets import Image as ImageFeature
from PIL import Image

from pedclip.data import EpochShuffleSampler, load_training_dataset


def write_images(folder, count=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (20, 16), dtype=np.uint8)).save(folder / f"img{i}.png")
        names.append(f"img{i}.png")
    return names


def test_imagefolder_with_metadata(tmp_path):
    names = write_images(tmp_path / "train")
    rows = "\n".join(f"{n},wrist film {i},wrist" for i, n in enumerate(names))
    (tmp_path / "train" / "metadata.csv").write_text("file_name,text,body_part\n" + rows + "\n")
    data = load_training_dataset(str(tmp_path))
    assert len(data["train"]) == 6 and data["train"][0]["image"].size == (16, 20)
    assert data["train"][2]["text"] == "wrist film 2"


def test_parquet_files_by_split(tmp_path):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)) for _ in range(4)]
    for split in ("train", "validation"):
        rows = Dataset.from_dict({"image": images, "text": ["a", "b", "c", "d"], "body_part": ["hand"] * 4})
        rows.cast_column("image", ImageFeature()).to_parquet(str(tmp_path / f"{split}-00000.parquet"))
    data = load_training_dataset(str(tmp_path))
    assert set(data) == {"train", "validation"} and data["validation"][3]["text"] == "d"


def test_unfinished_pexr_build_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    rows = Dataset.from_dict({"image": [Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8))] * 2,
                              "text": ["a", "b"], "body_part": ["hand"] * 2})  # fmt: skip
    (tmp_path / "data").mkdir()
    rows.cast_column("image", ImageFeature()).to_parquet(str(tmp_path / "data" / "train-00000-of-00002.parquet"))
    state = tmp_path / "build_state.json"
    state.write_text(json.dumps({"salt": "s", "complete": False}))
    for folder in (tmp_path, tmp_path / "data"):
        with pytest.raises(ValueError, match="interrupted.*rerun the same `pexr build`"):
            load_training_dataset(str(folder))
    state.write_text(json.dumps({"salt": "s", "complete": True}))
    assert len(load_training_dataset(str(tmp_path / "data"))["train"]) == 2


def test_missing_columns_are_named(tmp_path):
    Dataset.from_dict({"image": [Image.new("L", (4, 4))], "caption": ["x"]}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"lacks columns \['text', 'body_part'\]"):
        load_training_dataset(str(tmp_path / "d"))


def test_epoch_order_is_fixed_by_seed_and_epoch():
    sampler = EpochShuffleSampler(50, seed=3)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    assert sorted(first) == list(range(50)) and first != second
    sampler.set_epoch(0)
    assert list(sampler) == first and list(EpochShuffleSampler(50, seed=4)) != first
