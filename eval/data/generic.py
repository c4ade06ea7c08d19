"""A local data set in one of two generic layouts, in the eval columns; DICOM files are read with
`pexr.dicom.read_dicom` (see `eval.data.common` for the conversion).

    A. image folder (no `csv`):  root/[train|validation|val|test/]<label>/**/<image>
       -> `labels` = [the folder's name]; `label_names` = the folder names, sorted.
    B. CSV (`csv="file.csv"`, relative to root, or an absolute path): one row per image, with
       image_column (default "image")  image path, relative to the CSV's folder (or absolute)
       and, each only when its option names a column:
       label_columns=[...]     one 0/1 column per label     -> `labels` = the names of the columns that are 1
       label_column="finding"  label names joined by `label_separator` ("|")  -> `labels`
       target_column           a number                      -> `target` (float)
       sex_column              M/F, male/female, or a `male` 0/1 column  -> `sex` ("M"/"F")
       text_column             -> `text`;  mask_column: a mask image path -> `mask`
       body_part_column        -> `body_part` (else the `body_part` option, when given, for every row)
       concepts=[...]          0/1 columns kept as bool columns of the same names
       split_column ("split")  train/validation/val/test, used when the CSV has it
       patient_column          groups images for the seeded split

Splits: the split folders / split column when present, else a seeded split (`fractions`, default 0.7/0.1/0.2,
`seed` 0) by patient when `patient_column` is given, else by image. Every row also gets `image_id` (the image path
relative to root or to the CSV's folder). Other options: `dicom_mode`, `max_side`, `cache_dir`, `num_proc`.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import (
    DEFAULT_FRACTIONS, build, class_folder_items, flag, group_rows, number, read_table, require_file, require_root,
    seeded_split, sex_code, split_name,
)  # fmt: skip

NAME = "generic"
LAYOUT = """  A. root/[train|validation|val|test/]<label>/<image files>  (PNG/JPEG/DICOM)
  B. a CSV (csv=...) with an image path column and the columns named by the options"""
COLUMN_OPTIONS = (
    "image_column", "label_column", "label_columns", "label_separator", "target_column", "sex_column", "text_column",
    "mask_column", "body_part_column", "concepts", "split_column", "patient_column",
)  # fmt: skip


def _features(columns: set[str], concepts):
    from datasets import Features, Image, List, Value

    text = Value("string")
    kinds = {"image": Image(), "labels": List(text), "target": Value("float32"), "sex": text, "text": text,
             "mask": Image(), "body_part": text, "image_id": text}  # fmt: skip
    return Features({**{c: kind for c, kind in kinds.items() if c in columns}, **{c: Value("bool") for c in concepts}})


def _folder_rows(root: Path, body_part):
    items, splits = class_folder_items(root, NAME, LAYOUT)
    rows = [{"image": str(path), "labels": [label], "image_id": path.relative_to(root).as_posix(),
             **({"body_part": body_part} if body_part else {})} for path, label in items]  # fmt: skip
    return rows, splits, [row["image_id"] for row in rows]


def _csv_path(root: Path, csv: str) -> Path:
    path = Path(csv).expanduser()
    return require_file(path if path.is_absolute() else root / path, NAME, "the CSV named by csv=")


def _labels(record: dict, where, o: dict) -> list[str]:
    if o.get("label_columns"):
        return [c for c in o["label_columns"] if flag(record[c], *where(c), NAME)]
    separator = re.escape(o.get("label_separator", "|"))
    return [name.strip() for name in re.split(separator, str(record[o["label_column"]])) if name.strip()]


def _csv_row(base: Path, record: dict, row: int, csv_path: Path, o: dict) -> dict:
    """One CSV record in the eval columns (`o` = the column options)."""
    def where(column):
        return csv_path, column, row

    image_column = o.get("image_column", "image")
    image = Path(str(record[image_column]).strip())
    image = require_file(image if image.is_absolute() else base / image, NAME,
                         f"the image named in {csv_path}, data row {row + 1}, column {image_column!r}")  # fmt: skip
    out = {"image": str(image), "image_id": str(record[image_column]).strip()}
    if o.get("label_columns") or o.get("label_column"):
        out["labels"] = _labels(record, where, o)
    if o.get("target_column"):
        out["target"] = number(record[o["target_column"]], *where(o["target_column"]), NAME)
    if o.get("sex_column"):
        out["sex"] = sex_code(record[o["sex_column"]], *where(o["sex_column"]), NAME)
    if o.get("text_column"):
        out["text"] = str(record[o["text_column"]])
    if o.get("mask_column"):
        mask = base / str(record[o["mask_column"]]).strip()
        out["mask"] = str(require_file(mask, NAME, f"the mask named in {csv_path}, data row {row + 1}"))
    if o.get("body_part_column") or o.get("body_part"):
        out["body_part"] = str(record[o["body_part_column"]]).strip() if o.get("body_part_column") else o["body_part"]
    out.update({c: flag(record[c], *where(c), NAME) for c in o.get("concepts") or ()})
    return out


def _csv_rows(root: Path, csv: str, o: dict):
    csv_path = _csv_path(root, csv)
    named = [o.get(k) for k in COLUMN_OPTIONS if k.endswith("_column") and k != "split_column" and o.get(k)]
    required = [o.get("image_column", "image"), *named, *(o.get("label_columns") or ()), *(o.get("concepts") or ())]
    table = read_table(csv_path, NAME, required)
    split_column = o.get("split_column", "split")
    rows, splits, groups = [], [], []
    for row, record in enumerate(table.to_dict("records")):
        rows.append(_csv_row(csv_path.parent, record, row, csv_path, o))
        groups.append(str(record[o["patient_column"]]).strip() if o.get("patient_column") else rows[-1]["image_id"])
        if split_column in table.columns:
            splits.append(split_name(record[split_column], f"{csv_path}, data row {row + 1}, column "
                                                          f"{split_column!r}", NAME))  # fmt: skip
    return rows, (splits if split_column in table.columns else None), groups


def _rows(root: Path, csv, o: dict):
    return _csv_rows(root, csv, o) if csv else _folder_rows(root, o.get("body_part"))


def label_names(root=None, csv=None, **options) -> list[str]:
    """`label_columns` when given, else the labels found in the data at `root` (sorted)."""
    if options.get("label_columns"):
        return list(options["label_columns"])
    rows = _rows(require_root(root, NAME, LAYOUT), csv, options)[0]
    return sorted({label for row in rows for label in row.get("labels", ())})


def load(root=None, csv: str | None = None, fractions=DEFAULT_FRACTIONS, seed: int = 0, body_part: str | None = None,
         **options):  # fmt: skip
    columns = {k: options.pop(k) for k in list(options) if k in COLUMN_OPTIONS}
    if root is None and csv and Path(csv).is_absolute():
        root = Path(csv).parent
    root = require_root(root, NAME, LAYOUT)
    rows, splits, groups = _rows(root, csv, {**columns, "body_part": body_part})
    if not rows:
        raise ValueError(f"{NAME}: {_csv_path(root, csv)} has no data rows")
    if splits is None:
        splits = seeded_split(groups, fractions, seed)
    return build(group_rows(rows, splits), _features(set(rows[0]), columns.get("concepts") or ()), NAME, options)
