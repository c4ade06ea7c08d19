"""Tests for pexr.synthetic: the PeXR-mini generator (determinism, patient-level splits, schema, report/text
consistency, body parts and findings that can be seen in the pixels)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import re
import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from configuration_pedclip import DEFAULT_BODY_PARTS
from pexr.synthetic import (
    BODY_PART_SYNONYMS,
    FINDINGS_BY_BODY_PART,
    RENDERED_BODY_PARTS,
    SPLITS,
    body_parts_mentioned,
    generate_pexr_mini,
    render_xray,
)

NUM_PATIENTS = 300
IMAGE_SIZE = 128


def sentences(text: str) -> list[str]:
    """Split report text into sentences (the generator's sentences end with '.' and hold no other '. ')."""
    return [s for s in re.split(r"(?<=\.)\s+", text.strip()) if s]


def downsample(image: np.ndarray, factor: int) -> np.ndarray:
    size = image.shape[0] // factor
    return image[: size * factor, : size * factor].reshape(size, factor, size, factor).mean(axis=(1, 3))


@pytest.fixture(scope="module")
def pexr():
    start = time.perf_counter()
    dataset = generate_pexr_mini(num_patients=NUM_PATIENTS, seed=0, image_size=IMAGE_SIZE)
    seconds = time.perf_counter() - start
    images = sum(len(split) for split in dataset.values())
    print(f"\nPeXR-mini: {NUM_PATIENTS} patients, {images} images in {seconds:.2f} s ({images / seconds:.0f} images/s)")
    return dataset


@pytest.fixture(scope="module")
def rows(pexr):
    """All rows without images, with their split name."""
    out = []
    for name in SPLITS:
        for row in pexr[name].remove_columns("image"):
            out.append({**row, "split": name})
    return out


@pytest.fixture(scope="module")
def studies(rows):
    grouped = defaultdict(list)
    for row in rows:
        grouped[row["study_id"]].append(row)
    return grouped


# ------------------------------------------------------------------------------------------------ vocabulary


def test_vocabulary_uses_the_config_body_parts():
    assert len(RENDERED_BODY_PARTS) >= 6
    assert set(RENDERED_BODY_PARTS) <= set(DEFAULT_BODY_PARTS)
    assert set(FINDINGS_BY_BODY_PART) == set(BODY_PART_SYNONYMS) == set(RENDERED_BODY_PARTS)
    for part, findings in FINDINGS_BY_BODY_PART.items():
        assert findings and all(name == name.lower() for name in findings)
        assert body_parts_mentioned(f"Normal {part}.") == {part}  # a part's own name is one of its synonyms
    assert body_parts_mentioned("Buckle fracture of the distal radius.") == {"wrist"}
    assert body_parts_mentioned("Fracture of the fifth metacarpal.") == {"hand"}  # "metacarpal" is not "carpal"


def test_render_xray_checks_its_arguments():
    with pytest.raises(ValueError):
        render_xray("abdomen")
    with pytest.raises(ValueError):
        render_xray("chest", ["fracture"])
    with pytest.raises(ValueError):
        generate_pexr_mini(num_patients=4, split_fractions=(0.5, 0.2, 0.2))


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_dataset_other_seed_differs():
    first = generate_pexr_mini(num_patients=6, seed=3, image_size=48)
    again = generate_pexr_mini(num_patients=6, seed=3, image_size=48)
    other = generate_pexr_mini(num_patients=6, seed=4, image_size=48)
    for name in SPLITS:
        assert first[name].data.table.equals(again[name].data.table)  # text columns and PNG bytes alike
        for a, b in zip(first[name]["image"], again[name]["image"]):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    reports = lambda dataset: [r for name in SPLITS for r in dataset[name]["report"]]  # noqa: E731
    assert reports(first) != reports(other)
    pixels = lambda dataset: [np.asarray(i) for i in dataset["train"]["image"]]  # noqa: E731
    assert any(a.shape != b.shape or (a != b).any() for a, b in zip(pixels(first), pixels(other)))


def test_render_xray_is_deterministic_and_findings_keep_the_anatomy():
    base = render_xray("knee", seed=5)
    np.testing.assert_array_equal(base, render_xray("knee", seed=5))
    assert (base != render_xray("knee", seed=6)).mean() > 0.3
    effusion = render_xray("knee", ["joint effusion"], seed=5)
    changed = np.abs(effusion.astype(int) - base.astype(int)) > 10
    assert 0.005 < changed.mean() < 0.5  # the finding changes a region, not the whole image


# ------------------------------------------------------------------------------------------------ splits and schema


def test_patient_level_split(rows):
    patients = {name: {row["patient_id"] for row in rows if row["split"] == name} for name in SPLITS}
    assert not patients["train"] & patients["validation"]
    assert not patients["train"] & patients["test"]
    assert not patients["validation"] & patients["test"]
    assert sum(len(p) for p in patients.values()) == NUM_PATIENTS
    for name, fraction in zip(SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(patients[name]) / NUM_PATIENTS - fraction) < 0.02


def test_schema_and_values(pexr, rows, studies):
    for name in SPLITS:
        assert {"image", "text", "body_part", "findings", "report", "study_id", "patient_id", "age_years"} <= set(
            pexr[name].column_names
        )
    image = pexr["validation"][0]["image"]
    assert image.mode == "L" and image.size == (IMAGE_SIZE, IMAGE_SIZE)
    for row in rows:
        assert row["body_part"] in DEFAULT_BODY_PARTS and row["body_part"] in RENDERED_BODY_PARTS
        assert set(row["findings"]) <= set(FINDINGS_BY_BODY_PART[row["body_part"]])
        assert isinstance(row["age_years"], float) and 0.0 <= row["age_years"] <= 17.0
        assert isinstance(row["patient_id"], str) and row["study_id"].startswith(row["patient_id"])
    for study in studies.values():
        assert len({row["report"] for row in study}) == 1  # one report per study
        assert len({row["body_part"] for row in study}) == len(study)  # one image per imaged part
    studies_of = defaultdict(set)
    for row in rows:
        studies_of[row["patient_id"]].add(row["study_id"])
    per_patient = Counter(len(ids) for ids in studies_of.values())
    assert set(per_patient) <= {1, 2, 3} and len(per_patient) >= 2


def test_body_part_frequencies(rows):
    train = Counter(row["body_part"] for row in rows if row["split"] == "train")
    assert all(train[part] >= 40 for part in RENDERED_BODY_PARTS), train
    assert train.most_common(1)[0][0] in ("chest", "wrist")
    normal = np.mean([not row["findings"] for row in rows])
    assert 0.35 <= normal <= 0.6
    assert any(len(row["findings"]) == 2 for row in rows)


# ------------------------------------------------------------------------------------------------ reports and texts


def test_text_is_the_part_sentences_of_the_report(rows, studies):
    for row in rows:
        history = sentences(row["history"])
        text = sentences(row["text"])
        assert history and text
        assert all(h in row["report"] for h in history)
        study_parts = [r["body_part"] for r in studies[row["study_id"]]]
        for sentence in text:
            assert sentence in row["report"]
            assert sentence not in history
            assert body_parts_mentioned(sentence, study_parts) == {row["body_part"]}, (sentence, study_parts)
        for finding in row["findings"]:
            assert finding in row["text"].lower(), (finding, row["text"])


def test_report_sentences_split_back_into_parts(studies):
    """Every findings/impression sentence of a report belongs to exactly one imaged part's text."""
    multi_part = 0
    for study in studies.values():
        multi_part += len(study) >= 2
        report = study[0]["report"]
        body = report
        for h in sentences(study[0]["history"]):
            body = body.replace(h, " ")
        texts = [sentences(row["text"]) for row in study]
        owned = [s for text in texts for s in text]
        assert len(owned) == len(set(owned))
        for chunk in sentences(body):
            chunk = re.sub(r"^(FINDINGS|IMPRESSION|Findings|Impression):\s*", "", chunk.strip())
            if body_parts_mentioned(chunk):
                assert chunk in owned, (chunk, report)
    assert multi_part >= 50


# ------------------------------------------------------------------------------------------------ pixels


def test_body_parts_are_distinguishable(pexr):
    """A nearest-class-mean classifier on 16 x 16 thumbnails separates the body parts on held-out patients."""

    def features(split):
        images = np.stack([downsample(np.asarray(img, dtype=float), IMAGE_SIZE // 16) for img in split["image"]])
        images = images.reshape(len(images), -1)
        return (images - images.mean(1, keepdims=True)) / (images.std(1, keepdims=True) + 1e-6)

    train_x, train_y = features(pexr["train"]), np.array(pexr["train"]["body_part"])
    held = [pexr["validation"], pexr["test"]]
    test_x = np.concatenate([features(split) for split in held])
    test_y = np.concatenate([split["body_part"] for split in held])
    means = np.stack([train_x[train_y == part].mean(0) for part in RENDERED_BODY_PARTS])
    distances = ((test_x[:, None, :] - means[None]) ** 2).sum(-1)
    accuracy = (np.array(RENDERED_BODY_PARTS)[distances.argmin(1)] == test_y).mean()
    print(f"\nnearest-class-mean body-part accuracy: {accuracy:.3f} on {len(test_y)} held-out images")
    assert accuracy >= 0.9


@pytest.mark.parametrize("part", RENDERED_BODY_PARTS)
def test_findings_are_visible_at_64_pixels(part):
    """With the same seed, adding a finding changes a visible patch of the image (after downsampling to 64 px)."""
    for finding in FINDINGS_BY_BODY_PART[part]:
        for seed in range(3):
            normal = downsample(render_xray(part, seed=seed, image_size=128).astype(float), 2)
            abnormal = downsample(render_xray(part, [finding], seed=seed, image_size=128).astype(float), 2)
            difference = np.abs(abnormal - normal)
            assert difference.max() >= 30, (part, finding, seed, difference.max())
            assert (difference >= 20).sum() >= 6, (part, finding, seed, (difference >= 20).sum())


@pytest.mark.parametrize(
    ("part", "finding"), [("chest", "cardiomegaly"), ("knee", "joint effusion"), ("forearm", "periosteal reaction")]
)
def test_findings_are_learnable_from_pixels(part, finding):
    """Logistic regression on 32 x 32 pixels tells unpaired abnormal from normal images well above chance."""
    from sklearn.linear_model import LogisticRegression

    x, y = [], []
    for i in range(160):
        image = render_xray(part, [finding] if i % 2 else [], seed=1000 + i, image_size=64, age_years=1 + i % 16)
        x.append(downsample(image.astype(float), 2).reshape(-1) / 255.0)
        y.append(i % 2)
    x, y = np.array(x), np.array(y)
    model = LogisticRegression(C=0.1, max_iter=500).fit(x[:120], y[:120])
    assert model.score(x[120:], y[120:]) >= 0.75
