"""Build inputs -> a study plan: a manifest (CSV or JSONL), or a DICOM folder tree plus a report table.

Both give `(studies, rejects)`: `Study`s sorted by pseudonymous study id (images sorted by name), and reject
records (see `reject`) for whatever cannot become a study. Every identifier is replaced here by a salted pseudonym
(`pexr.dicom.pseudonym`, HMAC-SHA256, namespaced "study:"/"patient:"), so raw ids never reach the output.

Manifest (`read_manifest`): CSV (`.csv`, `.tsv`) or JSON lines (`.jsonl`, `.ndjson`); one row per image or per
group of images of one study. Columns:

| column | required | meaning |
| --- | --- | --- |
| `study_id`, `patient_id` | yes | raw ids (pseudonymised here) |
| `report` | yes | the study's report: on every row of the study or on some of them (non-empty copies must agree) |
| `image_path` or `image_paths` | yes | one path, or several (a JSON list, or `;`-separated), relative to the manifest |
| `body_part` | no | a vocabulary name or DICOM term: one for all the row's images, or one per image (as above) |
| `age_years` | no | age at the study |

An empty `body_part` or `age_years` is read from the DICOM header; a PNG/JPEG without `body_part` is rejected, and
one without `age_years` has an unknown age.

Other columns are ignored. Rows are named in rejects as "`<manifest name>` row N" (N counts data rows from 1).

DICOM tree (`scan_dicom_tree`): every file under the root whose bytes 128-131 are "DICM" (any extension; files
without the preamble and DICOMDIR files are ignored, not rejected). Headers are read without pixels; images are
grouped by `study_key` (default AccessionNumber, falling back to StudyInstanceUID when empty) and joined to the
report table, a CSV with columns `study_key` (or the `study_key` field name) and `report`. The patient is PatientID.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import pydicom

from pexr.dicom import pseudonym

# Reject reasons (the `reason` field of a reject record).
MISSING_FILE = "missing file"
CORRUPT_DICOM = "corrupt or truncated DICOM"
NO_PIXEL_DATA = "no pixel data"
UNUSABLE_DICOM = "unusable DICOM"  # modality, colour, multi-frame, blank, a transfer syntax nothing decodes
UNREADABLE_IMAGE = "unreadable image"  # a PNG/JPEG/... that Pillow cannot open
UNKNOWN_BODY_PART = "unknown body part"
NOT_PEDIATRIC = "not pediatric"
UNKNOWN_AGE = "unknown age"  # only with require_age
NO_REPORT = "no report"
CONFLICTING_REPORTS = "conflicting reports"
CONFLICTING_PATIENTS = "conflicting patient ids"
MISSING_ID = "missing study or patient id"
BAD_ROW = "bad manifest row"
SPLIT_FAILED = "report splitting failed"
EMPTY_TEXT = "empty text after extraction"
PROCESSING_ERROR = "processing error"  # an unexpected exception on one record (a bug): logged, the run goes on

MANIFEST_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
_DICOMDIR_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class ImageRef:
    """One image of a study: where it is and what the input says about it (never written to the dataset)."""

    path: str  # absolute path on this machine
    name: str  # as the input names it (manifest entry or path relative to the DICOM root): for rejects
    record: str  # the manifest row or the file: for rejects
    body_part: str | None = None  # the manifest's term as written; None: read from the DICOM header
    age_years: float | None = None  # the manifest's age; None: read from the DICOM header


@dataclass(frozen=True)
class Study:
    study_id: str  # pseudonym
    patient_id: str  # pseudonym
    report: str
    images: tuple[ImageRef, ...]


def reject(
    reason: str, detail: str = "", image: ImageRef | None = None, study_id: str | None = None, record: str | None = None
) -> dict:
    """A reject record: `reason` (one of the constants above), `detail`, the `file` and `record` (manifest row or
    file) it concerns and the pseudonymous `study_id` where known."""
    return {
        "reason": reason, "detail": detail, "file": image.name if image else None,
        "record": record or (image.record if image else None), "study_id": study_id,
    }  # fmt: skip


def study_pseudonym(raw: str, salt: str) -> str:
    return pseudonym(f"study:{raw}", salt)


def patient_pseudonym(raw: str, salt: str) -> str:
    return pseudonym(f"patient:{raw}", salt)


def _same_text(text: str) -> str:
    return " ".join(str(text or "").split())


def _make_studies(groups: dict[str, list[tuple]], salt: str) -> tuple[list[Study], list[dict]]:
    """Studies from `{raw study id: [(raw patient id, report, ImageRef), ...]}`; a study whose rows disagree on the
    patient or the report, or that has no report, is rejected whole (one reject per image)."""
    studies, rejects = [], []
    for raw_study, members in groups.items():
        study_id = study_pseudonym(raw_study, salt)
        patients = {_same_text(patient) for patient, _, _ in members}
        reports = {_same_text(report) for _, report, _ in members} - {""}
        images = tuple(sorted({image.name: image for _, _, image in members}.values(), key=lambda i: i.name))
        problem = None
        if len(patients) > 1:
            problem = (CONFLICTING_PATIENTS, f"{len(patients)} different patient ids in one study")
        elif len(reports) > 1:
            problem = (CONFLICTING_REPORTS, f"{len(reports)} different reports in one study")
        elif not reports:
            problem = (NO_REPORT, "the study has no report text")
        if problem:
            rejects += [reject(*problem, image, study_id) for image in images]
            continue
        report = next(report for _, report, _ in members if _same_text(report))
        studies.append(Study(study_id, patient_pseudonym(patients.pop(), salt), report.strip(), images))
    return sorted(studies, key=lambda s: s.study_id), rejects


# ------------------------------------------------------------------------------------------------ manifest


class _BadRow(ValueError):
    pass


def _iter_manifest(path: Path) -> Iterator[tuple[int, dict | str]]:
    """(row number from 1, row dict or the error text) for every data row."""
    kind = MANIFEST_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: a manifest must end in one of {', '.join(MANIFEST_SUFFIXES)}")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if kind == "csv":
            yield from enumerate(csv.DictReader(handle, delimiter="\t" if path.suffix == ".tsv" else ","), 1)
            return
        lines = (line for line in handle if line.strip())
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                yield number, row if isinstance(row, dict) else f"not a JSON object: {line[:40]!r}"
            except json.JSONDecodeError as err:
                yield number, f"invalid JSON: {err}"


def _as_list(value) -> list[str]:
    """A list cell: a JSON list, a JSON-list string, a ';'-separated string, a single value or empty."""
    if value is None:
        return []
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise _BadRow(f"invalid JSON list {value[:40]!r}: {err}") from err
    items = value if isinstance(value, list) else str(value).split(";")
    return [str(item).strip() for item in items if str(item).strip()]


def _age(value) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        return float(value)
    except ValueError as err:
        raise _BadRow(f"age_years {value!r} is not a number") from err


def _row_images(row: dict, record: str, root: Path) -> list[ImageRef]:
    names = _as_list(row.get("image_paths")) or _as_list(row.get("image_path"))
    if not names:
        raise _BadRow("no image_path")
    parts = _as_list(row.get("body_part"))
    if len(parts) not in (0, 1, len(names)):
        raise _BadRow(f"{len(parts)} body parts for {len(names)} images")
    parts = parts * len(names) if len(parts) == 1 else parts or [None] * len(names)
    age = _age(row.get("age_years"))
    return [
        ImageRef(os.path.abspath(root / name), name, record, part, age) for name, part in zip(names, parts)
    ]  # fmt: skip


def read_manifest(path: str | os.PathLike, salt: str) -> tuple[list[Study], list[dict]]:
    """Studies and rejects from a manifest (see the module docstring); raises `ValueError` if a required column
    is missing altogether."""
    path = Path(path)
    groups, rejects = defaultdict(list), []
    for number, row in _iter_manifest(path):
        record = f"{path.name} row {number}"
        if isinstance(row, str):
            rejects.append(reject(BAD_ROW, row, record=record))
            continue
        if not groups and not rejects:
            _check_columns(path, row)
        try:
            images = _row_images(row, record, path.parent)
        except _BadRow as err:
            rejects.append(reject(BAD_ROW, str(err), record=record))
            continue
        study, patient = _same_text(row.get("study_id")), _same_text(row.get("patient_id"))
        if not study or not patient:
            rejects += [reject(MISSING_ID, "empty study_id or patient_id", image) for image in images]
            continue
        groups[study] += [(patient, row.get("report") or "", image) for image in images]
    studies, study_rejects = _make_studies(groups, salt)
    return studies, rejects + study_rejects


def _check_columns(path: Path, row: dict) -> None:
    missing = [name for name in ("study_id", "patient_id", "report") if name not in row]
    if "image_path" not in row and "image_paths" not in row:
        missing.append("image_path (or image_paths)")
    if missing:
        raise ValueError(f"{path}: manifest lacks columns {missing} (has {sorted(row)})")


# ------------------------------------------------------------------------------------------------ DICOM tree


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True if the file has the DICOM Part 10 preamble ("DICM" at byte 128)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def iter_dicom_files(root: Path) -> Iterator[Path]:
    """Every DICOM file under `root`, in sorted path order."""
    for folder, subfolders, files in os.walk(root):
        subfolders.sort()
        for name in sorted(files):
            if is_dicom_file(Path(folder) / name):
                yield Path(folder) / name


def read_header(path: str, study_key: str) -> tuple[str, str] | str | None:
    """(raw study key, raw patient id) of one file, the error text if its header is unreadable (pydicom stops
    quietly at a truncation: a header without SOP Class UID counts as unreadable), or None for a DICOMDIR. Runs in
    worker processes."""
    tags = [study_key, "StudyInstanceUID", "PatientID", "SOPClassUID"]
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    except Exception as err:  # pydicom raises EOFError, ValueError, struct.error, ... on broken files
        return f"{type(err).__name__}: {err}"
    if str(getattr(ds, "file_meta", {}).get("MediaStorageSOPClassUID", "")) == _DICOMDIR_CLASS:
        return None
    if not _same_text(ds.get("SOPClassUID")):
        return "no SOP Class UID: truncated or not an image header"
    key = _same_text(ds.get(study_key)) or _same_text(ds.get("StudyInstanceUID"))
    return key, _same_text(ds.get("PatientID"))


def read_report_table(path: str | os.PathLike, study_key: str) -> dict[str, list[str]]:
    """{raw study key: [report, ...]} from a CSV with a `study_key` (or `<study_key>`) column and a `report` one."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = reader.fieldnames or []
        key = next((name for name in ("study_key", study_key) if name in columns), None)
        if key is None or "report" not in columns:
            raise ValueError(f"{path}: a report table needs columns 'study_key' and 'report' (has {columns})")
        table = defaultdict(list)
        for row in reader:
            table[_same_text(row[key])].append(row["report"] or "")
    return table


def scan_dicom_tree(
    root: str | os.PathLike, reports: str | os.PathLike, salt: str, study_key: str = "AccessionNumber",
    executor: Executor | None = None,
) -> tuple[list[Study], list[dict]]:  # fmt: skip
    """Studies and rejects from a DICOM folder tree and a report table (see the module docstring). Headers are
    read through `executor.map` when given (e.g. a process pool)."""
    root = Path(root)
    table = read_report_table(reports, study_key)
    files = [str(path) for path in iter_dicom_files(root)]
    mapper = executor.map if executor is not None else map
    headers = mapper(read_header, files, [study_key] * len(files), **({"chunksize": 64} if executor else {}))
    groups, rejects = defaultdict(list), []
    for path, header in zip(files, headers):
        name = Path(path).relative_to(root).as_posix()
        image = ImageRef(path, name, name)
        if header is None:
            continue
        if isinstance(header, str):
            rejects.append(reject(CORRUPT_DICOM, f"unreadable header ({header})", image))
        elif not header[0] or not header[1]:
            rejects.append(reject(MISSING_ID, f"empty {study_key}/StudyInstanceUID or PatientID", image))
        else:
            groups[header[0]] += [(header[1], report, image) for report in table.get(header[0]) or [""]]
    studies, study_rejects = _make_studies(groups, salt)
    return studies, rejects + study_rejects


def plan_digest(studies: Iterable[Study]) -> str:
    """A digest of the study plan (ids, reports, image names and terms): a resumed build checks its inputs agree."""
    digest = hashlib.sha256()
    for study in studies:
        images = [(image.name, image.body_part, image.age_years) for image in study.images]
        digest.update(json.dumps([study.study_id, study.patient_id, study.report, images]).encode())
    return digest.hexdigest()


__all__ = [
    "BAD_ROW", "CONFLICTING_PATIENTS", "CONFLICTING_REPORTS", "CORRUPT_DICOM", "EMPTY_TEXT", "ImageRef",
    "MISSING_FILE", "MISSING_ID", "NOT_PEDIATRIC", "NO_PIXEL_DATA", "NO_REPORT", "PROCESSING_ERROR",
    "SPLIT_FAILED", "Study", "UNKNOWN_AGE", "UNKNOWN_BODY_PART", "UNREADABLE_IMAGE", "UNUSABLE_DICOM",
    "is_dicom_file", "iter_dicom_files", "plan_digest", "read_header", "read_manifest", "read_report_table",
    "reject", "scan_dicom_tree",
]  # fmt: skip
