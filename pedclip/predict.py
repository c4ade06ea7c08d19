"""What `pedclip predict` and `pedclip embed` do: read image files, embed them with a PedCLIP model, score them
against label prompts, and write the tables. The command line itself is `pedclip.cli`.

- Model: `load_encoder(spec)` loads a local folder or Hub id (`PedCLIPModel` / `PedCLIPProcessor`, no remote code).
- Images: `pedclip.images` (`find_images`, `load_image`). A file that cannot be read or processed becomes a row whose
  `error` says why ("<ExceptionType>: <message>"); its other values are empty and the run goes on.
- Body part: the gate's prediction, the argmax of the softmax of the mean of `gate_logits` over the MoBE layers, named
  by `config.body_parts` (`body_part_probability` is that softmax's maximum); empty for a model without MoBE layers.
- Scores (`LabelScorer`): prompt ensembles from `pedclip.prompts` (the same code as eval's zero-shot task).
  "softmax" (default): CLIP's softmax over the labels of `logit_scale * cosine`, which sums to 1 per image and
  equals transformers' zero-shot pipeline with the same single template. "pos_neg": CheXzero's per-label softmax
  over (positive prompts, negative prompts), independent per label (multi-label findings).
- Prompt files (`read_prompts_file`): `.txt`, one template per line (blank lines and lines starting with "#"
  skipped); `.json`/`.yaml`/`.yml`, a list of templates, or a mapping label -> prompt or list of prompts (each
  label's own ensemble; `{label}` and `{body_part}` are filled in them as in templates).
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import is_offline_mode
from transformers import AutoConfig

from modeling_pedclip import PedCLIPModel, mean_gate_logits
from pedclip.images import load_image
from processing_pedclip import PedCLIPProcessor
from pedclip.prompts import (
    BODY_PART_NEGATIVE_TEMPLATES, BODY_PART_TEMPLATES, DEFAULT_NEGATIVE_TEMPLATES, DEFAULT_TEMPLATES, format_prompts,
    label_text, positive_negative_scores, prompt_ensembles, softmax_scores,
)  # fmt: skip

ROW_COLUMNS = ("file", "body_part", "body_part_probability")  # then one column per label (predict), then "error"
RESERVED_COLUMNS = (*ROW_COLUMNS, "error")
SCORES = ("softmax", "pos_neg")
TABLE_SUFFIXES = (".csv", ".json", ".jsonl")

# ------------------------------------------------------------------------------------------------ model


def load_encoder(spec: str, device: str | None = None, router_mode: str | None = None) -> PedCLIPEncoder:
    """A `PedCLIPEncoder` for a local PedCLIP folder or Hub id (read from the local cache when offline). A model that
    cannot be found raises `OSError`, another kind of model `ValueError`, both naming `spec`."""
    try:
        config = AutoConfig.from_pretrained(spec)  # `import pedclip` registered PedCLIP: no remote code
    except OSError as exc:
        if Path(spec).is_dir():
            raise OSError(f"{spec}: not a model folder: {exc}") from exc
        where = "the local Hub cache (HF_HUB_OFFLINE is set)" if is_offline_mode() else "the Hub"
        raise OSError(f"{spec}: no local model folder of that name, and not loadable from {where}: {exc}") from exc
    if config.model_type != "pedclip":
        raise ValueError(f"{spec}: a {config.model_type!r} model; pedclip predict/embed need a PedCLIP model")
    model = PedCLIPModel.from_pretrained(spec, config=config)
    return PedCLIPEncoder(model, PedCLIPProcessor.from_pretrained(spec), device, router_mode)


class PedCLIPEncoder:
    """A PedCLIP model and processor on `device` (default: cuda if available, else cpu), in eval mode: image
    preprocessing, normalised image embeddings with gate probabilities, and normalised text embeddings
    (`embed_texts`, what `pedclip.prompts` needs). `router_mode` (default: the config's) is used for every image."""

    def __init__(self, model, processor, device: str | None = None, router_mode: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.processor, self.router_mode = processor, router_mode
        self.body_parts = list(model.config.body_parts)

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.detach().exp())

    def pixel_values(self, image) -> np.ndarray:
        """`[3, H, W]` float32: the PedCLIP image processor's output for one image."""
        return self.processor.image_processor(image)["pixel_values"][0]

    @torch.inference_mode()
    def encode(self, pixel_values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(`[B, D]` L2-normalised float32 image embeddings, `[B, E]` gate probabilities: the softmax of the mean gate
        logits over the MoBE layers, or None for a model without MoBE layers)."""
        pixels = torch.as_tensor(pixel_values, device=self.device)
        output = self.model.get_image_features(pixels, router_mode=self.router_mode)
        embeds = torch.nn.functional.normalize(output.pooler_output.float(), dim=-1).cpu().numpy()
        if not output.gate_logits:
            return embeds, None
        return embeds, mean_gate_logits(output.gate_logits).softmax(-1).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """`[N, D]` L2-normalised float32 text embeddings (each batch padded to its longest text)."""
        chunks = []
        for start in range(0, len(texts), batch_size):
            inputs = self.processor(text=list(texts[start : start + batch_size]), padding=True, return_tensors="pt")
            features = self.model.get_text_features(**inputs.to(self.device)).pooler_output
            chunks.append(torch.nn.functional.normalize(features.float(), dim=-1).cpu().numpy())
        return np.concatenate(chunks) if chunks else np.zeros((0, self.model.config.projection_dim), np.float32)


# ------------------------------------------------------------------------------------------------ images


@dataclass
class ImageRecord:
    """One file's result: its normalised embedding and gate probabilities, or why it could not be read."""

    file: str
    embedding: np.ndarray | None = None
    gate_probabilities: np.ndarray | None = None
    error: str | None = None

    def body_part(self, body_parts: Sequence[str]) -> tuple[str | None, float | None]:
        """(the gate's body part, its probability), or (None, None) without gate probabilities."""
        if self.gate_probabilities is None:
            return None, None
        best = int(np.argmax(self.gate_probabilities))
        return body_parts[best], float(self.gate_probabilities[best])


def encode_files(
    encoder: PedCLIPEncoder, files: Sequence[str | os.PathLike], batch_size: int = 32, progress: bool | None = None
) -> Iterator[list[ImageRecord]]:
    """For each batch of `files` (in order), its `ImageRecord`s; a file that fails to load or preprocess gets its
    error instead. `progress`: a tqdm bar on stderr (None: only on a terminal)."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    with tqdm(total=len(files), unit="image", disable=None if progress is None else not progress) as bar:
        for start in range(0, len(files), batch_size):
            records, pixels = [], []
            for path in files[start : start + batch_size]:
                records.append(ImageRecord(str(path)))
                try:
                    pixels.append(encoder.pixel_values(load_image(path)))
                except Exception as exc:  # readers raise OSError, ValueError, SyntaxError, EOFError, struct.error...
                    records[-1].error = f"{type(exc).__name__}: {exc}"
            _fill(encoder, [record for record in records if record.error is None], pixels)
            bar.update(len(records))
            yield records


def _fill(encoder: PedCLIPEncoder, records: list[ImageRecord], pixels: list[np.ndarray]) -> None:
    if not records:
        return
    embeds, gates = encoder.encode(np.stack(pixels))
    for index, record in enumerate(records):
        record.embedding = embeds[index]
        record.gate_probabilities = None if gates is None else gates[index]


# ------------------------------------------------------------------------------------------------ prompts


def read_prompts_file(path: str | os.PathLike) -> list[str] | dict[str, list[str]]:
    """Templates (a list) or per-label prompts (label -> list) from a .txt, .json, .yaml or .yml file (see the module
    docstring). A malformed file raises `ValueError` naming it."""
    import yaml

    path = Path(path)
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".yaml", ".yml"):
        raise ValueError(f"{path}: expected a .txt, .json, .yaml or .yml prompts file")
    if suffix == ".txt":
        return _prompts_content([line.strip() for line in text.splitlines() if line.strip()[:1] not in ("", "#")], path)
    try:
        content = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: not valid {suffix[1:].upper()}: {exc}") from exc
    return _prompts_content(content, path)


def _prompts_content(content, path: Path) -> list[str] | dict[str, list[str]]:
    def strings(value) -> list[str] | None:
        values = [value] if isinstance(value, str) else value
        ok = isinstance(values, list) and values and all(isinstance(item, str) for item in values)
        return list(values) if ok else None

    if isinstance(content, Mapping) and content:
        prompts = {str(label): strings(value) for label, value in content.items()}
        bad = [label for label, value in prompts.items() if value is None]
        if bad:
            raise ValueError(f"{path}: label(s) {bad} need a prompt or a non-empty list of prompts")
        return prompts
    if isinstance(content, list) and strings(content):
        return content
    raise ValueError(f"{path}: expected a non-empty list of templates or a mapping label -> prompts")


def parse_labels(labels: str | Sequence[str] | None, prompts=None) -> list[str]:
    """The label names: `labels` ("a,b,c" or a list), else the keys of a per-label `prompts` mapping. Empty,
    duplicate or reserved names (`RESERVED_COLUMNS`), and labels a per-label mapping lacks, raise `ValueError`."""
    if labels is None and not isinstance(prompts, Mapping):
        raise ValueError('give the labels (e.g. --labels "normal,pneumonia"), or a prompts file mapping labels to '
                         "prompts")
    if labels is None:
        names = list(prompts)
    else:
        names = [name.strip() for name in (labels.split(",") if isinstance(labels, str) else labels)]
    if not names or not all(names):
        raise ValueError(f"labels {labels!r}: expected non-empty names separated by commas")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    clashes = [name for name in names if name in RESERVED_COLUMNS]
    if duplicates or clashes:
        raise ValueError(f"labels {names}: duplicate {duplicates} or reserved names {clashes} (the output's columns)")
    missing = [name for name in names if isinstance(prompts, Mapping) and name not in prompts]
    if missing:
        raise ValueError(f"labels {missing} have no prompts in the prompts file (it has {list(prompts)})")
    return names


def check_templates(templates: Sequence[str], what: str, need_label: bool, body_part_prompts: bool) -> None:
    """Each template must fill with `label` and `body_part` only, name `{label}` when `need_label`, and name
    `{body_part}` only with `body_part_prompts`; else `ValueError` naming the template."""
    for template in templates:
        try:
            template.format(label="", body_part="")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"{what} {template!r}: only {{label}} and {{body_part}} can be filled ({exc!r})") from exc
        if need_label and "{label}" not in template:
            raise ValueError(f"{what} {template!r} has no {{label}}: every label would get the same prompt")
        if "{body_part}" in template and not body_part_prompts:
            raise ValueError(f"{what} {template!r} names {{body_part}}: use body part prompts (--body_part_prompts)")


class LabelScorer:
    """Zero-shot scores of image embeddings for `labels` (see the module docstring). `templates`: a list of templates
    shared by every label (default: `pedclip.prompts.DEFAULT_TEMPLATES`, or `BODY_PART_TEMPLATES` with
    `body_part_prompts`), or a mapping label -> its own prompts. `score` "pos_neg" uses `negative_templates` (default
    `DEFAULT_NEGATIVE_TEMPLATES` / `BODY_PART_NEGATIVE_TEMPLATES`). With `body_part_prompts`, `{body_part}` is the
    gate's body part of each image. Prompt embeddings are computed once per body part. Arguments are checked here,
    before any model is needed."""

    def __init__(self, labels: Sequence[str], templates=None, score: str = "softmax", negative_templates=None,
                 body_part_prompts: bool = False):  # fmt: skip
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        if negative_templates and score != "pos_neg":
            raise ValueError('negative templates are used only with score "pos_neg"')
        self.labels, self.body_part_prompts = list(labels), body_part_prompts
        self.templates = templates or list(BODY_PART_TEMPLATES if body_part_prompts else DEFAULT_TEMPLATES)
        if isinstance(self.templates, Mapping):
            for label in self.labels:
                check_templates(self.templates[label], f"prompt of {label!r}", False, body_part_prompts)
        else:
            check_templates(self.templates, "template", True, body_part_prompts)
        self.negatives = None
        if score == "pos_neg":
            self.negatives = negative_templates or list(
                BODY_PART_NEGATIVE_TEMPLATES if body_part_prompts else DEFAULT_NEGATIVE_TEMPLATES
            )
            check_templates(self.negatives, "negative template", True, body_part_prompts)
        self._embeddings: dict[str | None, tuple[np.ndarray, np.ndarray | None]] = {}

    def _prompt_lists(self, templates, body_part: str | None) -> list[list[str]]:
        shared = not isinstance(templates, Mapping)
        return [
            format_prompts(label_text(label), templates if shared else templates[label], body_part)
            for label in self.labels
        ]

    def label_embeddings(self, encoder, body_part: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """(`[L, D]` positive prompt ensembles, `[L, D]` negative ones or None), computed once per body part."""
        if body_part not in self._embeddings:
            positive = prompt_ensembles(encoder, self._prompt_lists(self.templates, body_part))
            negative = None
            if self.negatives is not None:
                negative = prompt_ensembles(encoder, self._prompt_lists(self.negatives, body_part))
            self._embeddings[body_part] = positive, negative
        return self._embeddings[body_part]

    def scores(self, encoder, image_embeds: np.ndarray, body_parts: Sequence[str | None] | None = None) -> np.ndarray:
        """`[N, L]` scores of `image_embeds` (`body_parts`: each image's, needed with `body_part_prompts`)."""
        if not self.body_part_prompts:
            return self._scores(encoder, image_embeds, None)
        if body_parts is None or None in body_parts:
            raise ValueError("body part prompts need the gate's body part: this model has no MoBE layers")
        out = np.zeros((len(image_embeds), len(self.labels)), np.float32)
        for part in sorted(set(body_parts)):
            rows = np.asarray([p == part for p in body_parts])
            out[rows] = self._scores(encoder, image_embeds[rows], part)
        return out

    def _scores(self, encoder, image_embeds: np.ndarray, body_part: str | None) -> np.ndarray:
        positive, negative = self.label_embeddings(encoder, body_part)
        if negative is None:
            return softmax_scores(image_embeds, positive, encoder.logit_scale)
        return positive_negative_scores(image_embeds, positive, negative)


# ------------------------------------------------------------------------------------------------ predict and embed


def _row(record: ImageRecord, body_parts: Sequence[str]) -> dict:
    part, probability = record.body_part(body_parts)
    return {"file": record.file, "body_part": part, "body_part_probability": probability}


def predict(
    encoder: PedCLIPEncoder, files: Sequence, scorer: LabelScorer, batch_size: int = 32, progress: bool | None = None
) -> list[dict]:
    """One row per file, in order: `file`, `body_part`, `body_part_probability`, one score per label (named by the
    label), `error` (None when read; else the reason, and None scores)."""
    rows = []
    for records in encode_files(encoder, files, batch_size, progress):
        read = [record for record in records if record.error is None]
        parts = [record.body_part(encoder.body_parts)[0] for record in read]
        scores = iter(scorer.scores(encoder, np.stack([r.embedding for r in read]), parts) if read else ())
        for record in records:
            values = next(scores).tolist() if record.error is None else [None] * len(scorer.labels)
            rows.append({**_row(record, encoder.body_parts), **dict(zip(scorer.labels, values)), "error": record.error})
    return rows


def embed(encoder: PedCLIPEncoder, files: Sequence, batch_size: int = 32, progress: bool | None = None) -> list[dict]:
    """One row per file, in order: `file`, `body_part`, `body_part_probability`, `embedding` (`[D]` normalised
    float32), `gate_probabilities` (`[E]`, in `config.body_parts` order; None without MoBE layers), `error`."""
    rows = []
    for records in encode_files(encoder, files, batch_size, progress):
        for record in records:
            rows.append({
                **_row(record, encoder.body_parts), "embedding": record.embedding,
                "gate_probabilities": record.gate_probabilities, "error": record.error,
            })  # fmt: skip
    return rows


def embedding_metadata(encoder: PedCLIPEncoder, model: str) -> dict:
    """What `pedclip embed` stores with its tables: the model, router mode, body parts and logit scale."""
    router_mode = encoder.router_mode or encoder.model.config.vision_config.router_mode
    return {"model": model, "router_mode": router_mode, "body_parts": encoder.body_parts,
            "logit_scale": encoder.logit_scale}  # fmt: skip


def read_texts(path: str | os.PathLike) -> list[str]:
    """The non-blank lines of a text file, stripped; a file without any raises `ValueError`."""
    texts = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"{path}: no texts (expected one text per line)")
    return texts


def embed_texts(encoder: PedCLIPEncoder, texts: Sequence[str], batch_size: int = 64) -> list[dict]:
    """One row per text: `text`, `embedding` (`[D]` normalised float32)."""
    return [{"text": t, "embedding": e} for t, e in zip(texts, encoder.embed_texts(texts, batch_size))]


# ------------------------------------------------------------------------------------------------ output files


def check_table_path(path: str | os.PathLike | None) -> None:
    """None (CSV to stdout) or a path ending in one of `TABLE_SUFFIXES`; else `ValueError`."""
    if path is not None and Path(path).suffix.lower() not in TABLE_SUFFIXES:
        raise ValueError(f"{path}: the output must end in {', '.join(TABLE_SUFFIXES)} (or be omitted: CSV to stdout)")


def write_table(rows: list[dict], path: str | os.PathLike | None = None) -> None:
    """`rows` as CSV (to stdout when `path` is None; None values empty), JSON (a list of objects, None as null) or
    JSON lines, by the suffix of `path`."""
    check_table_path(path)
    suffix = Path(path).suffix.lower() if path is not None else ".csv"
    with open(path, "w", encoding="utf-8", newline="") if path is not None else _stdout() as handle:
        if suffix == ".json":
            json.dump(rows, handle, indent=1)
            handle.write("\n")
        elif suffix == ".jsonl":
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        else:
            columns = list(rows[0]) if rows else [*ROW_COLUMNS, "error"]
            writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)


class _stdout:
    """`sys.stdout` as a context manager that flushes but does not close it."""

    def __enter__(self):
        return sys.stdout

    def __exit__(self, *exc):
        sys.stdout.flush()


VECTOR_COLUMNS = ("embedding", "gate_probabilities")
FLOAT_COLUMNS = ("body_part_probability",)


def write_parquet(rows: list[dict], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`rows` (same keys each) as a Parquet file: vectors as list<float32>, probabilities float32, the rest strings
    (None is null); `metadata` is stored as JSON under the schema metadata key "pedclip"."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError("writing Parquet needs pyarrow: pip install pyarrow") from exc

    def column_type(name: str):
        if name in VECTOR_COLUMNS:
            return pa.list_(pa.float32())
        return pa.float32() if name in FLOAT_COLUMNS else pa.string()

    columns = list(rows[0]) if rows else []
    table = pa.table({name: pa.array([row[name] for row in rows], type=column_type(name)) for name in columns})
    if metadata is not None:
        table = table.replace_schema_metadata({"pedclip": json.dumps(metadata)})
    pq.write_table(table, path)


def texts_path(path: str | os.PathLike) -> Path:
    """Where `pedclip embed --texts` writes the text table: FILE.parquet -> FILE.texts.parquet."""
    return Path(path).with_suffix(".texts.parquet")
