"""Reports of evaluation results: JSON, Markdown tables shaped like the paper's Tables 1-2, ROC and routing plots,
and the model card's `model-index` metadata.

A result record (one per task run, `eval.cli.run_one`) is
`{"model", "dataset", "split", "task", "metrics": {flat floats, each m with m_ci_low / m_ci_high}}`, optionally
with "error" (a failed run) and two non-metric entries the report draws:
- "scores": `eval.tasks.zero_shot.zero_shot_scores(...)`'s dict {"names", "labels" [N, L], "scores" [N, L],
  optional "mask" [N, L]} -> a ROC curve PNG per record (`plot_roc`). Tasks return flat floats only, so whoever
  wants curves attaches it: `record["scores"] = zero_shot_scores(adapter, split, label_names, **options)`.
- routing matrices need nothing extra: the `routing` task's `routing/<body part>/<expert>` metrics are the
  matrix (`eval.tasks.routing.routing_matrix`) -> a heatmap PNG per routing record (`plot_routing`).

`write_results(records, out_dir)` writes results.json (the records, "scores" left out, NaN as null), results.md
and the PNGs under roc/ and routing/. Markdown: one table per task and headline metric, models as rows, data sets as
columns, cells "0.912 (0.881-0.940)" (value and 95% CI; 1 decimal for values >= 10, e.g. MAE in months). Headline
metrics are the summary keys: `auc/macro` but not `auc/<label>` (a key "<m>/<x>" is a detail when "<m>/macro" or
"<m>" is also a key) and no key with two slashes (the routing matrix cells); `details=True` adds one table per task
and data set with the detail metrics as columns.

`update_model_card(card_path, records)` writes the headline metrics of one model into model_card.md's YAML front
matter as a Hub `model-index` (huggingface_hub `EvalResult`s; the CI goes in each metric's `args` as ci_low /
ci_high), keeping the card's other metadata and its body text; the body's Markdown results table is refreshed only
between the markers `RESULTS_START` / `RESULTS_END` when the card has them. With no card yet it writes a minimal one
(library_name transformers, pipeline_tag zero-shot-image-classification, license, tags) with the markers.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
ROUTING_PREFIX = "routing/"  # the routing task's matrix cells: routing/<body part>/<expert>
RESULTS_START, RESULTS_END = "<!-- pedclip-eval-results:start -->", "<!-- pedclip-eval-results:end -->"
TASK_TYPES = {
    "zero_shot": "zero-shot-image-classification", "linear_probe": "image-classification",
    "finetune": "image-classification", "concept_alignment": "image-classification",
    "segmentation": "image-segmentation",
}  # fmt: skip  (any other task: image-feature-extraction)
DATASET_NAMES = {
    "pedi_cxr": "Pedi-CXR (VinDr-PCXR)", "chd_cxr": "CHD-CXR", "grazpedwri_dx": "GRAZPEDWRI-DX",
    "rsna_boneage": "RSNA Pediatric Bone Age", "pexr_mini": "PeXR-mini (synthetic)",
}  # fmt: skip
METRIC_TYPES = {"auc": "roc_auc", "mae": "mae", "dice": "dice", "gate_accuracy": "accuracy", "mean_recall": "recall"}


# ------------------------------------------------------------------------------------------------ metrics


def is_ci(key: str) -> bool:
    return key.endswith((CI_LOW, CI_HIGH))


def headline_keys(metrics: dict) -> list[str]:
    """The summary metrics of a flat metrics dict, in its order (see the module docstring)."""
    keys = [k for k in metrics if not is_ci(k)]
    present = set(keys)

    def detail(key: str) -> bool:
        if key.count("/") >= 2:
            return True
        root, _, leaf = key.partition("/")
        return bool(leaf) and leaf != "macro" and (root in present or f"{root}/macro" in present)

    return [k for k in keys if not detail(k)]


def detail_keys(metrics: dict) -> list[str]:
    headline = set(headline_keys(metrics))
    return [k for k in metrics if not is_ci(k) and k not in headline and k.count("/") < 2]


def _finite(value) -> bool:
    return isinstance(value, (int, float, np.floating, np.integer)) and math.isfinite(float(value))


def format_cell(metrics: dict, key: str) -> str:
    """'0.912 (0.881-0.940)': the value and its CI; 1 decimal from 10 up; '–' when missing or not finite."""
    value = metrics.get(key)
    if not _finite(value):
        return "–"
    digits = 1 if abs(value) >= 10 else 3
    low, high = metrics.get(key + CI_LOW), metrics.get(key + CI_HIGH)
    ci = f" ({low:.{digits}f}-{high:.{digits}f})" if _finite(low) and _finite(high) else ""
    return f"{value:.{digits}f}{ci}"


# ------------------------------------------------------------------------------------------------ Markdown


def _column_names(records: list[dict]) -> dict[tuple[str, str], str]:
    """(dataset, split) -> column header: the data set's name, plus the split when it appears with several."""
    pairs = list(dict.fromkeys((r["dataset"], r["split"]) for r in records))
    splits_of = {d: [s for dd, s in pairs if dd == d] for d, _ in pairs}
    return {(d, s): d if len(splits_of[d]) == 1 else f"{d} ({s})" for d, s in pairs}


def _table(records: list[dict], columns: dict, cell) -> list[str]:
    models = list(dict.fromkeys(r["model"] for r in records))
    by_cell = {(r["model"], r["dataset"], r["split"]): r for r in records}
    lines = ["| model | " + " | ".join(columns.values()) + " |", "| --- |" + " --- |" * len(columns)]
    for model in models:
        cells = [cell(by_cell.get((model, *pair))) for pair in columns]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _record_cell(key: str):
    def cell(record):
        if record is None:
            return "–"
        return "failed" if record.get("error") else format_cell(record.get("metrics", {}), key)

    return cell


def markdown_tables(records: list[dict], details: bool = False) -> str:
    """The Markdown report: per task, one table per headline metric (models x data sets); failures listed."""
    lines = ["# Evaluation results", "", "Cells: value (95% bootstrap CI). Rows: models; columns: data sets.", ""]
    for task in dict.fromkeys(r["task"] for r in records):
        task_records = [r for r in records if r["task"] == task]
        keys = list(dict.fromkeys(k for r in task_records for k in headline_keys(r.get("metrics", {}))))
        for key in keys or [None]:
            lines += [f"## {task}" + (f" — {key}" if key else ""), ""]
            lines += _table(task_records, _column_names(task_records), _record_cell(key)) + [""]
        if details:
            lines += _detail_tables(task, task_records)
    failures = [r for r in records if r.get("error")]
    if failures:
        lines += ["## Failed runs", ""] + [f"- {r['model']} | {r['dataset']}/{r['split']} | {r['task']}: "
                                           f"{r['error']}" for r in failures] + [""]  # fmt: skip
    return "\n".join(lines)


def _detail_tables(task: str, records: list[dict]) -> list[str]:
    """Per data set: models x detail metrics (e.g. the per-label AUCs)."""
    lines = []
    for dataset, split in dict.fromkeys((r["dataset"], r["split"]) for r in records):
        subset = [r for r in records if (r["dataset"], r["split"]) == (dataset, split)]
        keys = list(dict.fromkeys(k for r in subset for k in detail_keys(r.get("metrics", {}))))
        if not keys:
            continue
        lines += [f"### {task} — {dataset} ({split}) details", "", "| model | " + " | ".join(keys) + " |",
                  "| --- |" + " --- |" * len(keys)]  # fmt: skip
        for r in subset:
            lines.append(f"| {r['model']} | " + " | ".join(format_cell(r.get("metrics", {}), k) for k in keys) + " |")
        lines.append("")
    return lines


# ------------------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global figure state, Agg canvas on save

    return Figure(figsize=(width, height), dpi=100)


def plot_roc(names: Sequence[str], labels, scores, path, mask=None, title: str | None = None) -> Path:
    """ROC curves (scikit-learn `roc_curve`), one per label with both classes among its rows (`mask[:, l]`,
    default all), AUC in the legend, chance diagonal; saved as PNG at `path`. Returns `path`."""
    from sklearn.metrics import roc_auc_score, roc_curve

    labels, scores = np.asarray(labels).astype(bool), np.asarray(scores, dtype=np.float64)
    labels, scores = labels.reshape(len(labels), -1), scores.reshape(len(scores), -1)
    mask = np.ones(labels.shape, bool) if mask is None else np.asarray(mask, bool).reshape(labels.shape)
    figure = _figure(6, 5.5)
    axes = figure.add_subplot()
    for index, name in enumerate(names):
        y, s = labels[mask[:, index], index], scores[mask[:, index], index]
        if y.all() or not y.any():
            continue
        fpr, tpr, _ = roc_curve(y, s)
        axes.plot(fpr, tpr, lw=1.5, label=f"{name} (AUC {roc_auc_score(y, s):.3f})")
    axes.plot([0, 1], [0, 1], ls="--", color="grey", lw=1)
    axes.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.01),
             title=title or "ROC")  # fmt: skip
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="lower right", fontsize="small")
    return _save(figure, path)


def plot_routing(matrix, body_parts: Sequence[str], experts: Sequence[str], path, title: str | None = None) -> Path:
    """Heatmap of expert usage per body part (`matrix` [parts, experts], rows = mean gate weight or top-1 share
    of the part's images), values annotated, saved as PNG at `path`. Returns `path`."""
    matrix = np.asarray(matrix, dtype=np.float64)
    if matrix.shape != (len(body_parts), len(experts)):
        raise ValueError(f"matrix shape {matrix.shape} != ({len(body_parts)} body parts, {len(experts)} experts)")
    figure = _figure(1.2 + 0.45 * len(experts), 1.2 + 0.4 * len(body_parts))
    axes = figure.add_subplot()
    image = axes.imshow(np.nan_to_num(matrix), vmin=0, vmax=max(1.0, float(np.nanmax(matrix, initial=0))),
                        cmap="viridis", aspect="auto")  # fmt: skip
    axes.set_xticks(range(len(experts)), labels=list(experts), rotation=60, ha="right", fontsize="small")
    axes.set_yticks(range(len(body_parts)), labels=list(body_parts), fontsize="small")
    axes.set(xlabel="expert", ylabel="body part (images)", title=title or "expert usage")
    if matrix.size <= 600:
        for (row, col), value in np.ndenumerate(matrix):
            if np.isfinite(value) and value >= 0.005:
                axes.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                          color="black" if value > 0.6 else "white")  # fmt: skip
    figure.colorbar(image, ax=axes, fraction=0.04)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png")
    return path


def _slug(*parts: str) -> str:
    return "__".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p)).strip("-") for p in parts)


def plot_records(records: list[dict], out_dir) -> list[Path]:
    """The ROC PNG of each record with "scores" and the routing PNG of each record with routing metrics."""
    out_dir, paths = Path(out_dir), []
    for r in records:
        slug, title = _slug(r["model"], r["dataset"], r["split"], r["task"]), f"{r['model']} — {r['dataset']}"
        if r.get("scores"):
            s = r["scores"]
            paths.append(plot_roc(s["names"], s["labels"], s["scores"], out_dir / "roc" / f"{slug}.png",
                                  s.get("mask"), title))  # fmt: skip
        if any(k.startswith(ROUTING_PREFIX) for k in r.get("metrics", {})):
            from eval.tasks.routing import routing_matrix  # imports the task stack: only when needed

            matrix, parts, experts = routing_matrix(r["metrics"])
            paths.append(plot_routing(matrix, parts, experts, out_dir / "routing" / f"{slug}.png", title))
    return paths


# ------------------------------------------------------------------------------------------------ files


def _json_safe(value):
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_results(records: list[dict], out_dir, details: bool = False, plots: bool = True) -> dict[str, Path]:
    """results.json, results.md and (with `plots`) the ROC / routing PNGs under `out_dir`; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = plot_records(records, out_dir) if plots else []
    stored = [{k: v for k, v in r.items() if k != "scores"} for r in records]
    json_path, md_path = out_dir / "results.json", out_dir / "results.md"
    json_path.write_text(json.dumps(_json_safe(stored), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    text = markdown_tables(stored, details)
    if figures:
        text += "\n## Figures\n\n" + "\n".join(f"- [{p.relative_to(out_dir)}]({p.relative_to(out_dir).as_posix()})"
                                               for p in figures) + "\n"  # fmt: skip
    md_path.write_text(text, encoding="utf-8")
    return {"json": json_path, "markdown": md_path, **{f"figure{i}": p for i, p in enumerate(figures)}}


# ------------------------------------------------------------------------------------------------ model card


def eval_results(records: list[dict], model_name: str):
    """huggingface_hub `EvalResult`s of `model_name`'s headline metrics (finite values; failed runs skipped)."""
    from huggingface_hub import EvalResult

    results = []
    for r in records:
        if r["model"] != model_name or r.get("error"):
            continue
        metrics = r.get("metrics", {})
        for key in headline_keys(metrics):
            if not _finite(metrics[key]):
                continue
            low, high = metrics.get(key + CI_LOW), metrics.get(key + CI_HIGH)
            args = {"ci_low": float(low), "ci_high": float(high)} if _finite(low) and _finite(high) else None
            results.append(EvalResult(
                task_type=TASK_TYPES.get(r["task"], "image-feature-extraction"), task_name=r["task"],
                dataset_type=r["dataset"], dataset_name=DATASET_NAMES.get(r["dataset"], r["dataset"]),
                dataset_split=r["split"], metric_type=METRIC_TYPES.get(key.split("/")[0], key.split("/")[0]),
                metric_name=key, metric_value=float(metrics[key]), metric_args=args,
            ))  # fmt: skip
    return results


def _key(result) -> tuple:
    return result.task_name, result.task_type, result.dataset_type, result.dataset_split, result.metric_name


def _model_name(records: list[dict], card_name: str | None, model_name: str | None) -> str:
    if model_name or card_name:
        return model_name or card_name
    models = sorted({r["model"] for r in records})
    if len(models) != 1:
        raise ValueError(f"the records hold several models {models}: pass model_name= to pick the card's model")
    return models[0]


def minimal_card_text(model_name: str, license: str = "apache-2.0") -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(library_name="transformers", pipeline_tag="zero-shot-image-classification",
                         license=license, tags=["pedclip", "vision-language", "medical-imaging", "pediatrics",
                                                "x-ray", "mixture-of-experts"])  # fmt: skip
    body = (f"# {model_name}\n\nPedCLIP, a CLIP-style vision-language model for pediatric X-rays with a Mixture of "
            f"Body-part Experts.\n\n## Evaluation results\n\n{RESULTS_START}\n{RESULTS_END}\n")  # fmt: skip
    return f"---\n{data.to_yaml()}\n---\n{body}"


def update_model_card(card_path, records: list[dict], model_name: str | None = None, license: str = "apache-2.0"):
    """Write `model_name`'s results (default: the card's model-index name, else the records' only model) into the
    card's model-index, replacing entries of the same task, data set, split and metric and keeping the others, its
    other metadata and its body; returns the `huggingface_hub.ModelCard` written to `card_path`."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    existing = card_path.read_text(encoding="utf-8") if card_path.exists() else None
    card = ModelCard(existing) if existing is not None else None
    name = _model_name(records, card.data.model_name if card else None, model_name)
    card = card or ModelCard(minimal_card_text(name, license))
    new = eval_results(records, name)
    keys = {_key(result) for result in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if _key(r) not in keys] + new
    card.data.model_name = name
    if RESULTS_START in card.text and RESULTS_END in card.text:
        head, rest = card.text.split(RESULTS_START, 1)
        table = markdown_tables([r for r in records if r["model"] == name]).split("\n", 2)[2]  # without the title
        table = table.strip().replace("\n## ", "\n### ")
        card.text = f"{head}{RESULTS_START}\n{table}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}"
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(str(card), encoding="utf-8")
    return card
