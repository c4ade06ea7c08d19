"""CHD-CXR: 828 pediatric chest X-rays (DICOM) of children with congenital heart disease, with cardiac ultrasound
reports (Li et al., "CHD-CXR: a de-identified publicly available dataset of chest x-ray for congenital heart
disease", Front. Cardiovasc. Med. 11:1351965, 2024, doi:10.3389/fcvm.2024.1351965; data on the Kaggle competition
https://www.kaggle.com/competitions/congenital-heart-disease).

NO OFFICIAL LAYOUT FOUND: neither the article's text reachable here nor any public loader documents the released
files' folder/CSV layout or label names. This adapter therefore accepts the two layouts below and takes the label
names from the data. `LABEL_NAMES` (ASD, VSD, PDA, Normal: atrial/ventricular septal defect, patent ductus
arteriosus, no CHD) is only the default candidate list `label_names("chd_cxr")` returns without a root, the class
set used by public CHD-CXR evaluation code on GitHub; it is not verified against the release.

Accepted layouts (DICOM .dcm/.dicom or PNG/JPEG images)::

    A. class folders, optionally under split folders (train/, validation/ or val/, test/):
       root/[<split>/]<label>/<image file>           e.g. root/ASD/0001.dcm, root/test/Normal/0420.png
    B. a CSV:
       root/labels.csv    image (path relative to root), label (one or more names joined by "|" or ";"),
                          optional split (train/validation/val/test), optional patient_id

Splits: the split folders or `split` column when present; otherwise a seeded split (`fractions`, default
0.7/0.1/0.2, `seed` 0) by `patient_id` when the CSV has it, else by image.

Columns: `image`, `labels`, `body_part` ("chest"), `image_id` (the path relative to root). Options: `fractions`,
`seed`, `csv` (another CSV file name under root), `dicom_mode`, `max_side`, `cache_dir`, `num_proc`.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import (
    DEFAULT_FRACTIONS, build, class_folder_items, group_rows, read_table, require_file, require_root, seeded_split,
    split_name,
)  # fmt: skip

NAME = "chd_cxr"
LABEL_NAMES = ("ASD", "VSD", "PDA", "Normal")
LAYOUT = """  A. root/[train|validation|val|test/]<label>/<image>.dcm|.dicom|.png|.jpg  (one folder per class)
  B. root/labels.csv with columns image (path relative to root), label ("|" or ";" joins several),
     optional split, optional patient_id"""


def features():
    from datasets import Features, Image, List, Value

    return Features({"image": Image(), "labels": List(Value("string")), "body_part": Value("string"),
                     "image_id": Value("string")})  # fmt: skip


def label_names(root=None, **options) -> list[str]:
    """The labels found in the copy at `root` (sorted), or the default candidates `LABEL_NAMES` without a root."""
    if root is None:
        return list(LABEL_NAMES)
    rows = _rows(require_root(root, NAME, LAYOUT), options.get("csv"))[0]
    return sorted({label for row in rows for label in row["labels"]})


def _row(root: Path, path: Path, labels: list[str]) -> dict:
    return {"image": str(path), "labels": labels, "body_part": "chest", "image_id": path.relative_to(root).as_posix()}


def _folder_rows(root: Path) -> tuple[list[dict], list[str] | None]:
    """Layout A: (rows, split of each row or None when there are no split folders)."""
    items, splits = class_folder_items(root, NAME, LAYOUT)
    return [_row(root, path, [label]) for path, label in items], splits


def _csv_rows(root: Path, csv_path: Path) -> tuple[list[dict], list[str] | None, list[str]]:
    """Layout B: (rows, split of each row or None, the group of each row for a seeded split)."""
    table = read_table(csv_path, NAME, ["image", "label"])
    rows, splits, groups = [], [], []
    for index, record in enumerate(table.to_dict("records")):
        where = f"{csv_path}, data row {index + 1}"
        path = require_file(root / str(record["image"]).strip(), NAME, f"the image named in {where} (column 'image')")
        labels = [name.strip() for name in re.split(r"[|;]", str(record["label"])) if name.strip()]
        if not labels:
            raise ValueError(f"{NAME}: {where}, column 'label': empty label")
        rows.append(_row(root, path, labels))
        groups.append(str(record.get("patient_id", "")).strip() or rows[-1]["image_id"])
        if "split" in table.columns:
            splits.append(split_name(record["split"], f"{where}, column 'split'", NAME))
    return rows, (splits if "split" in table.columns else None), groups


def _rows(root: Path, csv: str | None) -> tuple[list[dict], list[str] | None, list[str]]:
    """(rows, split of each row or None, group of each row) from the CSV when there is one, else the folders."""
    csv_path = root / (csv or "labels.csv")
    if csv is not None or csv_path.is_file():
        return _csv_rows(root, csv_path)
    rows, splits = _folder_rows(root)
    return rows, splits, [row["image_id"] for row in rows]


def load(root=None, fractions=DEFAULT_FRACTIONS, seed: int = 0, csv: str | None = None, **options):
    root = require_root(root, NAME, LAYOUT)
    rows, splits, groups = _rows(root, csv)
    if splits is None:
        splits = seeded_split(groups, fractions, seed)
    return build(group_rows(rows, splits), features(), NAME, options)

