"""The Hub model card: render the `model_card.md` template into a model folder's README.md, and write evaluation
results into a card's `model-index` -- one writer for `pedclip push`, train_accelerate.py and `python -m eval`.

Result records are eval's (`eval/report.py`): `{"model", "dataset", "split", "task", "metrics": {flat floats, each m
with m_ci_low / m_ci_high}}`, optionally "error". The trainer's flat `eval_results.json` (`{"zero_shot_auc": ...,
"routing_accuracy": ..., "image_to_text_R@1": ...}`) converts into such records (`trainer_records`).

`set_eval_results(card, records, name)` puts the headline metrics (`headline_keys`) of model `name` into the card's
model-index as huggingface_hub `EvalResult`s (the 95% CI in each metric's `args` as ci_low / ci_high), replacing
entries of the same task, data set, split and metric and keeping the others, and redraws the Markdown tables between
`RESULTS_START` / `RESULTS_END` from the whole model-index (one table per task: the model as the row, a column per
metric and data set, cells "0.912 (0.881-0.940)").

`render_card` fills the template's `{{ name }}` markers: model_name, repo_id, architecture (from the config),
training_data and data_limitations (from the run's `training_stats.json`; "not recorded" without it). The template's
metadata (license, library_name, pipeline_tag, tags, any model-index already in it) is kept; `license` overrides.
No torch import here: the config is read by attribute.
"""

from __future__ import annotations

import json
import math
import numbers
import re
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# The template: at the repo root in a checkout or editable install; setup.py's data_files in a regular install.
TEMPLATE_PATHS = (Path(__file__).resolve().parents[1] / "model_card.md", Path(sys.prefix) / "share/pedclip/model_card.md")
TRAINING_STATS_FILE = "training_stats.json"
DEFAULT_LICENSE = "apache-2.0"
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"
RESULTS_START, RESULTS_END = "<!-- pedclip-eval-results:start -->", "<!-- pedclip-eval-results:end -->"
TASK_TYPES = {
    "zero_shot": "zero-shot-image-classification", "linear_probe": "image-classification",
    "finetune": "image-classification", "concept_alignment": "image-classification",
    "segmentation": "image-segmentation",
}  # fmt: skip  (any other task: image-feature-extraction)
DATASET_NAMES = {
    "pedi_cxr": "Pedi-CXR (VinDr-PCXR)", "chd_cxr": "CHD-CXR", "grazpedwri_dx": "GRAZPEDWRI-DX",
    "rsna_boneage": "RSNA Pediatric Bone Age", "pexr_mini": "PeXR-mini (synthetic)",
    "local_training_data": "held-out test split of the training data",
}  # fmt: skip
METRIC_TYPES = {"auc": "roc_auc", "mae": "mae", "dice": "dice", "gate_accuracy": "accuracy", "mean_recall": "recall"}
# The trainer's eval_results.json keys -> (eval task, eval metric name); retrieval keys and per-finding AUCs by rule.
TRAINER_METRICS = {"zero_shot_auc": ("zero_shot", "auc/macro"), "routing_accuracy": ("routing", "gate_accuracy")}
TRAINER_RETRIEVAL = re.compile(r"(image_to_text|text_to_image)_(R@\d+)")
MARKER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
TEMPLATE_NOTE = re.compile(r"<!-- template:.*?-->\n", re.S)
ROUTING_WORDS = {
    "soft": "`soft`: the paper's dense softmax mixture of all experts",
    "label": "`label`: each image uses the expert of its body-part label",
    "topk": "`topk`: the {k} largest gate weights, renormalised",
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ metrics


def is_ci(key: str) -> bool:
    return key.endswith((CI_LOW, CI_HIGH))


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and math.isfinite(float(value))


def headline_keys(metrics: dict) -> list[str]:
    """The summary metrics of a flat metrics dict, in its order: not the CIs, not "<m>/<x>" when "<m>" or
    "<m>/macro" is also a key (e.g. per-label AUCs), no key with two slashes (routing matrix cells)."""
    keys = [k for k in metrics if not is_ci(k)]
    present = set(keys)

    def detail(key: str) -> bool:
        if key.count("/") >= 2:
            return True
        root, _, leaf = key.partition("/")
        return bool(leaf) and leaf != "macro" and (root in present or f"{root}/macro" in present)

    return [k for k in keys if not detail(k)]


def format_value(value, low=None, high=None) -> str:
    """'0.912 (0.881-0.940)': the value and its CI; 1 decimal from 10 up; '–' when missing or not finite."""
    if not is_finite_number(value):
        return "–"
    digits = 1 if abs(value) >= 10 else 3
    ci = f" ({low:.{digits}f}-{high:.{digits}f})" if is_finite_number(low) and is_finite_number(high) else ""
    return f"{value:.{digits}f}{ci}"


# ------------------------------------------------------------------------------------------------ model-index


def eval_results(records: list[dict], model_name: str):
    """huggingface_hub `EvalResult`s of `model_name`'s headline metrics (finite values; failed runs skipped). The
    task also goes in `dataset_config`: the Hub groups results by task type, data set, config and split, so two
    tasks of one type on one data set (linear probe and fine-tune, routing and retrieval) would merge into one entry
    under the first task's name."""
    from huggingface_hub import EvalResult

    results = []
    for r in records:
        if r["model"] != model_name or r.get("error"):
            continue
        metrics = r.get("metrics", {})
        for key in headline_keys(metrics):
            if not is_finite_number(metrics[key]):
                continue
            low, high = metrics.get(key + CI_LOW), metrics.get(key + CI_HIGH)
            has_ci = is_finite_number(low) and is_finite_number(high)
            args = {"ci_low": float(low), "ci_high": float(high)} if has_ci else None
            root = key.split("/")[0]
            results.append(EvalResult(
                task_type=TASK_TYPES.get(r["task"], "image-feature-extraction"), task_name=r["task"],
                dataset_type=r["dataset"], dataset_name=DATASET_NAMES.get(r["dataset"], r["dataset"]),
                dataset_config=r["task"], dataset_split=r["split"], metric_type=METRIC_TYPES.get(root, root),
                metric_name=key, metric_value=float(metrics[key]), metric_args=args,
            ))  # fmt: skip
    return results


def _result_key(result) -> tuple:
    return result.task_name, result.task_type, result.dataset_type, result.dataset_split, result.metric_name


def results_table(results: list, model_name: str) -> str:
    """Markdown: per task of `results` (`EvalResult`s), one table with `model_name` as the row and a column per
    metric and data set."""
    lines = ["Cells: value (95% bootstrap CI where recorded).", ""]
    for task in dict.fromkeys(r.task_name or r.task_type for r in results):
        cells = [r for r in results if (r.task_name or r.task_type) == task]
        labels = _dataset_labels(cells)
        one = len(labels) == 1
        names = [r.metric_name if one else f"{labels[r.dataset_type, r.dataset_split]}: {r.metric_name}"
                 for r in cells]  # fmt: skip
        values = [format_value(r.metric_value, *((r.metric_args or {}).get(k) for k in ("ci_low", "ci_high")))
                  for r in cells]  # fmt: skip
        title = f"### {task}" + (f" — {labels[cells[0].dataset_type, cells[0].dataset_split]}, "
                                  f"{cells[0].dataset_split} split" if one else "")  # fmt: skip
        lines += [title, "", "| model | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(cells),
                  f"| {model_name} | " + " | ".join(values) + " |", ""]  # fmt: skip
    return "\n".join(lines).strip()


def _dataset_labels(results: list) -> dict[tuple, str]:
    """(data set, split) -> its label: the data set's name, plus the split when it appears with several."""
    names = {(r.dataset_type, r.dataset_split): r.dataset_name or r.dataset_type for r in results}
    count = Counter(dataset for dataset, _ in names)
    return {(d, s): name + (f" ({s})" if count[d] > 1 else "") for (d, s), name in names.items()}


def set_eval_results(card, records: list[dict], model_name: str) -> None:
    """Merge `model_name`'s results into `card` (a huggingface_hub `ModelCard`): see the module docstring.
    `ValueError` when `records` hold results but none of `model_name` (a card names one model)."""
    models = sorted({r["model"] for r in records})
    if models and model_name not in models:
        raise ValueError(f"the results are of the models {models}, none is the card's model {model_name!r}")
    new = eval_results(records, model_name)
    keys = {_result_key(result) for result in new}
    card.data.eval_results = [r for r in card.data.eval_results or [] if _result_key(r) not in keys] + new
    card.data.model_name = model_name
    if RESULTS_START in card.text and RESULTS_END in card.text:
        head, rest = card.text.split(RESULTS_START, 1)
        table = results_table(card.data.eval_results, model_name)
        card.text = f"{head}{RESULTS_START}\n{table}\n{RESULTS_END}{rest.split(RESULTS_END, 1)[1]}"


def pick_model(records: list[dict], *preferred: str | None) -> str:
    """The first of `preferred` that is given, else the records' only model; `ValueError` when they hold several."""
    for name in preferred:
        if name:
            return name
    models = sorted({r["model"] for r in records})
    if len(models) != 1:
        raise ValueError(f"the records hold several models {models}: pass model_name= to pick the card's model")
    return models[0]


def minimal_card_text(model_name: str, license: str = DEFAULT_LICENSE) -> str:
    """A new card for `model_name` with nothing known but its name: the template, its unknown parts "not recorded"."""
    return str(render_card(model_name, license=license))


def update_model_card(card_path, records: list[dict], model_name: str | None = None, license: str = DEFAULT_LICENSE):
    """Write `model_name`'s results (default: the card's model-index name, else the records' only model) into the
    card at `card_path` (created from the template when missing), keeping its other metadata, results and body;
    returns the `huggingface_hub.ModelCard` written."""
    from huggingface_hub import ModelCard

    card_path = Path(card_path)
    card = ModelCard(card_path.read_text(encoding="utf-8")) if card_path.exists() else None
    name = pick_model(records, model_name, card.data.model_name if card else None)
    card = card or ModelCard(minimal_card_text(name, license))
    set_eval_results(card, records, name)
    card_path.parent.mkdir(parents=True, exist_ok=True)
    card_path.write_text(str(card), encoding="utf-8")
    return card


# ------------------------------------------------------------------------------------------------ result files


def trainer_records(results: dict, model_name: str) -> list[dict]:
    """The trainer's flat eval_results.json as eval records (data set "pexr_mini" unless it names one)."""
    dataset, split, tasks = results.get("dataset", "pexr_mini"), results.get("split", "test"), {}
    for key, value in results.items():
        retrieval = TRAINER_RETRIEVAL.fullmatch(key)
        if key in TRAINER_METRICS:
            task, name = TRAINER_METRICS[key]
            tasks.setdefault(task, {})[name] = value
        elif retrieval:
            tasks.setdefault("retrieval", {})[f"{retrieval[1]}/{retrieval[2]}"] = value
        elif key == "zero_shot_auc_per_finding":
            tasks.setdefault("zero_shot", {}).update({f"auc/{finding}": auc for finding, auc in value.items()})
    return [{"model": model_name, "dataset": dataset, "split": split, "task": task, "metrics": metrics}
            for task, metrics in tasks.items()]  # fmt: skip


def load_eval_records(path, model_name: str) -> list[dict]:
    """Records from eval's results.json (a list of records) or a trainer eval_results.json (converted, named
    `model_name`); `ValueError` naming the file when it is neither."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: cannot read evaluation results: {error}") from error
    if isinstance(data, dict):
        records = trainer_records(data, model_name)
        if not records:
            raise ValueError(f"{path}: no known metric among {sorted(data)} (e.g. zero_shot_auc, routing_accuracy)")
        return records
    required = {"model", "dataset", "split", "task"}
    if isinstance(data, list) and all(isinstance(r, dict) and required <= r.keys() for r in data):
        return data
    raise ValueError(f"{path}: neither eval's results.json (a list of {sorted(required)} records) nor a trainer "
                     "eval_results.json (an object of metrics)")  # fmt: skip


# ------------------------------------------------------------------------------------------------ training stats


def describe_dataset(dataset_name: str | None) -> dict:
    """How a training run's data is named in the card: the embedded PeXR-mini set, a Hub id, or a local folder
    (never its path, which may name the institution)."""
    if dataset_name is None:
        return {"dataset": "pexr_mini", "description": "PeXR-mini, a synthetic pediatric X-ray set generated by "
                "`pexr mini` (no real patient images)", "synthetic": True}  # fmt: skip
    if Path(dataset_name).exists():
        return {"dataset": "local_training_data", "description": "a local (image, body-part text, body part) data set",
                "synthetic": False}  # fmt: skip
    return {"dataset": dataset_name, "description": f"the Hub data set `{dataset_name}`", "synthetic": False}


def training_statistics(body_parts: Iterable[str], dataset_name: str | None, **run) -> dict:
    """The numbers a card shows about a training run: the data set, train images per body part (most first) and
    the run's `run` numbers (steps, epochs, global_batch_size, ...)."""
    counts = Counter(str(part) for part in body_parts)
    per_part = dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    return {**describe_dataset(dataset_name), "train_images": sum(counts.values()), "images_per_body_part": per_part,
            **run}  # fmt: skip


def read_training_stats(folder) -> dict | None:
    path = Path(folder) / TRAINING_STATS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error


# ------------------------------------------------------------------------------------------------ rendering


def fill_template(text: str, values: dict[str, str], source="template") -> str:
    """Replace every `{{ name }}` marker of `text` by `values[name]`; `KeyError` naming markers without a value."""
    missing = sorted(set(MARKER.findall(text)) - values.keys())
    if missing:
        raise KeyError(f"{source}: no value for the markers {missing}")
    return MARKER.sub(lambda match: str(values[match[1]]), text)


def architecture_section(config, num_parameters: int | None = None) -> str:
    if config is None:
        return "Architecture: not recorded."
    v, t = config.vision_config, config.text_config
    routing = ROUTING_WORDS[v.router_mode].format(k=v.router_top_k)
    layers = ", ".join(str(i) for i in v.moe_layers)
    rows = [
        ("image encoder", f"ViT: {v.num_hidden_layers} layers, width {v.hidden_size}, MLP {v.intermediate_size}, "
                          f"{v.num_attention_heads} heads, {v.image_size} px input, {v.patch_size} px patches"),
        ("MoBE", f"layer(s) {layers} (0-based) hold {v.num_experts} experts each, one per body part; default routing "
                 f"{routing}; the gate reads the [IMG] token (`gate_input={v.gate_input}`)"),
        ("text encoder", f"BERT: {t.num_hidden_layers} layers, width {t.hidden_size}, {t.num_attention_heads} heads, "
                         f"vocabulary {t.vocab_size}, reports padded/truncated to {t.max_length} tokens"),
        ("embedding", f"{config.projection_dim}-d shared image-text space, learned temperature"),
        ("parameters", f"{num_parameters / 1e6:.1f} M" if num_parameters else "not recorded"),
        ("body parts (expert order)", ", ".join(config.body_parts)),
    ]  # fmt: skip
    return "\n".join(["| component | configuration |", "| --- | --- |"] + [f"| {a} | {b} |" for a, b in rows])


def _plural(count: int, word: str) -> str:
    return f"{count:,} {word}{'' if count == 1 else 's'}"


def training_data_section(stats: dict | None) -> str:
    if not stats:
        return "Training data statistics: not recorded (no `training_stats.json` was saved with this model)."
    counts = stats.get("images_per_body_part") or {}
    total = stats.get("train_images") or sum(counts.values())
    lines = [f"- Data: {stats.get('description', 'not recorded')}.",
             f"- Training images: {total:,} over {_plural(len(counts), 'body part')} (train split)."]  # fmt: skip
    schedule = []
    if "steps" in stats and "epochs" in stats:
        schedule.append(f"{_plural(stats['steps'], 'optimisation step')} over {_plural(stats['epochs'], 'epoch')}")
    if "global_batch_size" in stats:
        schedule.append(f"global batch of {_plural(stats['global_batch_size'], 'image')}")
    forced, epochs = stats.get("teacher_forcing_epochs"), stats.get("epochs")
    if forced is not None:
        schedule.append("label routing (teacher forcing) throughout" if epochs is not None and forced >= epochs
                        else f"label routing (teacher forcing) for the first {_plural(forced, 'epoch')}, then the "
                        "gate")  # fmt: skip
    if schedule:
        lines.append("- Schedule: " + ", ".join(schedule) + ".")
    table = ["", "| body part | images | share |", "| --- | ---: | ---: |"]
    table += [f"| {part} | {n:,} | {n / max(total, 1):.1%} |" for part, n in counts.items()]
    return "\n".join(lines + (table if counts else []))


def data_limitations(stats: dict | None) -> str:
    """The limitations that depend on this model's training data, as Markdown list items."""
    if not stats:
        return "- The training data of this checkpoint (body parts, counts) was not recorded."
    items, counts = [], stats.get("images_per_body_part") or {}
    if stats.get("synthetic"):
        items.append("- **Demo model**: trained on synthetic PeXR-mini images only. It has never seen a real X-ray "
                     "and must not be used on patient images; it exists to test the code end to end.")  # fmt: skip
    if counts and max(counts.values()) > min(counts.values()):
        (top, most), (rare, least) = (f(counts.items(), key=lambda c: c[1]) for f in (max, min))
        items.append(f"- In this model's training data {top} has {most:,} images and {rare} only {least:,} "
                     f"({most / least:.1f}x fewer); body parts absent from its table were never seen.")
    return "\n".join(items)


def render_card(
    model_name: str, config=None, *, stats: dict | None = None, records: Iterable[dict] = (),
    repo_id: str | None = None, license: str = DEFAULT_LICENSE, num_parameters: int | None = None, template=None,
):  # fmt: skip
    """The model card (`huggingface_hub.ModelCard`) from the template (default `model_card.md` at the repo root):
    markers filled from `config` (a `PedCLIPConfig`), `stats` (training statistics) and `repo_id`; `records` (eval
    records of `model_name`) merged into the model-index and the results table."""
    from huggingface_hub import ModelCard

    candidates = [Path(template)] if template else list(TEMPLATE_PATHS)
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        raise FileNotFoundError(f"model card template not found at {', '.join(map(str, candidates))}")
    values = {
        "model_name": model_name, "repo_id": repo_id or model_name, "license": license,
        "architecture": architecture_section(config, num_parameters), "training_data": training_data_section(stats),
        "data_limitations": data_limitations(stats),
    }  # fmt: skip
    text = fill_template(TEMPLATE_NOTE.sub("", path.read_text(encoding="utf-8"), count=1), values, path)
    card = ModelCard(re.sub(r"\n{3,}", "\n\n", text))
    card.data.license = license
    records = list(records)
    if records or card.data.eval_results:
        set_eval_results(card, records, model_name)
    return card
