"""`python -m eval`: run one evaluation task, or a suite of them.

    python -m eval TASK --model M --data NAME_OR_PATH [--split test] [--root DIR] [--option k=v ...]
                   [--data_option k=v ...] [--out DIR] [--update_model_card [CARD]]
    python -m eval suite CONFIG.json|CONFIG.yaml [--out DIR] [--update_model_card [CARD]]
    python -m eval list

`--data` is a data-set name (`eval.data.SETS`: pedi_cxr, pexr_mini, ...) or a path: a `save_to_disk` folder, or a
folder/CSV read by the "generic" adapter. Option values are JSON when they parse (`templates='["{label}"]'`,
`fraction=0.1`), else strings. A suite config (YAML needs PyYAML) is

    {"models": ["outputs/pedclip", {"spec": "openai/clip-vit-base-patch32", "name": "CLIP"}],
     "datasets": [{"name": "pexr_mini", "split": "test", "options": {"num_patients": 600}}],
     "tasks": [{"task": "zero_shot", "options": {...}},
               {"task": "linear_probe", "name": "linear_probe_1pct", "options": {"fraction": 0.01},
                "datasets": ["pexr_mini"]}],
     "options": {"n_resamples": 1000}, "out": "results", "cache_dir": null, "device": null}

and runs every model x data set x task (a task's `datasets` / `models` lists restrict it; its `name`, default the
task, tells apart several runs of one task). Each run gives a record {"model", "dataset", "split", "task",
"options", "metrics"} (plus "error" when it failed); the records go to `eval.report.write_results` (results.json,
results.md, ROC and routing plots) and, with `--update_model_card`, into a model card's model-index.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

from eval.adapters import load_adapter
from eval.registry import load_tasks, run_task


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_options(pairs: list[str] | None) -> dict:
    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"option {pair!r} is not key=value")
        options[key.strip()] = parse_value(value)
    return options


def load_data(spec: str, root: str | None = None, **options):
    """A `DatasetDict` (or `Dataset`) from a data-set name, a `save_to_disk` folder or a generic folder/CSV."""
    from eval import data as data_sets

    if spec in data_sets.SETS:
        return data_sets.load(spec, root=root, **options)
    path = Path(spec)
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        from datasets import load_from_disk

        return load_from_disk(str(path))
    if path.exists():
        if path.suffix == ".csv":
            return data_sets.load("generic", root=str(root or path.parent), csv=str(path), **options)
        return data_sets.load("generic", root=str(path), **options)
    raise SystemExit(f"--data {spec!r}: not a known data set ({', '.join(data_sets.SETS)}) nor an existing path")


def default_label_names(spec: str, root: str | None, data_options: dict) -> list[str] | None:
    from eval import data as data_sets

    if spec not in data_sets.SETS:
        return None
    try:
        return data_sets.label_names(spec, root=root, **data_options) or None
    except (TypeError, ValueError, FileNotFoundError):
        return None


def run_one(adapter, data, dataset_name: str, task: str, split: str, options: dict, name: str | None = None) -> dict:
    """One result record; a failing task gives a record with "error" (and empty metrics). A zero_shot record also
    carries "scores" (`eval.tasks.zero_shot.zero_shot_scores`), which the report draws as ROC curves."""
    record = {"model": adapter.name, "dataset": dataset_name, "split": split, "task": name or task}
    record["options"] = {k: v for k, v in options.items() if k != "label_names"}
    start = time.perf_counter()
    try:
        record["metrics"] = run_task(task, adapter, data, split=split, **options)
        if task == "zero_shot":  # the per-image scores, for the report's ROC curves (not written to results.json)
            from eval.tasks.common import select_split
            from eval.tasks.zero_shot import zero_shot_scores

            record["scores"] = zero_shot_scores(adapter, select_split(data, split), **options)
    except Exception as error:  # noqa: BLE001 -- a suite reports the failure and goes on
        record["metrics"], record["error"] = {}, f"{type(error).__name__}: {error}"
        record["traceback"] = traceback.format_exc(limit=8)
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def write_records(records: list[dict], out_dir: str | Path) -> Path:
    """`eval.report.write_results` when it exists, else results.json; returns the folder."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        from eval.report import write_results
    except ModuleNotFoundError as error:
        if error.name != "eval.report":
            raise
        (out_dir / "results.json").write_text(json.dumps(records, indent=2, default=float))
    else:
        write_results(records, out_dir)
    return out_dir


def read_config(path: str | Path) -> dict:
    """A suite config from JSON, or YAML (.yaml/.yml, needs PyYAML)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError as error:
            raise SystemExit(f"{path}: reading YAML needs PyYAML (pip install pyyaml), or use JSON") from error
        return yaml.safe_load(text)
    return json.loads(text)


def _entries(items, key: str) -> list[dict]:
    """Normalise a config list: a plain string is {key: string}."""
    return [{key: item} if isinstance(item, str) else dict(item) for item in items or []]


def _applies(entry: dict, field: str, value: str) -> bool:
    allowed = entry.get(field)
    return allowed is None or value in allowed


def run_suite(config: dict, out_dir: str | Path | None = None, log=print) -> list[dict]:
    """Run every model x data set x task of `config` (see the module docstring); write and return the records."""
    models, sets = _entries(config.get("models"), "spec"), _entries(config.get("datasets"), "name")
    tasks = _entries(config.get("tasks"), "task")
    if not (models and sets and tasks):
        raise SystemExit("a suite needs non-empty models, datasets and tasks lists")
    common = dict(config.get("options") or {})
    if config.get("cache_dir"):
        common.setdefault("cache_dir", config["cache_dir"])
    loaded = {}
    records = []
    for model in models:
        adapter = load_adapter(
            model["spec"], device=model.get("device", config.get("device")), name=model.get("name"),
            trust_remote_code=bool(model.get("trust_remote_code", False)), revision=model.get("revision"),
            router_mode=model.get("router_mode"),
        )  # fmt: skip
        for data in sets:
            label = data.get("label", data["name"])
            if label not in loaded:
                loaded[label] = load_data(data["name"], data.get("root"), **(data.get("options") or {}))
            for task in tasks:
                if not (_applies(task, "datasets", label) and _applies(task, "models", adapter.name)):
                    continue
                options = {**common, **(data.get("task_options") or {}), **(task.get("options") or {})}
                names = default_label_names(data["name"], data.get("root"), data.get("options") or {})
                if names and "label_names" not in options:
                    options["label_names"] = names
                split = task.get("split", data.get("split", "test"))
                record = run_one(adapter, loaded[label], label, task["task"], split, options, task.get("name"))
                log(_summary(record))
                records.append(record)
    out_dir = out_dir or config.get("out")
    if out_dir:
        write_records(records, out_dir)
    return records


def _summary(record: dict) -> str:
    head = f"{record['model']} | {record['dataset']}/{record['split']} | {record['task']}"
    if "error" in record:
        return f"{head}: FAILED {record['error']}"
    main = [k for k in record["metrics"] if not k.endswith(("_ci_low", "_ci_high"))][:6]
    return head + ": " + ", ".join(f"{k}={record['metrics'][k]:.4f}" for k in main)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", help="a task name, 'suite' or 'list'")
    parser.add_argument("config", nargs="?", help="suite: the JSON/YAML config")
    parser.add_argument("--model", help="PedCLIP or transformers CLIP-like folder / Hub id")
    parser.add_argument("--name", help="display name of the model (default: the folder name)")
    parser.add_argument("--data", help="data-set name or path")
    parser.add_argument("--split", default="test")
    parser.add_argument("--root", help="data-set root folder")
    parser.add_argument("--option", action="append", metavar="K=V", help="task option (repeatable)")
    parser.add_argument("--data_option", action="append", metavar="K=V", help="data-set option (repeatable)")
    parser.add_argument("--out", help="write results.json (and the report) here")
    parser.add_argument("--cache_dir", help="embedding cache (default $PEDCLIP_EVAL_CACHE or ~/.cache/pedclip/eval)")
    parser.add_argument("--device")
    parser.add_argument("--router_mode", help="PedCLIP routing at evaluation (default: the config's)")
    parser.add_argument("--revision", help="Hub revision of --model")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--update_model_card", nargs="?", const="model_card.md", metavar="CARD",
                        help="write the results into this model card's model-index (default model_card.md)")
    return parser


def run_single(args) -> int:
    if not (args.model and args.data):
        raise SystemExit(f"python -m eval {args.task} needs --model and --data")
    options = parse_options(args.option)
    if args.cache_dir:
        options.setdefault("cache_dir", args.cache_dir)
    data_options = parse_options(args.data_option)
    names = default_label_names(args.data, args.root, data_options)
    if names and "label_names" not in options:
        options["label_names"] = names
    adapter = load_adapter(
        args.model, device=args.device, name=args.name, trust_remote_code=args.trust_remote_code,
        revision=args.revision, router_mode=args.router_mode,
    )  # fmt: skip
    data = load_data(args.data, args.root, **data_options)
    record = run_one(adapter, data, Path(args.data).name, args.task, args.split, options)
    print(json.dumps({k: v for k, v in record.items() if k != "scores"}, indent=2, default=float))
    if args.out:
        write_records([record], args.out)
    update_card(args.update_model_card, [record])
    return 1 if "error" in record else 0


def update_card(card_path: str | None, records: list[dict]) -> None:
    """With --update_model_card: the successful records' metrics into the card's model-index."""
    good = [record for record in records if "error" not in record]
    if card_path and good:
        from eval.report import update_model_card

        update_model_card(card_path, good)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "list":
        from eval import data as data_sets

        print("tasks:", ", ".join(sorted(load_tasks())))
        print("data sets:", ", ".join(data_sets.SETS))
        return 0
    if args.task == "suite":
        if not args.config:
            raise SystemExit("python -m eval suite CONFIG.json|yaml")
        config = read_config(args.config)
        if args.cache_dir:
            config["cache_dir"] = args.cache_dir
        records = run_suite(config, args.out)
        update_card(args.update_model_card, records)
        return 1 if any("error" in r for r in records) else 0
    if args.task not in load_tasks():
        raise SystemExit(f"unknown task {args.task!r}; tasks: {', '.join(sorted(load_tasks()))}")
    return run_single(args)
