"""Build PeXR training triplets: studies (image files + one report each) -> a sharded parquet dataset.

`build_from_manifest(manifest, output_dir)` and `build_from_dicom_tree(dicom_dir, reports_csv, output_dir)` read
their inputs through `pexr.sources` (formats documented there), then write one row per kept image:

| column | content |
| --- | --- |
| `image` | a 16-bit grayscale PNG (`datasets.Image`; decodes to PIL "I;16"), longest side <= `max_side` |
| `text` | the report's text about this image's body part (the splitter run over all the study's known parts) |
| `body_part` | a `configuration_pedclip.DEFAULT_BODY_PARTS` name |
| `study_id`, `patient_id` | salted pseudonyms (HMAC-SHA256, 32 hex digits) |
| `age_years` | age at the study (float64), null if unknown |

Output folder:

    OUT/data/{split}-{shard:05d}-of-{num_shards:05d}.parquet   the dataset (load with --dataset_name OUT)
    OUT/rejects.jsonl        one JSON object per skipped record: reason, detail, file, record, study_id
    OUT/stats.md, stats.png  counts per body part and split, text lengths and sources, rejects (`pexr.stats`)
    OUT/build_state.json     PRIVATE: the salt (if generated), the build options and a digest of the inputs
    OUT/shards/              per-shard done markers (counts, incl. rows per text source) and rejects (resume)
    OUT/llm_cache/           LLM answers (default cache of the LLM splitters; holds report text)

Privacy: no name, date, UID, accession number or raw patient/study id is written; ids become pseudonyms keyed by
the salt (`salt=`, the CLI's `--salt` or $PEXR_SALT; else a random one stored in `build_state.json` and reused by
every later build into this folder, so pseudonyms and splits stay stable). Whoever holds the salt and the hospital
ids can re-link rows to patients: share only `data/` and the stats, never `build_state.json`. `rejects.jsonl` names
input files and manifest rows for the curator, and `llm_cache/` holds report text: keep both in-house. PNGs carry no
metadata. Report text is copied as written: de-identify free text (names in reports) before building; pixel data
is not scrubbed either (burned-in annotations).

Images: DICOM files (detected by their preamble, any extension) through `pexr.dicom.read_dicom` (modality LUT,
VOI window, MONOCHROME1 inverted: bone bright); other files through Pillow (16/32-bit integer modes over 65535,
anything else as 8-bit gray), values kept as they are. Then Lanczos down to `max_side` (aspect kept, never
upscaled) and round(x * 65535) into the PNG.

Rejects, per image: a missing file, an unreadable image or DICOM (`DicomError.reason` -> `DICOM_REJECT_REASONS`),
an unknown body part (the manifest's `body_part`, else the DICOM header through `pexr.dicom`) or an age outside the
filter (`max_age_years`, default 18: adults are rejected as "not pediatric"; an unknown age is kept unless
`require_age`) rejects that image. The report is then split over every body part the study's images name, rejected
ones included when their part is known (the manifest's, or a readable DICOM header's), because the rule splitter
sends a sentence about a part it was not given to a neighbouring part; the loaded images keep their part's text,
and one whose part gets none is rejected ("empty text after extraction"). Reasons are the constants in
`pexr.sources`. How each kept text was produced (`SplitResult.source`: rules, llm, rules after LLM failure) is
counted in the shard markers and the stats. An unexpected exception on one record is logged as "processing error"
and the run goes on.

Splits: a patient's split comes from its pseudonym alone, sha256 -> u in [0, 1) against the cumulative `split`
fractions, so no patient is in two splits and the same salt always gives the same split, across reruns and growing
inputs. Shards: studies sorted by pseudonym, `shard_size` per shard. Each shard is built in a worker process
(`num_workers`, spawn start method) and writes its rejects, then its parquet files (one per split present, via a
temporary name and `os.replace`), then its done marker, last. A rerun skips shards with a marker and redoes the
others, after checking that options, inputs and salt match `build_state.json` (else `BuildStateError`; pass
`overwrite=True` to start over, keeping the salt). When every shard is done, the rejects are merged, the stats
written and `build_state.json` gets `"complete": true`: until then `data/` holds only the finished shards, and
`pedclip.data.load_training_dataset` refuses the folder. A local transformers LLM runs in the main process (one
model in memory); the rule and HTTP splitters run in every worker.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import multiprocessing
import os
import secrets
import shutil
from collections import Counter, defaultdict
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm.auto import tqdm

from configuration_pedclip import DEFAULT_BODY_PARTS
from pexr import sources
from pexr.dicom import DicomError, is_pediatric, map_body_part, pseudonym, read_dicom
from pexr.reports import SplitBackend, make_backend
from pexr.sources import ImageRef, Study, reject

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
DATA_DIR, SHARD_DIR, LLM_CACHE_DIR = "data", "shards", "llm_cache"
REJECTS_FILE, STATE_FILE = "rejects.jsonl", "build_state.json"
FORMAT_VERSION = 1
PARQUET_ROW_GROUP = 100  # rows per row group: images are large, so readers fetch small groups


class BuildStateError(RuntimeError):
    """The output folder holds a build made with other options, inputs or salt."""


@dataclass(frozen=True)
class SplitterSpec:
    """Which report splitter the workers build: the rules (no model), a local transformers model (`model` is its
    path, run on `device`, e.g. "cuda"), or an OpenAI-compatible server (`endpoint` URL, `model` the served model's
    name). `cache_dir` keeps LLM answers; `retries` as in `pexr.reports`."""

    model: str | None = None
    endpoint: str | None = None
    cache_dir: str | None = None
    retries: int = 2
    device: str | None = None

    def build(self) -> SplitBackend:
        """The backend, through `pexr.reports.make_backend` (`device` goes to a local model only)."""
        local = {"device": self.device} if self.is_local_model else {}
        return make_backend(self.model, self.endpoint, cache_dir=self.cache_dir, retries=self.retries, **local)

    @property
    def is_local_model(self) -> bool:
        return self.model is not None and self.endpoint is None


@dataclass(frozen=True)
class BuildOptions:
    """What decides the output (a resumed build must use the same): image size, split fractions, age filter,
    shard size and report splitter."""

    max_side: int = 512
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_age_years: float | None = 18.0
    require_age: bool = False
    shard_size: int = 256
    splitter: SplitterSpec = field(default_factory=SplitterSpec)

    def __post_init__(self):
        split = tuple(float(f) for f in self.split)
        if len(split) != 3 or min(split) < 0 or abs(sum(split) - 1) > 1e-6:
            raise ValueError(f"split={self.split!r}: three non-negative fractions summing to 1")
        if self.max_side < 8 or self.shard_size < 1:
            raise ValueError(f"need max_side >= 8 and shard_size >= 1, got {self.max_side}, {self.shard_size}")
        object.__setattr__(self, "split", split)

    def fingerprint(self) -> dict:
        options = asdict(self)
        options["splitter"].pop("cache_dir")
        options["splitter"].pop("device")
        options["split"] = list(self.split)
        return options


@dataclass
class BuildResult:
    output_dir: Path
    num_shards: int
    shards_run: int  # built by this call
    shards_skipped: int  # already done by an earlier call
    complete: bool  # every shard done (then rejects.jsonl and the stats are written)
    rows: dict[str, int]  # images kept per split
    rejects: dict[str, int]  # rejected records per reason


# ------------------------------------------------------------------------------------------------ images


class _Rejected(Exception):
    """A rejected image: the reason (a `pexr.sources` constant), the detail, and its body part when known."""

    def __init__(self, reason: str, detail: str, part: str | None = None):
        super().__init__(reason, detail)
        self.reason, self.detail, self.part = reason, detail, part


def read_picture(path: str) -> np.ndarray:
    """A PNG/JPEG/TIFF/... as float [0, 1]: 16/32-bit integer modes over 65535, float mode clipped, every other
    mode (gray, RGB, palette) through 8-bit gray."""
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode.startswith("I"):
                return np.clip(np.asarray(picture, dtype=np.float64) / 65535.0, 0.0, 1.0)
            if picture.mode == "F":
                return np.clip(np.asarray(picture, dtype=np.float64), 0.0, 1.0)
            return np.asarray(picture.convert("L"), dtype=np.float64) / 255.0
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise _Rejected(sources.UNREADABLE_IMAGE, f"{type(err).__name__}: {err}") from err


def resize_longest(image: np.ndarray, max_side: int) -> np.ndarray:
    """Float32 image whose longest side is at most `max_side` (Lanczos, aspect ratio kept, never upscaled)."""
    image = np.asarray(image, dtype=np.float32)
    height, width = image.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return image
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(image).resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.clip(np.asarray(resized), 0.0, 1.0)


def png16(image: np.ndarray) -> bytes:
    """A [0, 1] image as 16-bit grayscale PNG bytes (round(x * 65535)), with no metadata."""
    pixels = np.rint(np.clip(image, 0.0, 1.0) * 65535.0).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


# The reject reason of each `DicomError.reason` code (`pexr.dicom.DICOM_ERROR_REASONS`).
DICOM_REJECT_REASONS: Mapping[str, str] = MappingProxyType({
    "not_dicom": sources.CORRUPT_DICOM,  # has the preamble (else it is read as a picture), yet pydicom refuses it
    "corrupt": sources.CORRUPT_DICOM, "no_pixel_data": sources.NO_PIXEL_DATA,
    **dict.fromkeys(("modality", "multi_frame", "not_grayscale", "undecodable", "blank"), sources.UNUSABLE_DICOM),
})  # fmt: skip


def _vocabulary_name(term: str) -> str | None:
    name = "_".join(term.strip().lower().replace("-", " ").split())
    return name if name in DEFAULT_BODY_PARTS else map_body_part(term)


def _body_part(image: ImageRef, dicom) -> str:
    if image.body_part:
        part = _vocabulary_name(image.body_part)
        if part is None:
            raise _Rejected(sources.UNKNOWN_BODY_PART, f"body_part {image.body_part!r} names no single known part")
        return part
    if dicom is None:
        raise _Rejected(sources.UNKNOWN_BODY_PART, "no body_part given and no DICOM header to read it from")
    if dicom.body_part is None:
        named = ", ".join(dicom.body_part_candidates) or f"nothing known (BodyPartExamined {dicom.body_part_term!r})"
        raise _Rejected(sources.UNKNOWN_BODY_PART, f"the DICOM header names {named}")
    return dicom.body_part


def _check_age(age: float | None, options: BuildOptions) -> None:
    if age is None:
        if options.require_age:
            raise _Rejected(sources.UNKNOWN_AGE, "no age in the input or the DICOM header")
    elif options.max_age_years is not None and not is_pediatric(age, options.max_age_years):
        raise _Rejected(sources.NOT_PEDIATRIC, f"age {age:.1f} years >= {options.max_age_years:g}")


def _read_pixels(image: ImageRef):
    """(pixels, `DicomImage` or None) of one image file, or `_Rejected` (with the header's part if it named one)."""
    if not os.path.isfile(image.path):
        raise _Rejected(sources.MISSING_FILE, "no such file")
    if not sources.is_dicom_file(image.path):
        return read_picture(image.path), None
    try:
        dicom = read_dicom(image.path)
    except DicomError as err:
        raise _Rejected(DICOM_REJECT_REASONS[err.reason], err.detail, err.body_part) from err
    return dicom.image, dicom


def load_image(image: ImageRef, options: BuildOptions) -> tuple[np.ndarray, str, float | None]:
    """(resized [0, 1] image, body part, age) of one image, or `_Rejected` with the reason and, where the input or
    the DICOM header names it, the image's body part (the report splitter still needs it)."""
    part = _vocabulary_name(image.body_part) if image.body_part else None
    try:
        pixels, dicom = _read_pixels(image)
        part = _body_part(image, dicom)
        age = image.age_years if image.age_years is not None else (dicom.age_years if dicom else None)
        _check_age(age, options)
    except _Rejected as err:
        err.part = part or err.part  # the input's part first, as `_body_part` decides
        raise
    return resize_longest(pixels, options.max_side), part, age


# ------------------------------------------------------------------------------------------------ studies


def split_of(patient_id: str, fractions: Sequence[float]) -> str:
    """The split of a patient: sha256 of its pseudonym -> u in [0, 1), against the cumulative fractions."""
    u = int.from_bytes(hashlib.sha256(f"split:{patient_id}".encode()).digest()[:8], "big") / 2**64
    edges = np.cumsum(fractions)
    for name, edge, fraction in zip(SPLITS, edges, fractions):
        if u < edge and fraction > 0:
            return name
    return next(name for name, fraction in zip(SPLITS[::-1], fractions[::-1]) if fraction > 0)


def _load_all(study: Study, options: BuildOptions) -> tuple[list[tuple], list[dict], list[str]]:
    """The loaded images, the rejects, and the body parts known of all the study's images (loaded or not)."""
    loaded, rejects, parts = [], [], []
    for image in study.images:
        try:
            loaded.append((image, *load_image(image, options)))
            parts.append(loaded[-1][2])
        except _Rejected as err:
            rejects.append(reject(err.reason, err.detail, image, study.study_id))
            parts += [err.part] if err.part else []
        except Exception as err:  # a bug must not kill the run: log the record and go on
            logger.exception("unexpected error on %s", image.record)
            rejects.append(reject(sources.PROCESSING_ERROR, f"{type(err).__name__}: {err}", image, study.study_id))
    return loaded, rejects, list(dict.fromkeys(parts))


def process_study(study: Study, options: BuildOptions, splitter: SplitBackend) -> tuple[list[dict], list[dict]]:
    """The rows (with `split` and `text_source` = `SplitResult.source` keys) and rejects of one study. The report is
    split over every part the study imaged as far as known, rejected images included (the rules tell imaged parts
    from the others: a refused wrist film's "distal radius" sentence must not go to the hand), and the loaded
    images keep their part's text."""
    loaded, rejects, parts = _load_all(study, options)
    if not loaded:
        return [], rejects
    try:
        result = splitter.split(study.report, parts)
    except Exception as err:  # a broken splitter loses this study, not the run
        detail = f"{type(err).__name__}: {err}"
        return [], rejects + [reject(sources.SPLIT_FAILED, detail, image, study.study_id) for image, *_ in loaded]
    split, rows = split_of(study.patient_id, options.split), []
    for image, pixels, part, age in loaded:
        text = (result.texts.get(part) or "").strip()
        if not text:
            rejects.append(reject(sources.EMPTY_TEXT, f"the report says nothing of the {part}", image, study.study_id))
            continue
        rows.append({
            "image": {"bytes": png16(pixels), "path": None}, "text": text, "body_part": part,
            "study_id": study.study_id, "patient_id": study.patient_id, "age_years": age, "split": split,
            "text_source": result.source,
        })  # fmt: skip
    return rows, rejects


# ------------------------------------------------------------------------------------------------ shards


def features():
    """The `datasets.Features` of the output rows."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    text = Value("string")
    return Features({
        "image": ImageFeature(), "text": text, "body_part": text, "study_id": text, "patient_id": text,
        "age_years": Value("float64"),
    })  # fmt: skip


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _jsonl(records: Sequence[dict]) -> bytes:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")


def write_parquet(rows: Sequence[dict], path: Path, schema: pa.Schema) -> None:
    """Rows as a parquet file with the `datasets` features in its schema metadata, written via a temporary name."""
    table = pa.Table.from_pydict({name: [row[name] for row in rows] for name in schema.names}, schema=schema)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp, row_group_size=PARQUET_ROW_GROUP)
    os.replace(tmp, path)


def _marker(out: Path, index: int) -> Path:
    return out / SHARD_DIR / f"{index:05d}.done.json"


def _shard_rejects(out: Path, index: int) -> Path:
    return out / SHARD_DIR / f"{index:05d}.rejects.jsonl"


def _clear_shard(out: Path, index: int) -> None:
    """Remove what an interrupted attempt at shard `index` may have left."""
    for path in [*(out / DATA_DIR).glob(f"*-{index:05d}-of-*"), *(out / SHARD_DIR).glob(f"{index:05d}.*")]:
        path.unlink()


@functools.lru_cache(maxsize=2)
def _splitter(spec: SplitterSpec) -> SplitBackend:
    return spec.build()  # once per worker process: a local LLM is loaded once


def run_shard(index: int, num_shards: int, studies: Sequence[Study], options: BuildOptions, out: Path, schema):
    """Build one shard (in a worker): rejects, then one parquet file per split, then the done marker (returned): the
    shard's studies, files, rejects, rows per split and rows per text source (`SplitResult.source`)."""
    rows, rejects = [], []
    for study in studies:
        study_rows, study_rejects = process_study(study, options, _splitter(options.splitter))
        rows += study_rows
        rejects += study_rejects
    _atomic_write(_shard_rejects(out, index), _jsonl(rejects))
    by_split = defaultdict(list)
    for row in rows:
        by_split[row["split"]].append(row)
    files = []
    for split in SPLITS:
        if by_split[split]:
            files.append(f"{split}-{index:05d}-of-{num_shards:05d}.parquet")
            write_parquet(by_split[split], out / DATA_DIR / files[-1], schema)
    marker = {"shard": index, "studies": len(studies), "files": files, "rejects": len(rejects),
              "rows": {split: len(by_split[split]) for split in SPLITS if by_split[split]},
              "text_sources": dict(Counter(row["text_source"] for row in rows))}  # fmt: skip
    _atomic_write(_marker(out, index), json.dumps(marker, indent=1).encode())
    return marker


def _run_shards(todo: list[int], shards: list, options: BuildOptions, out: Path, executor, progress: bool) -> None:
    schema = features().arrow_schema
    bar = tqdm(total=len(todo), desc="PeXR shards", unit="shard", disable=not progress)
    with bar:
        if executor is None:
            for index in todo:
                run_shard(index, len(shards), shards[index], options, out, schema)
                bar.update(1)
            return
        futures = [executor.submit(run_shard, i, len(shards), shards[i], options, out, schema) for i in todo]
        try:
            for future in as_completed(futures):
                future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()  # shards already running finish and keep their markers
            raise


# ------------------------------------------------------------------------------------------------ state


def _read_state(out: Path) -> dict:
    path = out / STATE_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _write_state(out: Path, state: dict) -> None:
    _atomic_write(out / STATE_FILE, json.dumps(state, indent=1, sort_keys=True).encode())


def _clear_outputs(out: Path) -> None:
    for name in (DATA_DIR, SHARD_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (REJECTS_FILE, "stats.md", "stats.png"):
        (out / name).unlink(missing_ok=True)


def prepare_output(out: Path, salt: str | None, overwrite: bool) -> str:
    """Create the folder (clearing a previous build with `overwrite`) and return the salt: the given one (not
    stored), else the one saved in `build_state.json`, else a new random one, saved there."""
    (out / DATA_DIR).mkdir(parents=True, exist_ok=True)
    (out / SHARD_DIR).mkdir(exist_ok=True)
    state = _read_state(out)
    if overwrite:
        _clear_outputs(out)
        (out / DATA_DIR).mkdir()
        (out / SHARD_DIR).mkdir()
        state.pop("fingerprint", None)
    if not salt:  # a given salt is never stored; a saved one is kept (the fingerprint catches a mismatch)
        salt = state.get("salt") or secrets.token_hex(16)
        state["salt"] = salt
    _write_state(out, state)
    return salt


def _check_fingerprint(out: Path, fingerprint: dict) -> None:
    """Raise `BuildStateError` if the folder holds a build with another fingerprint; else record this one."""
    state = _read_state(out)
    previous = state.get("fingerprint")
    if previous is not None and previous != fingerprint:
        changed = sorted(key for key in {*previous, *fingerprint} if previous.get(key) != fingerprint.get(key))
        raise BuildStateError(
            f"{out} holds a build with other {', '.join(changed)}; resume with the same inputs, options and salt, "
            "or start over with overwrite=True (--overwrite) or another output folder"
        )
    state.update(fingerprint=fingerprint, complete=False)
    _write_state(out, state)


# ------------------------------------------------------------------------------------------------ builds


def _finish(out: Path, num_shards: int, scan_rejects: list[dict], tokenizer: str | None) -> None:
    """Merge the rejects (scan first, then shard by shard) and write the stats."""
    from pexr.stats import write_stats

    parts = [_jsonl(scan_rejects)] + [_shard_rejects(out, i).read_bytes() for i in range(num_shards)]
    _atomic_write(out / REJECTS_FILE, b"".join(parts))
    write_stats(out, tokenizer=tokenizer)
    state = _read_state(out)
    state["complete"] = True
    _write_state(out, state)


def _result(out: Path, num_shards: int, run: int, skipped: int, scan_rejects: list[dict]) -> BuildResult:
    rows, rejects = Counter(), Counter(record["reason"] for record in scan_rejects)
    done = [i for i in range(num_shards) if _marker(out, i).exists()]
    for index in done:
        rows.update(json.loads(_marker(out, index).read_text())["rows"])
        rejects.update(json.loads(line)["reason"] for line in _shard_rejects(out, index).read_text().splitlines())
    complete = len(done) == num_shards
    return BuildResult(out, num_shards, run, skipped, complete, dict(rows), dict(rejects))


class _Run(NamedTuple):
    max_shards: int | None
    progress: bool
    tokenizer: str | None


def _build(studies, scan_rejects, out: Path, salt: str, options: BuildOptions, executor, run: _Run) -> BuildResult:
    """Check the folder's fingerprint, build the pending shards, and finish when all are done."""
    fingerprint = {"format": FORMAT_VERSION, **options.fingerprint(), "inputs": sources.plan_digest(studies),
                   "salt_check": pseudonym("pexr-salt-check", salt)}  # fmt: skip
    _check_fingerprint(out, fingerprint)
    shards = [studies[i : i + options.shard_size] for i in range(0, len(studies), options.shard_size)]
    pending = [i for i in range(len(shards)) if not _marker(out, i).exists()]
    todo = pending if run.max_shards is None else pending[: run.max_shards]
    logger.info("%d studies in %d shards: %d done before, %d to build now", len(studies), len(shards),
                len(shards) - len(pending), len(todo))  # fmt: skip
    for index in todo:
        _clear_shard(out, index)
    _run_shards(todo, shards, options, out, executor, run.progress)
    result = _result(out, len(shards), len(todo), len(shards) - len(pending), scan_rejects)
    if result.complete:
        _finish(out, len(shards), scan_rejects, run.tokenizer)
    return result


@contextlib.contextmanager
def _executor(num_workers: int):
    if num_workers <= 1:
        yield None
        return
    with ProcessPoolExecutor(num_workers, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


def _options(options: BuildOptions | None, out: Path) -> BuildOptions:
    options = options or BuildOptions()
    if options.splitter.model is not None and options.splitter.cache_dir is None:  # default: cache in the output
        options = replace(options, splitter=replace(options.splitter, cache_dir=str(out / LLM_CACHE_DIR)))
    return options


def build_from_manifest(
    manifest: str | os.PathLike, output_dir: str | os.PathLike, *, options: BuildOptions | None = None,
    salt: str | None = None, num_workers: int = 1, progress: bool = True, overwrite: bool = False,
    max_shards: int | None = None, tokenizer: str | None = None,
) -> BuildResult:  # fmt: skip
    """Build from a manifest (see `pexr.sources`). `num_workers` processes build shards in parallel; `max_shards`
    stops after that many shards (a later call resumes); `tokenizer` (a path) gives the stats real token counts."""
    out = Path(output_dir)
    options, salt = _options(options, out), prepare_output(out, salt, overwrite)
    studies, rejects = sources.read_manifest(manifest, salt)
    workers = 1 if options.splitter.is_local_model else num_workers  # a local LLM runs once, in this process
    with _executor(workers) as executor:
        return _build(studies, rejects, out, salt, options, executor, _Run(max_shards, progress, tokenizer))


def build_from_dicom_tree(
    dicom_dir: str | os.PathLike, reports: str | os.PathLike, output_dir: str | os.PathLike, *,
    study_key: str = "AccessionNumber", options: BuildOptions | None = None, salt: str | None = None,
    num_workers: int = 1, progress: bool = True, overwrite: bool = False, max_shards: int | None = None,
    tokenizer: str | None = None,
) -> BuildResult:  # fmt: skip
    """Build from every DICOM file under `dicom_dir` and a report table CSV (see `pexr.sources`); other arguments
    as `build_from_manifest`. Headers are scanned by the same worker processes."""
    out = Path(output_dir)
    options, salt = _options(options, out), prepare_output(out, salt, overwrite)
    with _executor(num_workers) as executor:
        studies, rejects = sources.scan_dicom_tree(dicom_dir, reports, salt, study_key, executor)
        shard_executor = None if options.splitter.is_local_model else executor
        return _build(studies, rejects, out, salt, options, shard_executor, _Run(max_shards, progress, tokenizer))


__all__ = [
    "BuildOptions", "BuildResult", "BuildStateError", "DICOM_REJECT_REASONS", "SPLITS", "SplitterSpec",
    "build_from_dicom_tree", "build_from_manifest", "features", "load_image", "png16", "prepare_output",
    "process_study", "read_picture", "resize_longest", "run_shard", "split_of", "write_parquet",
]  # fmt: skip
