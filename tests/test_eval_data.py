"""Tests of the data-set adapters (`eval.data`): each on a tiny fake copy written here in its documented layout,
then missing and malformed copies, which must fail naming the path and column."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dicom_testing import ramp, write_dicom
from PIL import Image

from eval import data
from eval.data import grazpedwri, pedi_cxr
from eval.data.common import seeded_split


def _png(path: Path, size=(20, 16), value=128, mode="L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if mode == "I;16" else np.uint8
    Image.fromarray(np.full(size[::-1], value, dtype)).save(path)
    return path


def _csv(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(",".join(map(str, r)) for r in [header, *rows]) + "\n")
    return path


@pytest.fixture
def options(tmp_path) -> dict:
    return {"cache_dir": str(tmp_path / "hf_cache")}


# ------------------------------------------------------------------------------------------------ Pedi-CXR


def write_pedi_cxr(root: Path, train_ids=("a1", "a2", "a3", "a4"), test_ids=("t1", "t2")) -> Path:
    header = ["image_id", "rad_ID", *pedi_cxr.LABEL_NAMES]
    for split, ids in (("train", train_ids), ("test", test_ids)):
        rows = []
        for k, image_id in enumerate(ids):
            flags = [0] * len(pedi_cxr.LABEL_NAMES)
            flags[k % 3] = 1  # No finding, Bronchitis, Brocho-pneumonia in turn
            rows.append([image_id, "R1", *flags])
            write_dicom(root / split / f"{image_id}.dicom", ramp(40, 30), BodyPartExamined="CHEST")
        _csv(root / f"image_labels_{split}.csv", header, rows)
    return root


def test_pedi_cxr_reads_official_layout(tmp_path, options):
    root = write_pedi_cxr(tmp_path / "vindr-pcxr")
    splits = data.load("pedi_cxr", root, max_side=16, validation_fraction=0.25, dicom_mode="I;16", **options)
    assert set(splits) == {"train", "validation", "test"}
    assert len(splits["train"]) == 3 and len(splits["validation"]) == 1 and len(splits["test"]) == 2
    test = splits["test"]
    assert list(test["image_id"]) == ["t1", "t2"]
    assert list(test["labels"]) == [["No finding"], ["Bronchitis"]]
    assert set(test["body_part"]) == {"chest"}
    image = test[0]["image"]
    assert image.mode == "I;16" and max(image.size) == 16 and image.size == (12, 16)  # 30x40 shrunk, aspect kept
    assert data.label_names("pedi_cxr") == list(pedi_cxr.LABEL_NAMES) and len(pedi_cxr.LABEL_NAMES) == 15


def test_pedi_cxr_options_and_8bit(tmp_path, options):
    root = write_pedi_cxr(tmp_path / "vindr-pcxr")
    splits = data.load("pedi_cxr", root, validation_fraction=0, include_no_finding=False, **options)  # 8-bit default
    assert set(splits) == {"train", "test"} and len(splits["train"]) == 4
    assert list(splits["test"]["labels"]) == [[], ["Bronchitis"]]
    assert splits["test"][0]["image"].mode == "L" and splits["test"][0]["image"].size == (30, 40)
    assert "No finding" not in data.label_names("pedi_cxr", include_no_finding=False)


def test_pedi_cxr_missing_and_malformed(tmp_path, options):
    with pytest.raises(FileNotFoundError, match="root folder .* does not exist"):
        data.load("pedi_cxr", tmp_path / "nowhere")
    root = write_pedi_cxr(tmp_path / "vindr-pcxr")
    (root / "test" / "t2.dicom").unlink()
    with pytest.raises(FileNotFoundError, match=r"image_labels_test\.csv data row 2 .*'t2'.*t2\.dicom"):
        data.load("pedi_cxr", root, **options)
    csv = root / "image_labels_train.csv"
    csv.write_text(csv.read_text().replace("Pneumonia,", "Pneumonitis,", 1))
    with pytest.raises(ValueError, match=r"image_labels_train\.csv has no column 'Pneumonia'"):
        data.load("pedi_cxr", root, **options)
    csv.write_text(csv.read_text().replace("Pneumonitis,", "Pneumonia,").replace(",R1,1,", ",R1,yes please,", 1))
    with pytest.raises(ValueError, match=r"image_labels_train\.csv, column 'No finding', data row 1: expected 0 or 1"):
        data.load("pedi_cxr", root, **options)


def test_pedi_cxr_unreadable_dicom_names_file(tmp_path, options):
    root = write_pedi_cxr(tmp_path / "vindr-pcxr")
    (root / "train" / "a1.dicom").write_bytes(b"not a dicom at all")
    with pytest.raises(ValueError, match=r"pedi_cxr: .*a1\.dicom"):
        data.load("pedi_cxr", root, **options)


# ------------------------------------------------------------------------------------------------ CHD-CXR


def test_chd_cxr_class_folders_seeded_split(tmp_path, options):
    root = tmp_path / "chd"
    for label in ("ASD", "Normal"):
        for k in range(5):
            _png(root / label / f"{label}{k}.png")
    write_dicom(root / "VSD" / "v0.dcm", ramp(24, 20))
    splits = data.load("chd_cxr", root, seed=1, **options)
    rows = [row for split in splits.values() for row in split.select_columns(["labels", "image_id"])]
    assert len(rows) == 11 and {r["labels"][0] for r in rows} == {"ASD", "Normal", "VSD"}
    assert sum(len(s) for s in splits.values()) == 11 and set(splits) == {"train", "validation", "test"}
    assert data.label_names("chd_cxr", root) == ["ASD", "Normal", "VSD"]
    assert data.label_names("chd_cxr") == ["ASD", "VSD", "PDA", "Normal"]
    again = data.load("chd_cxr", root, seed=1, **options)
    assert list(again["test"]["image_id"]) == list(splits["test"]["image_id"])


def test_chd_cxr_csv_with_splits(tmp_path, options):
    root = tmp_path / "chd"
    for name in ("a.png", "b.png", "c.png"):
        _png(root / "img" / name)
    _csv(root / "labels.csv", ["image", "label", "split"],
         [["img/a.png", "ASD|PDA", "train"], ["img/b.png", "Normal", "val"], ["img/c.png", "VSD", "test"]])
    splits = data.load("chd_cxr", root, **options)
    assert list(splits["train"]["labels"]) == [["ASD", "PDA"]] and list(splits["validation"]["labels"]) == [["Normal"]]
    (root / "img" / "c.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"labels\.csv, data row 3 \(column 'image'\)"):
        data.load("chd_cxr", root, **options)
    _csv(root / "labels.csv", ["image", "diagnosis"], [["img/a.png", "ASD"]])
    with pytest.raises(ValueError, match=r"labels\.csv has no column 'label'"):
        data.load("chd_cxr", root, **options)


def test_chd_cxr_empty_root(tmp_path):
    (tmp_path / "chd").mkdir()
    with pytest.raises(FileNotFoundError, match="no images in class folders"):
        data.load("chd_cxr", tmp_path / "chd")


# ------------------------------------------------------------------------------------------------ GRAZPEDWRI-DX


GRAZ_HEADER = ["filestem", "patient_id", "gender", "age", "fracture_visible", "metal"]


def write_grazpedwri(root: Path, patients=6) -> Path:
    rows = []
    for p in range(patients):
        for view in (1, 2):
            stem = f"{p:04d}_0{view}_WRI-L{view}_M010"
            _png(root / f"images_part{1 + p % 2}" / f"{stem}.png", size=(40, 20), mode="I;16", value=3000)
            lines = ["8 0.1 0.1 0.1 0.1"]  # text marker
            if p % 2 == 0:
                lines.append("3 0.5 0.5 0.5 0.5")  # fracture box: x 10-30, y 5-15
            if p == 1:
                lines.append("5 0.25 0.25 0.75 0.25 0.75 0.75 0.25 0.75")  # periosteal reaction polygon
            (root / grazpedwri.LABEL_DIR).mkdir(parents=True, exist_ok=True)
            (root / grazpedwri.LABEL_DIR / f"{stem}.txt").write_text("\n".join(lines) + "\n")
            rows.append([stem, p, "M", 10, int(p % 2 == 0), 0])
    _csv(root / "dataset.csv", GRAZ_HEADER, rows)
    return root


def test_grazpedwri_labels_masks_patient_split(tmp_path, options):
    root = write_grazpedwri(tmp_path / "graz")
    splits = data.load("grazpedwri_dx", root, with_masks=True, **options)
    all_rows = [row for split in splits.values() for row in split]
    assert len(all_rows) == 12
    patients = {name: set(split["patient_id"]) for name, split in splits.items()}
    assert not (patients["train"] & patients["test"]) and not (patients["train"] & patients.get("validation", set()))
    by_id = {row["image_id"]: row for row in all_rows}
    fractured, periosteal = by_id["0000_01_WRI-L1_M010"], by_id["0001_01_WRI-L1_M010"]
    assert fractured["labels"] == ["fracture"] and periosteal["labels"] == ["periostealreaction"]
    assert fractured["body_part"] == "wrist" and fractured["image"].size == (40, 20)
    mask = np.asarray(fractured["mask"])
    assert fractured["mask"].mode == "L" and mask.shape == (20, 40) and set(np.unique(mask)) == {0, 1}
    assert mask[10, 20] == 1 and mask[2, 2] == 0 and mask[10, 35] == 0  # the fracture box only, not the text box
    assert np.asarray(periosteal["mask"]).max() == 0  # not a mask class
    assert data.label_names("grazpedwri_dx") == list(grazpedwri.LABEL_NAMES) and "text" not in grazpedwri.LABEL_NAMES


def test_grazpedwri_fracture_visible_and_mask_classes(tmp_path, options):
    root = write_grazpedwri(tmp_path / "graz")
    splits = data.load("grazpedwri_dx", root, label_source="fracture_visible", with_masks=True,
                       mask_classes=("fracture", "periostealreaction"), **options)
    rows = {row["image_id"]: row for split in splits.values() for row in split}
    assert rows["0000_02_WRI-L2_M010"]["labels"] == ["fracture"]
    assert rows["0001_02_WRI-L2_M010"]["labels"] == ["no fracture"]
    assert np.asarray(rows["0001_01_WRI-L1_M010"]["mask"])[10, 20] == 2  # second mask class
    assert np.asarray(rows["0000_01_WRI-L1_M010"]["mask"])[10, 20] == 1


def test_grazpedwri_malformed(tmp_path, options):
    root = write_grazpedwri(tmp_path / "graz")
    label = root / grazpedwri.LABEL_DIR / "0002_01_WRI-L1_M010.txt"
    label.write_text("3 0.5 0.5\n")
    with pytest.raises(ValueError, match=r"0002_01_WRI-L1_M010\.txt, line 1: expected 'class cx cy w h'"):
        data.load("grazpedwri_dx", root, **options)
    label.write_text("12 0.5 0.5 0.1 0.1\n")
    with pytest.raises(ValueError, match="line 1: class id 12 outside 0-8"):
        data.load("grazpedwri_dx", root, **options)
    label.unlink()
    with pytest.raises(FileNotFoundError, match=r"YOLO labels of 0002_01_WRI-L1_M010 at .*yolov5/labels"):
        data.load("grazpedwri_dx", root, **options)
    _csv(root / "dataset.csv", ["filestem", "gender"], [["x", "M"]])
    with pytest.raises(ValueError, match=r"dataset\.csv has no column 'patient_id'"):
        data.load("grazpedwri_dx", root, **options)


# ------------------------------------------------------------------------------------------------ RSNA Bone Age


def write_boneage(root: Path, n=10, validation=True, test=True) -> Path:
    train = [[1000 + i, 12 * i + 6, ["True", "False"][i % 2]] for i in range(n)]
    for row in train:
        _png(root / "boneage-training-dataset" / "boneage-training-dataset" / f"{row[0]}.png")
    _csv(root / "boneage-training-dataset.csv", ["id", "boneage", "male"], train)
    if validation:
        _png(root / "Bone Age Validation Set" / "boneage-validation-dataset-1" / "2001.png")
        _csv(root / "Bone Age Validation Set" / "Validation Dataset.csv", ["Image ID", "male", "Bone Age (months)"],
             [[2001, "FALSE", 99]])
    if test:
        _png(root / "boneage-test-dataset" / "4360.png")
        _csv(root / "boneage-test-dataset.csv", ["Case ID", "Sex"], [[4360, "M"]])  # Kaggle's: no ages
        if test == "truth":
            _csv(root / "Bone age ground truth test.csv", ["Case ID", "Sex", "Ground truth bone age (months)"],
                 [[4360, "M", 150.5]])
    return root


def test_rsna_boneage_official_splits(tmp_path, options):
    root = write_boneage(tmp_path / "boneage", test="truth")
    splits = data.load("rsna_boneage", root, **options)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "validation": 1, "test": 1}
    assert splits["test"][0]["target"] == pytest.approx(150.5) and splits["test"][0]["sex"] == "M"
    assert splits["validation"][0]["sex"] == "F" and splits["validation"][0]["target"] == 99
    train = {row["image_id"]: row for row in splits["train"].select_columns(["image_id", "target", "sex"])}
    assert train["1003"] == {"image_id": "1003", "target": 42.0, "sex": "F"}
    assert set(splits["train"]["body_part"]) == {"hand"} and data.label_names("rsna_boneage") == []


def test_rsna_boneage_kaggle_copy_splits_training(tmp_path, options):
    root = write_boneage(tmp_path / "boneage", n=20, validation=False, test=True)  # test csv without ages
    splits = data.load("rsna_boneage", root, **options)
    assert {k: len(v) for k, v in splits.items()} == {"train": 16, "validation": 2, "test": 2}
    ids = [set(s["image_id"]) for s in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and "4360" not in set().union(*ids)


def test_rsna_boneage_malformed(tmp_path, options):
    root = write_boneage(tmp_path / "boneage", validation=False, test=False)
    csv = root / "boneage-training-dataset.csv"
    csv.write_text(csv.read_text().replace(",30,", ",thirty,"))
    with pytest.raises(ValueError, match=r"dataset\.csv, column 'boneage', data row 3: expected a number"):
        data.load("rsna_boneage", root, **options)
    csv.unlink()
    with pytest.raises(FileNotFoundError, match=r"training labels at .*boneage-training-dataset\.csv"):
        data.load("rsna_boneage", root, **options)


# ------------------------------------------------------------------------------------------------ generic


def test_generic_imagefolder_with_dicom(tmp_path, options):
    root = tmp_path / "folder"
    for split, count in (("train", 3), ("test", 2)):
        for label in ("fracture", "normal"):
            for k in range(count):
                _png(root / split / label / f"{k}.png")
    write_dicom(root / "test" / "fracture" / "1.2.840.5", ramp(30, 20))  # UID-named DICOM, found by its magic
    (root / "test" / "normal" / "notes.txt").write_text("not an image")
    splits = data.load("generic", root, body_part="wrist", **options)
    assert {k: len(v) for k, v in splits.items()} == {"train": 6, "test": 5}
    assert sorted(set(map(tuple, splits["test"]["labels"]))) == [("fracture",), ("normal",)]
    assert set(splits["test"]["body_part"]) == {"wrist"}
    assert data.label_names("generic", root) == ["fracture", "normal"]


def test_generic_csv_columns(tmp_path, options):
    root = tmp_path / "csvset"
    rows = []
    for k in range(8):
        _png(root / "img" / f"{k}.png")
        _png(root / "masks" / f"{k}.png", value=1)
        rows.append([f"img/{k}.png", f"masks/{k}.png", k % 2, (k + 1) % 2, 10.5 + k, "MF"[k % 2], f"text {k}",
                     f"p{k // 2}", ["knee", "hip"][k % 2], k % 3 == 0])
    header = ["path", "mask", "effusion", "normal", "age", "sex", "report", "patient", "part", "erosion"]
    _csv(root / "table.csv", header, rows)
    splits = data.load("generic", root, csv="table.csv", image_column="path", label_columns=["effusion", "normal"],
                       target_column="age", sex_column="sex", text_column="report", mask_column="mask",
                       patient_column="patient", body_part_column="part", concepts=["erosion"], seed=3, **options)
    row = next(r for split in splits.values() for r in split if r["image_id"] == "img/1.png")
    assert row["labels"] == ["effusion"] and row["target"] == pytest.approx(11.5) and row["sex"] == "F"
    assert row["text"] == "text 1" and row["body_part"] == "hip" and row["erosion"] is False
    assert row["mask"].mode == "L" and np.asarray(row["mask"]).max() == 1
    groups = [{int(image_id[4]) // 2 for image_id in split["image_id"]} for split in splits.values()]
    assert sum(len(g) for g in groups) == 4  # each of the 4 patients in one split only
    with pytest.raises(ValueError, match=r"table\.csv has no column 'years'"):
        data.load("generic", root, csv="table.csv", image_column="path", target_column="years", **options)


# ------------------------------------------------------------------------------------------------ PeXR-mini and API


def test_pexr_mini_columns():
    splits = data.load("pexr_mini", num_patients=6, image_size=32)
    train = splits["train"]
    assert {"image", "labels", "body_part", "text", "findings"} <= set(train.column_names)
    for findings, labels in zip(train["findings"], train["labels"]):
        assert labels == (list(findings) or ["normal"])
    names = data.label_names("pexr_mini")
    assert "fracture" in names and "normal" not in names and names == sorted(names)


def test_registry_and_unknown_names(tmp_path):
    assert set(data.SETS) == {"pedi_cxr", "chd_cxr", "grazpedwri_dx", "rsna_boneage", "generic", "pexr_mini"}
    with pytest.raises(KeyError, match="unknown data set 'vindr'"):
        data.load("vindr", tmp_path)
    with pytest.raises(FileNotFoundError, match="pass root="):
        data.load("pedi_cxr")


def test_seeded_split_is_group_level_and_deterministic():
    groups = [f"p{i // 3}" for i in range(60)]
    splits = seeded_split(groups, (0.7, 0.1, 0.2), seed=5)
    assert splits == seeded_split(list(groups), (0.7, 0.1, 0.2), seed=5)
    for g in set(groups):
        assert len({s for s, gg in zip(splits, groups) if gg == g}) == 1
    assert [splits.count(name) // 3 for name in ("train", "validation", "test")] == [14, 2, 4]
    with pytest.raises(ValueError, match="summing to 1"):
        seeded_split(groups, (0.5, 0.1, 0.1))
