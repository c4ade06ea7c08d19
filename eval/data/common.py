"""What every data-set adapter shares: layout checks with clear errors, CSV reading, seeded group splits, DICOM to
PIL conversion and building a `datasets.DatasetDict` through `Dataset.from_generator`.

Errors: a missing file or folder raises `FileNotFoundError`, a malformed one (missing column, bad value, bad
annotation line) `ValueError`; both messages start with the set's name and say what was expected where.

Images. PNG/JPEG files are stored by path (decoded lazily by the `datasets.Image` feature). DICOM files are read
with `pedclip.images.dicom_image` (`pexr.dicom.read_dicom`: modality LUT, VOI window, MONOCHROME1 inverted: bone
bright), shrunk so that the longer side is at most `max_side` pixels (default 512, `None` keeps the full size) and
stored as PNG bytes, 8-bit grayscale (PIL mode "L", `dicom_mode="L"`, the default) or 16-bit (`dicom_mode="I;16"`).
The PedCLIP image processor reads both at full precision; 8 bits is the default because other models' preprocessing
(and the transformers zero-shot pipeline) call `image.convert("RGB")`, which clips 16-bit values at 255 (a white
image). The conversion runs once: the generator's arguments (file paths with their sizes and modification times,
and the options) key the `datasets` cache, so a second `load` reads the cached Arrow files, and a changed file
invalidates them. DICOM files are recognised as `pedclip.images.is_dicom` does: a .dcm/.dicom suffix, or, for any
other name that is not an image suffix (e.g. UID file names), the "DICM" magic at byte 128.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from pedclip.images import dicom_image, is_dicom, is_image_file

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


# ------------------------------------------------------------------------------------------------ layout checks


def require_root(root, set_name: str, layout: str) -> Path:
    """`root` as a Path; a missing or absent root raises FileNotFoundError quoting the expected `layout`."""
    if root is None:
        raise FileNotFoundError(f"{set_name}: pass root= (the folder of your local copy). Expected layout:\n{layout}")
    path = Path(root).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{set_name}: root folder {path} does not exist. Expected layout:\n{layout}")
    return path


def require_file(path: Path, set_name: str, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{set_name}: expected {what} at {path}, found none")
    return path


def read_table(path: Path, set_name: str, columns: Iterable[str] = ()):
    """A CSV as a pandas DataFrame (every column read as text); `columns` must all be present."""
    import pandas as pd

    require_file(path, set_name, "a CSV file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise ValueError(f"{set_name}: {path} is not a readable CSV file: {exc}") from exc
    table.columns = [str(column).strip() for column in table.columns]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{set_name}: {path} has no column {', '.join(map(repr, missing))} "
                         f"(its columns: {', '.join(map(repr, table.columns))})")  # fmt: skip
    return table


_TRUE, _FALSE = {"1", "1.0", "true", "yes", "y"}, {"0", "0.0", "false", "no", "n", ""}


def flag(value: str, path: Path, column: str, row: int, set_name: str) -> bool:
    """A 0/1 (or true/false) CSV cell as a bool; an empty cell is False; anything else raises ValueError."""
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ValueError(f"{set_name}: {path}, column {column!r}, data row {row + 1}: expected 0 or 1, got {value!r}")


def number(value: str, path: Path, column: str, row: int, set_name: str) -> float:
    try:
        result = float(str(value).strip())
    except ValueError:
        result = float("nan")
    if not np.isfinite(result):
        raise ValueError(f"{set_name}: {path}, column {column!r}, data row {row + 1}: expected a number, got {value!r}")
    return result


def sex_code(value: str, path: Path, column: str, row: int, set_name: str) -> str:
    """The sex as "M" or "F", from M/F/male/female, or from a `male` flag column (True/False, 1/0)."""
    text = str(value).strip().lower()
    if column.strip().lower() == "male":
        return "M" if flag(value, path, column, row, set_name) else "F"
    if text in ("m", "male"):
        return "M"
    if text in ("f", "female"):
        return "F"
    raise ValueError(f"{set_name}: {path}, column {column!r}, data row {row + 1}: expected M or F, got {value!r}")


def index_files(folders: Iterable[Path], suffixes: Sequence[str]) -> dict[str, Path]:
    """File stem -> path of every file with one of `suffixes` under `folders` (recursive, sorted: first wins)."""
    found: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.rglob("*")):
                if path.suffix.lower() in suffixes and path.is_file():
                    found.setdefault(path.stem, path)
    return found


SPLIT_ALIASES = {"train": "train", "validation": "validation", "val": "validation", "test": "test"}


def class_folder_items(root: Path, set_name: str, layout: str) -> tuple[list[tuple[Path, str]], list[str] | None]:
    """An image folder tree `root/[<split>/]<label>/**/<image>` (split folders train, validation or val, test;
    images: PNG/JPEG/TIFF/BMP and DICOM files, see `is_dicom`): ((image path, label) sorted per folder, the
    split of each or None when there are no split folders)."""
    split_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and d.name.lower() in SPLIT_ALIASES]
    tops = [(d, SPLIT_ALIASES[d.name.lower()]) for d in split_dirs] or [(root, None)]
    items, splits = [], []
    for top, split in tops:
        for label_dir in sorted(d for d in top.iterdir() if d.is_dir()):
            for path in sorted(p for p in label_dir.rglob("*") if p.is_file() and is_image_file(p)):
                items.append((path, label_dir.name))
                splits.append(split)
    if not items:
        raise FileNotFoundError(f"{set_name}: no images in class folders under {root}. Expected layout:\n{layout}")
    return items, (splits if split_dirs else None)


def split_name(value: str, where: str, set_name: str) -> str:
    """A split cell (train, validation, val, test; any case) as its split name."""
    split = str(value).strip().lower()
    if split not in SPLIT_ALIASES:
        raise ValueError(f"{set_name}: {where}: expected train, validation, val or test, got {value!r}")
    return SPLIT_ALIASES[split]


# ------------------------------------------------------------------------------------------------ splits


def seeded_split(groups: Sequence[str], fractions=DEFAULT_FRACTIONS, seed: int = 0) -> list[str]:
    """The split name ("train"/"validation"/"test") of each item: whole groups (patients, or the images themselves)
    go to one split. Groups are sorted, then shuffled with `np.random.default_rng(seed)`; the first
    round(fractions[0] * groups) go to train, the next round(fractions[1] * groups) to validation, the rest to test.
    """
    fractions = tuple(float(f) for f in fractions)
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions={fractions!r}: three non-negative numbers (train, validation, test) summing to 1")
    unique = sorted(set(groups))
    order = np.random.default_rng(seed).permutation(len(unique))
    train = int(round(fractions[0] * len(unique)))
    validation = min(int(round(fractions[1] * len(unique))), len(unique) - train)
    names = {}
    for rank, index in enumerate(order):
        names[unique[index]] = SPLITS[0] if rank < train else SPLITS[1] if rank < train + validation else SPLITS[2]
    return [names[group] for group in groups]


def group_rows(rows: Sequence[dict], splits: Sequence[str]) -> dict[str, list[dict]]:
    """Rows grouped by split name, in SPLITS order, empty splits dropped."""
    grouped = {name: [row for row, split in zip(rows, splits) if split == name] for name in SPLITS}
    return {name: split_rows for name, split_rows in grouped.items() if split_rows}


# ------------------------------------------------------------------------------------------------ images and masks


def png_bytes(image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def rasterise(shapes: Sequence[tuple[int, Sequence[float]]], size: tuple[int, int]):
    """A mode "L" mask of `size` (width, height): each (value, polygon) fills its polygon, given as normalised
    [x0, y0, x1, y1, ...] in [0, 1] image coordinates, with `value` (later shapes drawn over earlier ones)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    width, height = size
    for value, polygon in shapes:
        points = [(x * width, y * height) for x, y in zip(polygon[0::2], polygon[1::2])]
        draw.polygon(points, fill=int(value))
    return mask


def _image_value(path: str, dicom_mode: str, max_side):
    """(the value for the `image` feature, the stored image's (width, height) or None when not needed)."""
    from PIL import Image

    if is_dicom(Path(path)):
        image = dicom_image(path, dicom_mode, max_side)
        return png_bytes(image), image.size
    with Image.open(path) as image:  # reads the header only
        return {"path": path, "bytes": None}, image.size


def generate_examples(rows: list[dict], dicom_mode: str, max_side):
    """`Dataset.from_generator`'s generator: a row's `image` path becomes the image value; its private `_mask`
    shapes (see `rasterise`) become the `mask` image; other private keys (`_stamp`) only key the cache."""
    for row in rows:
        example = {key: value for key, value in row.items() if not key.startswith("_")}
        example["image"], size = _image_value(row["image"], dicom_mode, max_side)
        if "_mask" in row:
            example["mask"] = png_bytes(rasterise(row["_mask"], size))
        yield example


def stamp(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


def build(rows_by_split: dict[str, list[dict]], features, set_name: str, options: dict):
    """A DatasetDict from rows (dicts with an `image` path and the feature columns) per split (empty splits left
    out).

    `options` may hold `dicom_mode` ("L"), `max_side` (512), `cache_dir` (None: the datasets cache) and
    `num_proc` (None). Errors raised while reading a file reach the caller as themselves, prefixed by the set name.
    """
    from datasets import Dataset, DatasetDict
    from datasets.exceptions import DatasetGenerationError

    unknown = set(options) - {"dicom_mode", "max_side", "cache_dir", "num_proc"}
    if unknown:
        raise TypeError(f"{set_name}: unknown option(s) {', '.join(sorted(unknown))}")
    dicom_mode, max_side = options.get("dicom_mode", "L"), options.get("max_side", 512)
    splits = {}
    for name, rows in rows_by_split.items():
        if not rows:
            continue
        rows = [{**row, "_stamp": stamp(Path(row["image"]))} for row in rows]
        try:
            splits[name] = Dataset.from_generator(
                generate_examples, features=features, cache_dir=options.get("cache_dir"),
                gen_kwargs={"rows": rows, "dicom_mode": dicom_mode, "max_side": max_side},
                num_proc=options.get("num_proc"), split=name,
            )  # fmt: skip
        except DatasetGenerationError as exc:
            raise _reraised(exc.__cause__ or exc, set_name) from exc
    return DatasetDict(splits)


def _reraised(cause: BaseException, set_name: str) -> BaseException:
    """The error a generator raised, as a plain ValueError/FileNotFoundError/OSError prefixed by the set name."""
    for kind in (FileNotFoundError, ValueError, OSError):
        if isinstance(cause, kind):
            return kind(f"{set_name}: {cause}")
    return cause
