"""Training data: load a `datasets` dataset of (image, text, body_part) rows and batch it through the processor."""

import json
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

REQUIRED_COLUMNS = ("image", "text", "body_part")
DATA_FILE_SUFFIXES = {".parquet": "parquet", ".arrow": "arrow"}
PEXR_STATE_FILE = "build_state.json"  # pexr.build.STATE_FILE: its "complete" turns true when every shard is written


def load_training_dataset(source: str | None, pexr_mini_patients: int = 300, seed: int = 0) -> DatasetDict:
    """A `DatasetDict` with at least a "train" split, from: None (the embedded PeXR-mini set); a `save_to_disk`
    folder; a folder of parquet/arrow files (e.g. a `pexr build` output folder or its `data/`, refused while that
    build is unfinished); an imagefolder (images + metadata.csv/jsonl); or a Hub id."""
    if source is None:
        from pexr.synthetic import generate_pexr_mini

        return generate_pexr_mini(num_patients=pexr_mini_patients, seed=seed)
    path = Path(source)
    check_pexr_build(path)
    files = data_files(path) if path.is_dir() else None
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        data = load_from_disk(str(path))
    elif files:
        data = load_dataset(files[0], data_files=files[1])
    elif path.is_dir():
        data = load_dataset("imagefolder", data_dir=str(path))
    else:
        data = load_dataset(source)
    data = data if isinstance(data, DatasetDict) else DatasetDict({"train": data})
    check_columns(data, source)
    return data


def data_files(folder: Path) -> tuple[str, dict] | None:
    """(builder, {split: files}) for a folder of parquet or arrow files named by split (e.g. train-0000.parquet)."""
    for suffix, builder in DATA_FILE_SUFFIXES.items():
        files = sorted(str(f) for f in folder.rglob(f"*{suffix}"))
        if files:
            splits = {s: [f for f in files if Path(f).name.startswith(s)] for s in ("train", "validation", "test")}
            splits = {s: f for s, f in splits.items() if f} or {"train": files}
            return builder, splits
    return None


def check_pexr_build(path: Path) -> None:
    """Raise `ValueError` if `path` (or its parent, for a `data/` folder) holds an unfinished `pexr build`: its
    `build_state.json` not marked complete (interrupted, or stopped by --max_shards), so `data/` lacks shards."""
    for folder in (path, path.parent) if path.name == "data" else (path,):
        state_file = folder / PEXR_STATE_FILE
        if state_file.is_file() and not json.loads(state_file.read_text(encoding="utf-8")).get("complete"):
            raise ValueError(
                f"{folder}: the `pexr build` into this folder was interrupted before every shard was written, so its "
                "data is incomplete; rerun the same `pexr build` command (same inputs, options and salt) to finish it"
            )


def check_columns(data: DatasetDict, source: str) -> None:
    if "train" not in data:
        raise ValueError(f"{source}: no 'train' split (splits: {list(data)})")
    for split, dataset in data.items():
        missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
        if missing:
            raise ValueError(f"{source}: split {split!r} lacks columns {missing} (has {dataset.column_names})")


class EpochShuffleSampler(torch.utils.data.Sampler):
    """A new permutation each epoch, fixed by (seed, epoch): a resumed run sees exactly the same order."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        self.size, self.seed, self.shuffle, self.epoch = size, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class PedCLIPCollator:
    """Rows -> model inputs through `PedCLIPProcessor` (runs in the DataLoader workers)."""

    def __init__(self, processor, pad_to_max_length: bool = False):
        self.processor = processor
        self.padding = "max_length" if pad_to_max_length else "longest"

    def __call__(self, rows: list[dict]) -> dict:
        return dict(
            self.processor(
                images=[row["image"] for row in rows],
                text=[row["text"] for row in rows],
                body_parts=[row["body_part"] for row in rows],
                padding=self.padding,
                return_tensors="pt",
            )
        )


def make_dataloader(dataset: Dataset, collator, batch_size: int, seed: int, train: bool, num_workers: int = 0):
    """A DataLoader over `dataset` (only the columns the collator reads); training batches are shuffled per epoch
    and the last incomplete batch dropped (every process needs the same number of rows)."""
    dataset = dataset.select_columns(list(REQUIRED_COLUMNS))
    sampler = EpochShuffleSampler(len(dataset), seed, shuffle=train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collator, drop_last=train,
        num_workers=num_workers, persistent_workers=num_workers > 0,
    )  # fmt: skip
