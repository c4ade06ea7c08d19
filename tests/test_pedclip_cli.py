"""The `pedclip` command: `predict` against transformers' zero-shot pipeline, `embed` against the model's own
features, image reading (8/16-bit, TIFF, DICOM, EXIF orientation), unreadable files and usage errors."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from dicom_testing import ramp, write_dicom
from eval_testing import PEXR_BODY_PARTS, one_thread, pedclip_folder  # noqa: F401  (fixtures)
from PIL import Image
from pydicom.data import get_testdata_file
from transformers import pipeline
from transformers.image_utils import load_image as transformers_load_image

from pedclip import PedCLIPModel, PedCLIPProcessor
from pedclip.cli import main
from pedclip.images import find_images, load_image
from pedclip.predict import read_prompts_file
from pexr.dicom import read_dicom

LABELS = ["normal", "pneumonia", "fracture"]
TEMPLATE = "an x-ray showing {label}"
EIGHT_BIT = ["gray.png", "sub/photo.jpg", "sub/rotated.jpg", "sub/deeper/palette.png"]
UNREADABLE = {"broken.png": "OSError", "garbage.dcm": "DicomError"}


def _pattern(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth [0, 1] image with detail (never constant)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    noise = np.random.default_rng(seed).random((height, width))
    return np.clip(0.5 + 0.3 * np.sin(7 * x + 3 * y + seed) + 0.2 * noise - 0.1, 0, 1)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """A folder mixing 8-bit PNG/JPEG (one colour, one EXIF-rotated, one palette PNG), 16-bit PNG/TIFF (with an 8-bit twin), a
    pydicom-data CR film, a suffix-less DICOM, a nested subfolder, two unreadable files and files to ignore."""
    root = tmp_path_factory.mktemp("cli_images")
    (root / "sub" / "deeper").mkdir(parents=True)
    gray = (_pattern(40, 30, 0) * 255).astype(np.uint8)
    Image.fromarray(gray).save(root / "gray.png")
    colour = np.stack([_pattern(36, 28, seed) for seed in (1, 4, 5)], axis=-1)  # e.g. a tinted photo of a film
    Image.fromarray((colour * 255).astype(np.uint8)).save(root / "sub" / "photo.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray((_pattern(24, 40, 2) * 255).astype(np.uint8)).convert("RGB").save(
        root / "sub" / "rotated.jpg", exif=exif
    )
    Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "sub" / "deeper" / "palette.png")
    deep = (_pattern(48, 32, 3) * 65535).astype(np.uint16)
    Image.fromarray(deep).save(root / "deep16.png")
    Image.fromarray(deep).save(root / "deep16.tif")
    Image.fromarray((deep / 257.0).round().astype(np.uint8)).save(root / "deep8.png")
    film = get_testdata_file("RG3_UNCR.dcm", download=False)
    os.symlink(film, root / "film.dcm")
    film16 = (np.asarray(read_dicom(film).image) * 65535.0 + 0.5).astype(np.uint16)
    Image.fromarray(film16).save(root / "film_as_png.png")
    write_dicom(root / "sub" / "1.2.826.0.1.3680043", ramp(24, 20), BodyPartExamined="HAND")
    (root / "broken.png").write_bytes((root / "gray.png").read_bytes()[:80])
    (root / "garbage.dcm").write_bytes(b"\0" * 200 + b"not a dicom file")
    (root / "notes.txt").write_text("not an image")
    Image.fromarray(gray).save(root / ".hidden.png")
    return root


@pytest.fixture(scope="module")
def classifier(pedclip_folder):
    return pipeline("zero-shot-image-classification", model=str(pedclip_folder), trust_remote_code=True)


@pytest.fixture(scope="module")
def model(pedclip_folder) -> tuple[PedCLIPModel, PedCLIPProcessor]:
    return PedCLIPModel.from_pretrained(pedclip_folder).eval(), PedCLIPProcessor.from_pretrained(pedclip_folder)


def pipeline_scores(classifier, path: Path, labels=LABELS, template: str = TEMPLATE) -> list[float]:
    result = classifier(str(path), candidate_labels=labels, hypothesis_template=template.replace("{label}", "{}"))
    scores = {item["label"]: item["score"] for item in result}
    return [scores[label] for label in labels]


def run(*args) -> int:
    return main([str(arg) for arg in args])


@pytest.fixture(scope="module")
def predicted(pedclip_folder, images, tmp_path_factory) -> dict[str, dict]:
    """`pedclip predict` over the whole folder (batches of 3) as CSV: rows by path relative to the folder."""
    out = tmp_path_factory.mktemp("cli_out") / "predictions.csv"
    args = ["predict", "--model", pedclip_folder, "--labels", ",".join(LABELS), "--template", TEMPLATE]
    assert run(*args, "--batch_size", 3, images, "--out", out) == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    return {str(Path(row["file"]).relative_to(images)): row for row in rows}


def probabilities(row: dict, labels=LABELS) -> np.ndarray:
    return np.asarray([float(row[label]) for label in labels])


def test_finds_every_image_and_dicom_recursively(images):
    found = {str(path.relative_to(images)) for path in find_images([images])}
    expected = {*EIGHT_BIT, "deep16.png", "deep16.tif", "deep8.png", "film.dcm", "film_as_png.png",
                "sub/1.2.826.0.1.3680043", *UNREADABLE}  # fmt: skip
    assert found == expected
    assert find_images([images / "notes.txt"]) == [images / "notes.txt"]  # a file named is always tried


def test_load_image_keeps_gray_and_bit_depth(images):
    assert load_image(images / "gray.png").mode == "L"
    assert load_image(images / "deep16.png").mode == "I;16" and load_image(images / "deep16.tif").mode == "I;16"
    assert np.array_equal(np.asarray(load_image(images / "deep16.tif")), np.asarray(load_image(images / "deep16.png")))
    assert load_image(images / "sub/deeper/palette.png").mode == "RGB"
    assert load_image(images / "sub/rotated.jpg").size == (24, 40)  # EXIF orientation applied: was 40 x 24
    film = load_image(images / "film.dcm")
    assert film.mode == "I;16" and np.array_equal(np.asarray(film), np.asarray(Image.open(images / "film_as_png.png")))


def test_8_bit_files_read_as_the_pipeline_reads_them(images, classifier, model):
    """Same `pixel_values` as the pipeline's reading (EXIF orientation, RGB conversion) for every 8-bit file."""
    for name in EIGHT_BIT:
        theirs = classifier.image_processor(images=[transformers_load_image(str(images / name))])["pixel_values"]
        np.testing.assert_array_equal(model[1].image_processor(load_image(images / name))["pixel_values"], theirs)


def test_predict_equals_the_zero_shot_pipeline(predicted, images, classifier):
    for name in EIGHT_BIT:
        ours = probabilities(predicted[name])
        assert predicted[name]["error"] == ""
        np.testing.assert_allclose(ours, pipeline_scores(classifier, images / name), rtol=0, atol=1e-5)
    # the check can fail: another prompt gives other scores
    other = pipeline_scores(classifier, images / "gray.png", template="{label}")
    assert np.abs(probabilities(predicted["gray.png"]) - other).max() > 1e-4


def test_predict_reads_16_bit_and_dicom(predicted):
    read = {name: row for name, row in predicted.items() if name not in UNREADABLE}
    assert len(read) == 10
    for row in read.values():
        np.testing.assert_allclose(probabilities(row).sum(), 1.0, atol=1e-5)
        assert row["body_part"] in PEXR_BODY_PARTS
        assert 1 / len(PEXR_BODY_PARTS) <= float(row["body_part_probability"]) <= 1
    np.testing.assert_allclose(probabilities(read["deep16.tif"]), probabilities(read["deep16.png"]), atol=1e-6)
    np.testing.assert_allclose(probabilities(read["deep16.png"]), probabilities(read["deep8.png"]), atol=2e-5)
    assert np.abs(probabilities(read["deep16.png"]) - probabilities(read["gray.png"])).max() > 1e-4  # can fail
    np.testing.assert_allclose(probabilities(read["film.dcm"]), probabilities(read["film_as_png.png"]), atol=1e-5)


def test_unreadable_files_are_reported_and_skipped(predicted, images, capsys, pedclip_folder, tmp_path):
    for name, kind in UNREADABLE.items():
        assert predicted[name]["error"].startswith(kind) and predicted[name]["normal"] == ""
    out = tmp_path / "none.json"
    unreadable = [images / name for name in UNREADABLE]
    assert run("predict", "--model", pedclip_folder, "--labels", "a,b", *unreadable, "--out", out) == 1
    err = capsys.readouterr().err
    assert f"skipped {images / 'broken.png'}: OSError" in err and "none of the 2 files could be read" in err
    assert [row["error"] is not None for row in json.loads(out.read_text())] == [True, True]


def test_predict_json_body_part_prompts(pedclip_folder, images, classifier, tmp_path):
    """`{body_part}` is the gate's body part: the same as the pipeline given that body part in its template."""
    out = tmp_path / "by_part.json"
    files = [images / "gray.png", images / "sub/photo.jpg"]
    args = ["--labels", "normal,fracture", "--template", "{label} of the {body_part}", "--body_part_prompts"]
    assert run("predict", "--model", pedclip_folder, *args, *files, "--out", out) == 0
    rows = json.loads(out.read_text())
    assert [Path(row["file"]) for row in rows] == files and all(row["error"] is None for row in rows)
    for row, path in zip(rows, files):
        template = "{label} of the " + row["body_part"].replace("_", " ")
        expected = pipeline_scores(classifier, path, ["normal", "fracture"], template)
        np.testing.assert_allclose([row["normal"], row["fracture"]], expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_prompts_file_per_label(pedclip_folder, images, classifier, tmp_path, suffix):
    """A mapping label -> prompts: the labels are its keys, each scored with its own prompts."""
    prompts = {label: f"an x-ray showing {label}" for label in LABELS[:2]}
    prompts[LABELS[2]] = [f"an x-ray showing {LABELS[2]}"]
    path = tmp_path / f"prompts{suffix}"
    path.write_text(json.dumps(prompts) if suffix == ".json" else "\n".join(f"{k}: {v}" for k, v in prompts.items()))
    out = tmp_path / "per_label.csv"
    assert run("predict", "--model", pedclip_folder, "--prompts", path, images / "gray.png", "--out", out) == 0
    row = next(csv.DictReader(out.open()))
    np.testing.assert_allclose(probabilities(row), pipeline_scores(classifier, images / "gray.png"), atol=1e-5)


def test_prompts_txt_and_stdout(pedclip_folder, images, classifier, tmp_path, capsys):
    """A .txt of templates (two: an ensemble) to stdout."""
    path = tmp_path / "templates.txt"
    path.write_text("# templates\n" + TEMPLATE + "\n\nradiograph with {label}\n")
    assert run("predict", "--model", pedclip_folder, "--labels", "normal,fracture", "--prompts", path,
               images / "gray.png") == 0  # fmt: skip
    ensemble = probabilities(next(csv.DictReader(capsys.readouterr().out.splitlines())), ["normal", "fracture"])
    np.testing.assert_allclose(ensemble.sum(), 1, atol=1e-5)
    single = pipeline_scores(classifier, images / "gray.png", ["normal", "fracture"])
    assert np.abs(ensemble - single).max() > 1e-4  # the second template counts


def test_pos_neg_scores(pedclip_folder, model, images, capsys):
    """CheXzero scores: per label, the softmax over the cosines with "{label}" and "no {label}"."""
    labels = ["normal", "fracture"]
    assert run("predict", "--model", pedclip_folder, "--labels", ",".join(labels), "--score", "pos_neg",
               "--template", "{label}", "--negative_template", "no {label}", images / "gray.png") == 0  # fmt: skip
    got = probabilities(next(csv.DictReader(capsys.readouterr().out.splitlines())), labels)
    model, processor = model
    texts = [*labels, *(f"no {label}" for label in labels)]
    pixels = processor(images=load_image(images / "gray.png"))["pixel_values"]
    with torch.no_grad():
        image = normalised(model.get_image_features(pixels).pooler_output)
        text = normalised(model.get_text_features(**processor(text=texts)).pooler_output)
    cosines = (image @ text.T)[0]
    expected = 1 / (1 + np.exp(cosines[2:] - cosines[:2]))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


def normalised(features: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(features, dim=-1).numpy()


def test_embed_parquet_equals_model_features(pedclip_folder, model, images, tmp_path):
    out, texts = tmp_path / "embeddings.parquet", tmp_path / "texts.txt"
    texts.write_text("no acute fracture\n\nright lower lobe consolidation\n")
    files = [images / "gray.png", images / "broken.png", images / "deep16.png", images / "film.dcm"]
    assert run("embed", "--model", pedclip_folder, *files, "--out", out, "--texts", texts, "--batch_size", 2) == 0
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [row["file"] for row in rows] == [str(f) for f in files] and rows[1]["embedding"] is None
    assert json.loads(table.schema.metadata[b"pedclip"])["body_parts"] == PEXR_BODY_PARTS
    model, processor = model
    pixels = processor(images=[load_image(files[i]) for i in (0, 2, 3)])["pixel_values"]
    with torch.no_grad():
        vision = model.get_image_features(pixels)
        text = model.get_text_features(**processor(text=["no acute fracture", "right lower lobe consolidation"]))
    got = np.asarray([rows[i]["embedding"] for i in (0, 2, 3)])
    np.testing.assert_allclose(got, normalised(vision.pooler_output), rtol=0, atol=1e-5)
    gates = torch.stack(vision.gate_logits).mean(0).softmax(-1).numpy()
    np.testing.assert_allclose([rows[i]["gate_probabilities"] for i in (0, 2, 3)], gates, atol=1e-5)
    assert [rows[i]["body_part"] for i in (0, 2, 3)] == [PEXR_BODY_PARTS[k] for k in gates.argmax(-1)]
    text_rows = pq.read_table(tmp_path / "embeddings.texts.parquet").to_pylist()
    assert [row["text"] for row in text_rows] == ["no acute fracture", "right lower lobe consolidation"]
    np.testing.assert_allclose([row["embedding"] for row in text_rows], normalised(text.pooler_output), atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--labels", "a,b", "--out", "x.txt"], "must end in .csv"),
        (["--labels", "a,b", "--template", "x-ray"], "has no {label}"),
        (["--labels", "a,b", "--template", "{label} of the {body_part}"], "--body_part_prompts"),
        (["--labels", "a,file"], "reserved"),
        (["--labels", "a,a"], "duplicate"),
        ([], "give the labels"),
    ],
)
def test_usage_errors(pedclip_folder, images, capsys, args, message):
    assert run("predict", "--model", pedclip_folder, *args, images / "gray.png") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("empty.txt", "# only a comment\n\n", "non-empty list"),
        ("bad.yaml", "a: [unclosed", "not valid YAML"),
        ("bad.json", '{"a": [1, 2]}', "label(s) ['a'] need a prompt"),
        ("prompts.csv", "a,b", "expected a .txt"),
    ],
)
def test_malformed_prompts_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / name)) + ".*" + re.escape(message)):
        read_prompts_file(tmp_path / name)


def test_model_errors(images, tmp_path, capsys):
    assert run("predict", "--model", "no-such-org/no-such-model", "--labels", "a,b", images / "gray.png") == 2
    assert "no-such-org/no-such-model" in (err := capsys.readouterr().err) and "HF_HUB_OFFLINE" in err
    assert run("embed", "--model", "unused", tmp_path, "--out", tmp_path / "e.parquet") == 2
    assert "no image or DICOM files" in capsys.readouterr().err


def test_python_m_pedclip(pedclip_folder, images):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "pedclip", "predict", "--model", str(pedclip_folder), "--labels", "a,b",
            str(images / "gray.png")]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = list(csv.DictReader(result.stdout.splitlines()))
    assert len(rows) == 1 and abs(float(rows[0]["a"]) + float(rows[0]["b"]) - 1) < 1e-5
