"""GRAZPEDWRI-DX: 20,327 pediatric wrist trauma X-rays (PNG) from 6,091 patients with object annotations (Nagy et
al., "A pediatric wrist trauma X-ray dataset (GRAZPEDWRI-DX) for machine learning", Scientific Data 9, 222, 2022,
doi:10.1038/s41597-022-01328-z; figshare, doi:10.6084/m9.figshare.14825193).

Layout as published on figshare (the image archives unzipped next to dataset.csv and folder_structure.zip), as
read by public GRAZPEDWRI-DX loaders on GitHub::

    root/
      dataset.csv                      filestem, patient_id, study_number, timehash, gender, age, laterality,
                                       projection, initial_exam, ao_classification, cast, diagnosis_uncertain,
                                       osteopenia, fracture_visible, metal, pixel_spacing, device_manufacturer
      images_part1/ ... images_part4/  <filestem>.png (any folder under root whose name starts with "images")
      folder_structure/yolov5/labels/<filestem>.txt
                                       one object per line: "class cx cy w h" (normalised box) or
                                       "class x1 y1 x2 y2 ..." (normalised polygon); classes by id (CLASS_NAMES)

Classification (`labels`): `label_source="yolo"` (default) = the names of the classes annotated on the image,
among `LABEL_NAMES` (all YOLO classes but "text", the burned-in lettering); `label_source="fracture_visible"` =
["fracture"] when dataset.csv's fracture_visible is 1, else ["no fracture"] (single label).

Segmentation (`with_masks=True`): `mask` (mode "L", the image's size) rasterises the boxes/polygons of
`mask_classes` (default ("fracture",)): 0 background, 1 for a single class, else the class's 1-based position in
`mask_classes` (later lines drawn over earlier ones).

Splits: no official split exists; a seeded patient-level split (`fractions`, default 0.7/0.1/0.2, `seed` 0) over
dataset.csv's patient_id. Columns: `image`, `labels`, `body_part` ("wrist"), `image_id` (filestem),
`patient_id`, [`mask`]. Options: `label_source`, `with_masks`, `mask_classes`, `fractions`, `seed`, `max_side`
(DICOM only: unused here), `cache_dir`, `num_proc`.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    DEFAULT_FRACTIONS, build, flag, group_rows, index_files, read_table, require_file, require_root, seeded_split,
)  # fmt: skip

NAME = "grazpedwri_dx"
CLASS_NAMES = ("boneanomaly", "bonelesion", "foreignbody", "fracture", "metal", "periostealreaction",
               "pronatorsign", "softtissue", "text")  # YOLO class ids 0-8  # fmt: skip
LABEL_NAMES = tuple(name for name in CLASS_NAMES if name != "text")
LABEL_DIR = Path("folder_structure", "yolov5", "labels")
LAYOUT = """  root/dataset.csv (filestem, patient_id, fracture_visible, ...)
  root/images_part1..4/<filestem>.png (or root/images/)
  root/folder_structure/yolov5/labels/<filestem>.txt (YOLO: class cx cy w h, normalised)"""


def label_names(label_source: str = "yolo", **_) -> list[str]:
    return list(LABEL_NAMES) if label_source == "yolo" else ["fracture", "no fracture"]


def features(with_masks: bool):
    from datasets import Features, Image, List, Value

    text = Value("string")
    columns = {"image": Image(), "labels": List(text), "body_part": text, "image_id": text, "patient_id": text}
    return Features({**columns, **({"mask": Image()} if with_masks else {})})


def read_yolo(path: Path) -> list[tuple[str, list[float]]]:
    """(class name, normalised polygon [x0, y0, ...]) per line of a YOLO label file; a box becomes its 4 corners."""
    objects = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        try:
            class_id, values = int(fields[0]), [float(v) for v in fields[1:]]
        except ValueError:
            raise ValueError(f"{NAME}: {path}, line {number}: expected numbers, got {line!r}") from None
        if not 0 <= class_id < len(CLASS_NAMES):
            raise ValueError(f"{NAME}: {path}, line {number}: class id {class_id} outside 0-{len(CLASS_NAMES) - 1}")
        if len(values) == 4:
            cx, cy, w, h = values
            values = [cx - w / 2, cy - h / 2, cx + w / 2, cy - h / 2, cx + w / 2, cy + h / 2, cx - w / 2, cy + h / 2]
        elif len(values) < 6 or len(values) % 2:
            raise ValueError(f"{NAME}: {path}, line {number}: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 "
                             f"...' (normalised), got {len(values)} numbers")  # fmt: skip
        objects.append((CLASS_NAMES[class_id], values))
    return objects


def _labels(objects, record: dict, csv_path: Path, row: int, label_source: str) -> list[str]:
    if label_source == "fracture_visible":
        visible = flag(record["fracture_visible"], csv_path, "fracture_visible", row, NAME)
        return ["fracture" if visible else "no fracture"]
    present = {name for name, _ in objects}
    return [name for name in LABEL_NAMES if name in present]


def _rows(root: Path, label_source: str, with_masks: bool, mask_classes) -> list[dict]:
    csv_path = root / "dataset.csv"
    table = read_table(csv_path, NAME, ["filestem", "patient_id"] + ["fracture_visible"] * (label_source != "yolo"))
    images = index_files([d for d in root.iterdir() if d.is_dir() and d.name.startswith("images")], (".png",))
    rows = []
    for row, record in enumerate(table.to_dict("records")):
        stem = str(record["filestem"]).strip()
        if stem not in images:
            raise FileNotFoundError(f"{NAME}: {csv_path} data row {row + 1} lists filestem {stem!r}, but no "
                                    f"{stem}.png exists in {root}/images*/")  # fmt: skip
        label_file = require_file(root / LABEL_DIR / f"{stem}.txt", NAME, f"the YOLO labels of {stem}")
        objects = read_yolo(label_file)
        entry = {"image": str(images[stem]), "labels": _labels(objects, record, csv_path, row, label_source),
                 "body_part": "wrist", "image_id": stem, "patient_id": str(record["patient_id"]).strip()}  # fmt: skip
        if with_masks:
            values = {name: i + 1 if len(mask_classes) > 1 else 1 for i, name in enumerate(mask_classes)}
            entry["_mask"] = [(values[name], polygon) for name, polygon in objects if name in values]
        rows.append(entry)
    return rows


def load(root=None, label_source: str = "yolo", with_masks: bool = False, mask_classes=("fracture",),
         fractions=DEFAULT_FRACTIONS, seed: int = 0, **options):  # fmt: skip
    if label_source not in ("yolo", "fracture_visible"):
        raise ValueError(f"{NAME}: label_source={label_source!r}; expected 'yolo' or 'fracture_visible'")
    unknown = [name for name in mask_classes if name not in CLASS_NAMES]
    if unknown:
        raise ValueError(f"{NAME}: mask_classes {unknown} not among the YOLO classes {list(CLASS_NAMES)}")
    root = require_root(root, NAME, LAYOUT)
    rows = _rows(root, label_source, with_masks, tuple(mask_classes))
    splits = seeded_split([row["patient_id"] for row in rows], fractions, seed)
    return build(group_rows(rows, splits), features(with_masks), NAME, options)
