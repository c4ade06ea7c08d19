"""Pedi-CXR (VinDr-PCXR, PhysioNet `vindr-pcxr` 1.0.0): 9,125 pediatric chest X-rays (DICOM), image-level labels
for 15 diagnoses, official train (7,728) / test (1,397) split.

Sources: the PhysioNet page https://physionet.org/content/vindr-pcxr/1.0.0/ and the data descriptor (Pham et al.,
"PediCXR: An open, large-scale chest radiograph dataset for interpretation of common thoracic diseases in children",
Scientific Data 10, 240, 2023, doi:10.1038/s41597-023-02102-5) give the split sizes and the 15 diagnoses. The
PhysioNet file listing was not readable here: the file and column names below are those that public loaders on
GitHub read from the release (e.g. the RadHarmony VinDr-PCXR harmoniser), verbatim, typos ("Brocho-pneumonia",
"Diagphramatic hernia") included.

Expected layout (the PhysioNet download, unchanged)::

    root/
      image_labels_train.csv     image_id, rad_ID, then one 0/1 column per label (LABEL_NAMES, names verbatim)
      image_labels_test.csv      same columns
      annotations_train.csv      (optional, not read) lesion boxes: image_id, rad_id, class_name, x_min, ...
      annotations_test.csv       (optional, not read)
      train/<image_id>.dicom     DICOM files (.dicom; .dcm is accepted too)
      test/<image_id>.dicom

Labels: `labels` = the names of the label columns that are 1 ("No finding" included: it is one of the 15 official
columns). An image listed on several rows (several readers) gets the union of its rows' labels. The paper's
"14 findings" are the 15 columns without "No finding": pass `include_no_finding=False`.

Splits: the official train and test; `validation_fraction` (default 0.1) of the official train images, drawn with
`seed` (image level: the release has no patient identifiers), form "validation" (0 keeps train whole).

Columns: `image` (an 8-bit PNG from the DICOM, 16-bit with dicom_mode="I;16": see `eval.data.common`),
`labels`, `body_part` ("chest"), `image_id`. Options: `include_no_finding`, `validation_fraction`, `seed`,
`dicom_mode`, `max_side`, `cache_dir`, `num_proc`.
"""

from __future__ import annotations

from pathlib import Path

from .common import build, read_table, require_root, seeded_split, flag

NAME = "pedi_cxr"
LABEL_NAMES = (
    "No finding", "Bronchitis", "Brocho-pneumonia", "Other disease", "Bronchiolitis", "Situs inversus", "Pneumonia",
    "Pleuro-pneumonia", "Diagphramatic hernia", "Tuberculosis", "Congenital emphysema", "CPAM",
    "Hyaline membrane disease", "Mediastinal tumor", "Lung tumor",
)  # fmt: skip
LAYOUT = """  root/image_labels_train.csv, root/image_labels_test.csv (image_id, rad_ID, 15 label columns)
  root/train/<image_id>.dicom, root/test/<image_id>.dicom"""


def label_names(include_no_finding: bool = True, **_) -> list[str]:
    return [name for name in LABEL_NAMES if include_no_finding or name != "No finding"]


def features():
    from datasets import Features, Image, List, Value

    return Features({"image": Image(), "labels": List(Value("string")), "body_part": Value("string"),
                     "image_id": Value("string")})  # fmt: skip


def _dicom_path(folder: Path, image_id: str, csv_path: Path, row: int) -> str:
    for suffix in (".dicom", ".dcm"):
        if (folder / f"{image_id}{suffix}").is_file():
            return str(folder / f"{image_id}{suffix}")
    raise FileNotFoundError(f"{NAME}: {csv_path} data row {row + 1} lists image_id {image_id!r}, but neither "
                            f"{folder / (image_id + '.dicom')} nor {folder / (image_id + '.dcm')} exists")  # fmt: skip


def _split_rows(root: Path, split: str, names: list[str]) -> list[dict]:
    """One row per image of an official split, labels united over its CSV rows, sorted by image_id."""
    csv_path = root / f"image_labels_{split}.csv"
    table = read_table(csv_path, NAME, ["image_id", *LABEL_NAMES])
    labels: dict[str, set[str]] = {}
    paths: dict[str, str] = {}
    for row, record in enumerate(table.to_dict("records")):
        image_id = str(record["image_id"]).strip()
        if not image_id:
            raise ValueError(f"{NAME}: {csv_path}, column 'image_id', data row {row + 1}: empty image_id")
        positives = {name for name in names if flag(record[name], csv_path, name, row, NAME)}
        labels.setdefault(image_id, set()).update(positives)
        paths.setdefault(image_id, _dicom_path(root / split, image_id, csv_path, row))
    return [
        {"image": paths[i], "labels": [n for n in names if n in labels[i]], "body_part": "chest", "image_id": i}
        for i in sorted(labels)
    ]


def load(root=None, include_no_finding: bool = True, validation_fraction: float = 0.1, seed: int = 0, **options):
    root = require_root(root, NAME, LAYOUT)
    names = label_names(include_no_finding)
    train, test = _split_rows(root, "train", names), _split_rows(root, "test", names)
    rows = {"train": train, "test": test}
    if validation_fraction > 0:
        fractions = (1 - validation_fraction, validation_fraction, 0)
        splits = seeded_split([row["image_id"] for row in train], fractions, seed)
        rows = {"train": [r for r, s in zip(train, splits) if s == "train"],
                "validation": [r for r, s in zip(train, splits) if s == "validation"], "test": test}  # fmt: skip
    return build(rows, features(), NAME, options)
