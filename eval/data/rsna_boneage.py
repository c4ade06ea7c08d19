"""RSNA Pediatric Bone Age Challenge (2017): hand radiographs (PNG) with bone age in months and sex; official
training (12,611), validation (1,425) and test (200) sets (Halabi et al., "The RSNA Pediatric Bone Age Machine
Learning Challenge", Radiology 290(2):498-503, 2019, doi:10.1148/radiol.2018180736; data at
https://www.rsna.org/rsnai/ai-image-challenge/RSNA-Pediatric-Bone-Age-Challenge-2017, training set also on Kaggle
as kmader/rsna-bone-age). File and column names as in the RSNA/Kaggle downloads (as read by public loaders, e.g.
dataset-ninja/rsna-bone-age)::

    root/
      boneage-training-dataset.csv          id, boneage (months), male (True/False)
      boneage-training-dataset/[boneage-training-dataset/]<id>.png
      <...validation...>.csv                optional: Image ID, male, Bone Age (months)   (any CSV whose name
      <folder with "validation" in its name>/**/<Image ID>.png                             contains "validation")
      <...test...>.csv                      optional, needs ground truth: Case ID, Sex (M/F),
                                            Ground truth bone age (months)  (the RSNA "Bone age ground truth"
                                            sheet saved as CSV; Kaggle's boneage-test-dataset.csv has no ages)
      <folder with "test" in its name>/**/<Case ID>.png

Splits: the official ones present with labels; when validation or test is missing (e.g. a Kaggle copy), the
training CSV is split with `seed` (image level; the challenge has no patient ids) into the missing splits:
`fractions` (default 0.8/0.1/0.1) of training go to train/validation/test, the shares of splits that exist
officially being kept in train.

Columns: `image`, `target` (bone age, months, float), `sex` ("M"/"F"), `body_part` ("hand"), `image_id`.
Options: `fractions`, `seed`, `cache_dir`, `num_proc`.
"""

from __future__ import annotations

from pathlib import Path

from .common import build, index_files, number, read_table, require_root, seeded_split, sex_code

NAME = "rsna_boneage"
LAYOUT = """  root/boneage-training-dataset.csv (id, boneage, male) + root/boneage-training-dataset/**/<id>.png
  optional: a *validation*.csv (Image ID, male, Bone Age (months)) + a *validation* folder of <Image ID>.png,
            a *test*.csv (Case ID, Sex, Ground truth bone age (months)) + a *test* folder of <Case ID>.png"""
# split -> (id column, age column, sex column)
COLUMNS = {
    "train": ("id", "boneage", "male"),
    "validation": ("Image ID", "Bone Age (months)", "male"),
    "test": ("Case ID", "Ground truth bone age (months)", "Sex"),
}


def label_names(**_) -> list[str]:
    return []  # a regression set: `target` in months


def features():
    from datasets import Features, Image, Value

    text = Value("string")
    return Features({"image": Image(), "target": Value("float32"), "sex": text, "body_part": text, "image_id": text})


def _find(root: Path, split: str) -> tuple[Path | None, list[Path]]:
    """(the split's labelled CSV or None, the folders holding its images)."""
    if split == "train":
        return root / "boneage-training-dataset.csv", [root / "boneage-training-dataset"]
    key = split  # "validation" or "test"
    age_column = COLUMNS[split][1]
    csvs = [p for p in sorted(root.rglob("*.csv")) if key in p.name.lower()]
    labelled = [p for p in csvs if age_column in read_table(p, NAME).columns]
    folders = [d for d in sorted(root.rglob("*")) if d.is_dir() and key in d.name.lower()]
    return (labelled[0] if labelled else None), folders


def _rows(csv_path: Path, folders: list[Path], split: str) -> list[dict]:
    id_column, age_column, sex_column = COLUMNS[split]
    table = read_table(csv_path, NAME, COLUMNS[split])
    images = index_files(folders, (".png",))
    rows = []
    for row, record in enumerate(table.to_dict("records")):
        image_id = str(record[id_column]).strip()
        if image_id not in images:
            raise FileNotFoundError(f"{NAME}: {csv_path} data row {row + 1} lists {id_column} {image_id!r}, but no "
                                    f"{image_id}.png exists under {', '.join(map(str, folders))}")  # fmt: skip
        rows.append({
            "image": str(images[image_id]), "target": number(record[age_column], csv_path, age_column, row, NAME),
            "sex": sex_code(record[sex_column], csv_path, sex_column, row, NAME), "body_part": "hand",
            "image_id": image_id,
        })  # fmt: skip
    return sorted(rows, key=lambda r: r["image_id"])


def load(root=None, fractions=(0.8, 0.1, 0.1), seed: int = 0, **options):
    root = require_root(root, NAME, LAYOUT)
    rows = {}
    for split in ("train", "validation", "test"):
        csv_path, folders = _find(root, split)
        if csv_path is not None and (split != "train" or csv_path.is_file()):
            rows[split] = _rows(csv_path, folders, split)
    if "train" not in rows:
        raise FileNotFoundError(f"{NAME}: expected the training labels at {root / 'boneage-training-dataset.csv'}, "
                                f"found none. Expected layout:\n{LAYOUT}")  # fmt: skip
    missing = [s for s in ("validation", "test") if s not in rows]
    if missing:
        shares = [fractions[0]] + [fractions[1] if "validation" in missing else 0.0,
                                   fractions[2] if "test" in missing else 0.0]  # fmt: skip
        shares[0] = 1.0 - sum(shares[1:])
        splits = seeded_split([r["image_id"] for r in rows["train"]], shares, seed)
        train = rows.pop("train")
        for name in ("train", *missing):
            rows[name] = [r for r, s in zip(train, splits) if s == name]
    return build({s: rows[s] for s in ("train", "validation", "test") if rows.get(s)}, features(), NAME, options)
