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

`update_model_card(card_path, records)` writes the headline metrics of one model into a model card's `model-index`
and its results table (between `RESULTS_START` / `RESULTS_END`); it and the metric-key helpers live in
`pedclip.model_card` (one writer for eval, `pedclip push` and the trainer) and are re-exported here.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pedclip.model_card import (  # noqa: F401  (re-exported: eval's model-card and metric-key API)
    CI_HIGH,
    CI_LOW,
    DATASET_NAMES,
    METRIC_TYPES,
    RESULTS_END,
    RESULTS_START,
    TASK_TYPES,
    eval_results,
    format_value,
    headline_keys,
    is_ci,
    minimal_card_text,
    update_model_card,
)

ROUTING_PREFIX = "routing/"  # the routing task's matrix cells: routing/<body part>/<expert>


# ------------------------------------------------------------------------------------------------ metrics


def detail_keys(metrics: dict) -> list[str]:
    headline = set(headline_keys(metrics))
    return [k for k in metrics if not is_ci(k) and k not in headline and k.count("/") < 2]


def format_cell(metrics: dict, key: str) -> str:
    """'0.912 (0.881-0.940)': the value of `key` and its CI (`pedclip.model_card.format_value`)."""
    return format_value(metrics.get(key), metrics.get(key + CI_LOW), metrics.get(key + CI_HIGH))


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
