"""pexr.build and pexr.sources: PeXR-mini and hand-written DICOMs through the builder, end to end."""

from __future__ import annotations

import csv
import json
import struct
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest

from dicom_testing import ramp, write_dicom
from pexr import sources
from pexr.build import (
    BuildOptions,
    BuildStateError,
    build_from_dicom_tree,
    build_from_manifest,
    png16,
    resize_longest,
    split_of,
)
from pexr.cli import write_mini_manifest
from pexr.sources import patient_pseudonym, read_manifest, study_pseudonym
from pexr.synthetic import generate_pexr_mini

SALT = "test-salt"
OPTIONS = BuildOptions(max_side=48, shard_size=8)


def read_rows(out: Path) -> dict[str, list[dict]]:
    """{split: rows} from the parquet files (images as raw bytes)."""
    rows = defaultdict(list)
    for path in sorted((out / "data").glob("*.parquet")):
        rows[path.name.split("-")[0]] += pq.read_table(path).to_pylist()
    return dict(rows)


def read_rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) of PNG bytes."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


# ------------------------------------------------------------------------------------------------ PeXR-mini


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    return write_mini_manifest(tmp_path_factory.mktemp("mini"), generate_pexr_mini(20, seed=1, image_size=64))


@pytest.fixture(scope="module")
def mini_build(tmp_path_factory, mini):
    out = tmp_path_factory.mktemp("mini_out")
    return build_from_manifest(mini, out, options=OPTIONS, salt=SALT, progress=False)


def test_mini_build_keeps_every_image_with_its_true_text(mini, mini_build):
    manifest = list(csv.DictReader(open(mini, encoding="utf-8")))
    truth = {(study_pseudonym(r["study_id"], SALT), r["body_part"]): r for r in manifest}
    rows = [row for split_rows in read_rows(mini_build.output_dir).values() for row in split_rows]
    assert mini_build.complete and mini_build.rejects == {} and read_rejects(mini_build.output_dir) == []
    assert len(rows) == len(manifest) == sum(mini_build.rows.values())
    for row in rows:
        source = truth[row["study_id"], row["body_part"]]
        assert row["text"] == source["reference_text"]
        assert row["patient_id"] == patient_pseudonym(source["patient_id"], SALT)
        assert row["age_years"] == pytest.approx(float(source["age_years"]))


def test_no_patient_is_in_two_splits(mini_build):
    splits_of_patient = defaultdict(set)
    for split, rows in read_rows(mini_build.output_dir).items():
        for row in rows:
            splits_of_patient[row["patient_id"]].add(split)
            assert split == split_of(row["patient_id"], OPTIONS.split)
    assert len(splits_of_patient) == 20 and all(len(s) == 1 for s in splits_of_patient.values())


def test_images_are_16bit_png_within_max_side(mini_build):
    for rows in read_rows(mini_build.output_dir).values():
        for row in rows:
            assert row["image"]["path"] is None
            assert png_header(row["image"]["bytes"]) == (48, 48, 16, 0)  # 64 px square -> 48, gray 16-bit


def test_resize_keeps_aspect_and_never_upscales():
    image = np.linspace(0, 1, 100 * 50, dtype=np.float32).reshape(50, 100)
    assert resize_longest(image, 40).shape == (20, 40)
    assert resize_longest(image, 200).shape == (50, 100)
    small = resize_longest(image, 40)
    assert small.min() >= 0 and small.max() <= 1 and small[:, 0].mean() < small[:, -1].mean()
    assert png_header(png16(small)) == (40, 20, 16, 0)


def test_split_is_per_patient_and_follows_fractions():
    patients = [patient_pseudonym(str(i), SALT) for i in range(2000)]
    splits = [split_of(p, (0.8, 0.1, 0.1)) for p in patients]
    assert splits == [split_of(p, (0.8, 0.1, 0.1)) for p in patients]
    assert 0.75 < splits.count("train") / 2000 < 0.85 and splits.count("test") > 150
    assert {split_of(p, (0.5, 0.5, 0.0)) for p in patients} == {"train", "validation"}


def test_output_loads_for_training_and_batches(mini_build):
    from transformers import AutoTokenizer

    from pedclip.data import PedCLIPCollator, load_training_dataset
    from pedclip_testing import minilm_path
    from processing_pedclip import PedCLIPImageProcessor, PedCLIPProcessor

    data = load_training_dataset(str(mini_build.output_dir))
    assert {split: len(rows) for split, rows in data.items()} == mini_build.rows
    assert len(load_training_dataset(str(mini_build.output_dir / "data"))["train"]) == mini_build.rows["train"]
    assert data["train"][0]["image"].mode == "I;16"
    processor = PedCLIPProcessor(PedCLIPImageProcessor(size=32), AutoTokenizer.from_pretrained(minilm_path()))
    rows = [data["train"][i] for i in range(4)]
    batch = PedCLIPCollator(processor)(rows)
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["input_ids"].shape[0] == 4
    assert batch["body_part_labels"].tolist() == processor.body_part_ids([row["body_part"] for row in rows])


def test_stats_hold_the_counts(mini_build):
    from PIL import Image

    out = mini_build.output_dir
    markdown = (out / "stats.md").read_text()
    counts = defaultdict(lambda: defaultdict(int))
    for split, rows in read_rows(out).items():
        for row in rows:
            counts[row["body_part"]][split] += 1
    for part, per_split in counts.items():
        cells = [str(per_split.get(split, 0)) for split in ("train", "validation", "test")]
        total = sum(per_split.values())
        assert f"| {part} | {' | '.join(cells)} | {total} | {total} |" in markdown  # PeXR-mini texts are unique
    assert f"{sum(mini_build.rows.values())} images" in markdown
    table = f"## Texts by source\n\n| source | texts |\n| --- | --- |\n| rules | {sum(mini_build.rows.values())} |\n"
    assert table in markdown
    with Image.open(out / "stats.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 500
        plot.verify()


# ------------------------------------------------------------------------------------------------ resume


def file_times(out: Path, shard: int) -> dict[str, int]:
    paths = [*(out / "data").glob(f"*-{shard:05d}-of-*"), *(out / "shards").glob(f"{shard:05d}.*")]
    return {path.name: path.stat().st_mtime_ns for path in paths}


def assert_same_dataset(out: Path, reference: Path):
    names = sorted(path.name for path in (out / "data").iterdir())
    assert names == sorted(path.name for path in (reference / "data").iterdir())
    for name in names:
        assert pq.read_table(out / "data" / name).equals(pq.read_table(reference / "data" / name)), name


def test_interrupted_build_resumes_without_redoing_shards(tmp_path, mini, mini_build):
    from pedclip.data import PEXR_STATE_FILE, load_training_dataset
    from pexr.build import STATE_FILE

    first = build_from_manifest(mini, tmp_path, options=OPTIONS, salt=SALT, progress=False, max_shards=2)
    assert (first.shards_run, first.complete) == (2, False) and first.num_shards == mini_build.num_shards > 3
    assert not (tmp_path / "rejects.jsonl").exists() and not (tmp_path / "stats.md").exists()
    assert PEXR_STATE_FILE == STATE_FILE
    for folder in (tmp_path, tmp_path / "data"):  # training must not start on half a dataset
        with pytest.raises(ValueError, match="interrupted.*rerun the same `pexr build`"):
            load_training_dataset(str(folder))
    times = {shard: file_times(tmp_path, shard) for shard in (0, 1)}
    second = build_from_manifest(mini, tmp_path, options=OPTIONS, salt=SALT, progress=False)
    assert (second.shards_run, second.shards_skipped, second.complete) == (first.num_shards - 2, 2, True)
    assert {shard: file_times(tmp_path, shard) for shard in (0, 1)} == times
    assert_same_dataset(tmp_path, mini_build.output_dir)
    # a crash inside shard 3: its marker never written, a partial file left behind
    (tmp_path / "shards" / "00003.done.json").unlink()
    next((tmp_path / "data").glob("*-00003-of-*.parquet")).unlink()
    (tmp_path / "data" / f"train-00003-of-{first.num_shards:05d}.parquet.tmp").write_bytes(b"partial")
    times = file_times(tmp_path, 2)
    third = build_from_manifest(mini, tmp_path, options=OPTIONS, salt=SALT, progress=False)
    assert (third.shards_run, third.complete) == (1, True) and file_times(tmp_path, 2) == times
    assert not list((tmp_path / "data").glob("*.tmp"))
    assert_same_dataset(tmp_path, mini_build.output_dir)
    assert (tmp_path / "stats.md").read_text() == (mini_build.output_dir / "stats.md").read_text()


def test_changed_options_refuse_to_resume_and_overwrite_keeps_the_salt(tmp_path, mini):
    build_from_manifest(mini, tmp_path, options=OPTIONS, progress=False, max_shards=1)
    salt = json.loads((tmp_path / "build_state.json").read_text())["salt"]
    with pytest.raises(BuildStateError, match="max_side"):
        build_from_manifest(mini, tmp_path, options=BuildOptions(max_side=32, shard_size=8), progress=False)
    with pytest.raises(BuildStateError, match="salt_check"):
        build_from_manifest(mini, tmp_path, options=OPTIONS, salt="other", progress=False)
    result = build_from_manifest(mini, tmp_path, options=BuildOptions(max_side=32, shard_size=100), overwrite=True,
                                 progress=False)  # fmt: skip
    assert result.complete and result.num_shards == 1 and len(list((tmp_path / "data").glob("*-of-00001.*"))) >= 1
    assert json.loads((tmp_path / "build_state.json").read_text())["salt"] == salt


# ------------------------------------------------------------------------------------------------ manifests


def test_manifest_rows_list_images_and_conflicting_reports_reject_the_study(tmp_path):
    rows = [
        {"study_id": "A", "patient_id": "p1", "report": "R", "image_paths": '["a1.png", "a2.png"]',
         "body_part": "hand"},
        {"study_id": "A", "patient_id": "p1", "report": "", "image_paths": "a3.png; a4.png", "body_part": "hand;wrist"},
        {"study_id": "B", "patient_id": "p2", "report": "one", "image_path": "b1.png"},
        {"study_id": "B", "patient_id": "p2", "report": "two", "image_path": "b2.png"},
        {"study_id": "C", "patient_id": "p3", "report": "R", "image_paths": "c1.png;c2.png", "body_part": "a;b;c"},
        {"study_id": "", "patient_id": "p4", "report": "R", "image_path": "d1.png"},
    ]  # fmt: skip
    with open(tmp_path / "m.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, ["study_id", "patient_id", "report", "image_path", "image_paths", "body_part"])
        writer.writeheader()
        writer.writerows(rows)
    studies, rejects = read_manifest(tmp_path / "m.csv", SALT)
    assert [[(i.name, i.body_part) for i in s.images] for s in studies] == [
        [("a1.png", "hand"), ("a2.png", "hand"), ("a3.png", "hand"), ("a4.png", "wrist")]
    ]
    assert studies[0].images[0].path == str(tmp_path / "a1.png") and studies[0].report == "R"
    reasons = {(r["record"], r["file"]): r["reason"] for r in rejects}
    assert reasons == {
        ("m.csv row 3", "b1.png"): sources.CONFLICTING_REPORTS, ("m.csv row 4", "b2.png"): sources.CONFLICTING_REPORTS,
        ("m.csv row 5", None): sources.BAD_ROW, ("m.csv row 6", "d1.png"): sources.MISSING_ID,
    }  # fmt: skip


def test_manifest_without_required_columns_is_refused(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"study_id": "A", "report": "R", "image_path": "x.png"}) + "\n")
    with pytest.raises(ValueError, match="patient_id"):
        read_manifest(tmp_path / "m.jsonl", SALT)


# ------------------------------------------------------------------------------------------------ DICOM

IDENTIFIERS = {"PatientName": "Doe^Jane", "PatientID": "MRN-0042", "AccessionNumber": "ACC-7731"}


def write_study_dicom(path: Path, body_part="HAND", age="008Y", uids: list | None = None, **fields) -> Path:
    """A small CR file with identifying header fields; its UIDs are appended to `uids`."""
    fields = {"BodyPartExamined": body_part, "PatientAge": age, "PatientBirthDate": "20150102", **IDENTIFIERS, **fields}
    write_dicom(path, ramp(60, 40), bits_stored=12, **fields)
    if uids is not None:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        uids += [ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID]
    return path


def truncate(path: Path, keep_bytes_less: int = 1000) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep_bytes_less])


def assert_no_identifiers(out: Path, identifiers) -> None:
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found = [value for value in identifiers if value.encode() in data]
            assert not found, f"{path} holds {found}"


@pytest.fixture(scope="module")
def dicom_manifest_build(tmp_path_factory):
    root, uids = tmp_path_factory.mktemp("dicom_in"), []
    write_study_dicom(root / "s1/hand.dcm", uids=uids)
    write_study_dicom(root / "s1/wrist.dcm", "WRIST", uids=uids)
    write_study_dicom(root / "s2/knee.dcm", "KNEE", uids=uids)
    write_study_dicom(root / "s2/chest.dcm", "CHEST", uids=uids)
    write_study_dicom(root / "s3/foot.dcm", "FOOT", uids=uids)
    truncate(write_study_dicom(root / "s3/truncated.dcm", "FOOT", uids=uids))
    write_study_dicom(root / "s3/nopixels.dcm", "FOOT", uids=uids, PixelData=None)
    write_study_dicom(root / "s3/extremity.dcm", "EXTREMITY", uids=uids)
    write_study_dicom(root / "s3/adult.dcm", "FOOT", "040Y", uids=uids)
    write_study_dicom(root / "s3/noage.dcm", "ANKLE", "", uids=uids, PatientBirthDate="")
    (root / "s3/photo.png").write_bytes(png16(np.full((8, 8), 0.5)))
    reports = {
        "s1": "Clinical history: 8-year-old girl, fell on outstretched hand. Findings: Buckle fracture of the distal "
              "radius. The hand bones are normal.",
        "s2": "History: knee pain. Findings: Small joint effusion of the knee.",
        "s3": "Findings: Fracture of the fifth metatarsal of the foot. The ankle joint is normal.",
    }  # fmt: skip
    files = {"s1": ["hand", "wrist"], "s2": ["knee", "chest"],
             "s3": ["foot", "truncated", "nopixels", "extremity", "adult", "noage", "missing"]}  # fmt: skip
    lines = [json.dumps({"study_id": f"ACC-{s}", "patient_id": "MRN-0042", "report": reports[s],
                         "image_paths": [f"{s}/{n}.dcm" for n in names]}) for s, names in files.items()]  # fmt: skip
    photo = {"study_id": "ACC-s3", "patient_id": "MRN-0042", "report": "", "image_path": "s3/photo.png"}
    lines.append(json.dumps(photo))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("dicom_out")
    result = build_from_manifest(root / "manifest.jsonl", out, options=OPTIONS, salt=SALT, progress=False)
    return result, uids, root / "manifest.jsonl"


def test_dicom_records_are_kept_or_rejected_with_their_reason(dicom_manifest_build):
    result, _, _ = dicom_manifest_build
    rows = [row for split_rows in read_rows(result.output_dir).values() for row in split_rows]
    kept = {(row["study_id"], row["body_part"]): row for row in rows}
    expected = [("s1", "hand"), ("s1", "wrist"), ("s2", "knee"), ("s3", "foot"), ("s3", "ankle")]
    assert set(kept) == {(study_pseudonym(f"ACC-{study}", SALT), part) for study, part in expected}
    assert kept[study_pseudonym("ACC-s1", SALT), "wrist"]["text"] == "Buckle fracture of the distal radius."
    assert kept[study_pseudonym("ACC-s3", SALT), "ankle"]["age_years"] is None  # unknown ages are kept by default
    assert all(row["age_years"] == pytest.approx(8.0) for row in rows if row["body_part"] != "ankle")
    assert len({row["patient_id"] for row in rows}) == 1 and len(read_rows(result.output_dir)) == 1
    reasons = {record["file"]: record["reason"] for record in read_rejects(result.output_dir)}
    assert reasons == {
        "s2/chest.dcm": sources.EMPTY_TEXT, "s3/truncated.dcm": sources.CORRUPT_DICOM,
        "s3/nopixels.dcm": sources.NO_PIXEL_DATA, "s3/extremity.dcm": sources.UNKNOWN_BODY_PART,
        "s3/adult.dcm": sources.NOT_PEDIATRIC, "s3/missing.dcm": sources.MISSING_FILE,
        "s3/photo.png": sources.UNKNOWN_BODY_PART,
    }  # fmt: skip
    assert all(record["record"].startswith("manifest.jsonl row ") for record in read_rejects(result.output_dir))
    assert f"| {sources.UNKNOWN_BODY_PART} | 2 |" in (result.output_dir / "stats.md").read_text()


def test_no_identifier_reaches_the_output(dicom_manifest_build):
    result, uids, _ = dicom_manifest_build
    assert_no_identifiers(result.output_dir, [*IDENTIFIERS.values(), "20150102", "ACC-s1", *uids])


def test_age_filter_options(tmp_path, dicom_manifest_build):
    options = BuildOptions(max_side=48, shard_size=8, max_age_years=None, require_age=True)
    result = build_from_manifest(dicom_manifest_build[2], tmp_path, options=options, salt=SALT, progress=False)
    reasons = {record["file"]: record["reason"] for record in read_rejects(tmp_path)}
    assert "s3/adult.dcm" not in reasons and reasons["s3/noage.dcm"] == sources.UNKNOWN_AGE
    assert sum(result.rows.values()) == 5  # hand, wrist, knee, foot and the adult's foot


def test_every_dicom_error_reason_has_a_reject_reason():
    from pexr.build import DICOM_REJECT_REASONS
    from pexr.dicom import DICOM_ERROR_REASONS

    assert set(DICOM_REJECT_REASONS) == set(DICOM_ERROR_REASONS)
    assert set(DICOM_REJECT_REASONS.values()) <= {sources.CORRUPT_DICOM, sources.NO_PIXEL_DATA, sources.UNUSABLE_DICOM}


@pytest.mark.parametrize("wrist", ["missing file, part in the manifest", "no pixels, part in the header", "adult"])
def test_a_refused_image_keeps_its_sentences_out_of_other_parts(tmp_path, wrist):
    from pexr.build import process_study
    from pexr.reports import RuleBackend, split_report
    from pexr.sources import ImageRef, Study

    report = "Findings: Buckle fracture of the distal radius. The hand is normal."
    # the rules give a sentence about a part that was not asked for to a neighbour: here the wrist's to the hand
    assert split_report(report, ["hand"]) == {"hand": report.removeprefix("Findings: ")}
    (tmp_path / "hand.png").write_bytes(png16(np.full((8, 8), 0.5)))
    hand = ImageRef(str(tmp_path / "hand.png"), "hand.png", "row 1", "hand")
    if wrist == "missing file, part in the manifest":
        image = ImageRef(str(tmp_path / "gone.dcm"), "gone.dcm", "row 2", "wrist")
    else:
        fields = {"PixelData": None} if wrist.startswith("no pixels") else {"PatientAge": "030Y"}
        path = write_study_dicom(tmp_path / "wrist.dcm", "WRIST", **fields)
        image = ImageRef(str(path), "wrist.dcm", "row 2")
    rows, rejects = process_study(Study("s", "p", report, (hand, image)), OPTIONS, RuleBackend())
    assert [(row["body_part"], row["text"]) for row in rows] == [("hand", "The hand is normal.")]
    assert [reject["file"] for reject in rejects] == [image.name]


def test_dicom_tree_with_report_table(tmp_path):
    root, uids = tmp_path / "pacs", []
    write_study_dicom(root / "a/1.dcm", "HAND", uids=uids, AccessionNumber="ACC-1")
    write_study_dicom(root / "a/2", "WRIST", uids=uids, AccessionNumber="ACC-1")  # no extension
    write_study_dicom(root / "b/1.dcm", "KNEE", uids=uids, AccessionNumber="ACC-2")  # no report
    write_study_dicom(root / "c/1.dcm", "FOOT", uids=uids, AccessionNumber="")  # keyed by StudyInstanceUID
    write_study_dicom(root / "d/1.dcm", "HAND", uids=uids, AccessionNumber="ACC-4", PatientID="")
    broken = root / "e/broken.dcm"
    broken.parent.mkdir()
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x00\x00UL\x04\x00")
    (root / "notes.txt").write_text("not a DICOM file")
    foot_study = uids[9]
    with open(tmp_path / "reports.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([
            ("study_key", "report"), ("ACC-1", "Findings: Fracture of the distal radius. The hand is normal."),
            (foot_study, "Findings: Fracture of the fifth metatarsal of the foot."), ("ACC-9", "unused"),
        ])  # fmt: skip
    out = tmp_path / "out"
    result = build_from_dicom_tree(root, tmp_path / "reports.csv", out, options=OPTIONS, salt=SALT, progress=False,
                                   num_workers=2)  # headers and shards in worker processes  # fmt: skip
    rows = [row for split_rows in read_rows(out).values() for row in split_rows]
    assert sorted((row["study_id"], row["body_part"]) for row in rows) == sorted([
        (study_pseudonym("ACC-1", SALT), "hand"), (study_pseudonym("ACC-1", SALT), "wrist"),
        (study_pseudonym(foot_study, SALT), "foot"),
    ])  # fmt: skip
    reasons = {record["file"]: record["reason"] for record in read_rejects(out)}
    assert reasons == {
        "b/1.dcm": sources.NO_REPORT, "d/1.dcm": sources.MISSING_ID, "e/broken.dcm": sources.CORRUPT_DICOM,
    }  # fmt: skip
    assert result.complete and sum(result.rejects.values()) == 3
    assert_no_identifiers(out, [*IDENTIFIERS.values(), "ACC-1", "ACC-2", *uids])


# ------------------------------------------------------------------------------------------------ splitters


def test_splitter_spec_builds_the_backend_and_caches_in_the_output(tmp_path):
    from pexr.build import SplitterSpec, _options
    from pexr.reports import OpenAIBackend, RuleBackend, TransformersBackend

    assert isinstance(SplitterSpec().build(), RuleBackend)
    local = _options(BuildOptions(splitter=SplitterSpec(model="some/model")), tmp_path).splitter
    assert local.is_local_model and local.cache_dir == str(tmp_path / "llm_cache")
    assert isinstance(local.build(), TransformersBackend)  # the model loads on first use only
    assert replace(local, device="cpu").build()._pipeline_kwargs["device"] == "cpu"
    remote = SplitterSpec(model="m", endpoint="http://localhost:8000/v1").build()
    assert isinstance(remote, OpenAIBackend)
    with pytest.raises(ValueError, match="model"):
        SplitterSpec(endpoint="http://localhost:8000/v1").build()


def test_unreachable_llm_server_falls_back_to_rules(tmp_path, dicom_manifest_build, caplog):
    from pexr.build import SplitterSpec

    reference, _, manifest = dicom_manifest_build
    dead = SplitterSpec(model="m", endpoint="http://127.0.0.1:9/v1", retries=0)  # nothing listens on port 9
    options = BuildOptions(max_side=48, shard_size=8, splitter=dead)
    result = build_from_manifest(manifest, tmp_path, options=options, salt=SALT, progress=False)
    assert result.rows == reference.rows and result.rejects == reference.rejects
    assert_same_dataset(tmp_path, reference.output_dir)
    assert "falling back to rules" in caplog.text
    assert f"| rules after LLM failure | {sum(result.rows.values())} |" in (tmp_path / "stats.md").read_text()
