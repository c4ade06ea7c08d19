"""`pexr` command line (also `python -m pexr`): build PeXR triplets, their statistics, split one report, write
PeXR-mini as a demo input.

    pexr mini demo_in --patients 50 --image_size 128          # PeXR-mini as manifest.csv + images/*.png
    pexr build --manifest demo_in/manifest.csv --output_dir demo_out
    pexr build --dicom_dir /data/pacs --reports reports.csv --output_dir pexr_out --num_workers 16
    pexr stats demo_out --tokenizer emilyalsentzer/Bio_ClinicalBERT
    echo "Findings: Fracture of the distal radius. The hand is normal." | pexr split-report --parts wrist,hand
    accelerate launch train_accelerate.py --dataset_name demo_out

Reports are split by rules unless `--llm_model PATH` (a local transformers model) or `--llm_endpoint URL
--llm_model_name NAME` (an OpenAI-compatible server you run; reports are sent there) is given.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from pathlib import Path

MINI_MANIFEST_COLUMNS = ("study_id", "patient_id", "report", "image_path", "body_part", "age_years", "reference_text")


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated fractions (train,validation,test): {text}")
    return values


def _add_splitter_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("report splitter (default: rules, no model)")
    group.add_argument("--llm_model", help="local instruction model (folder or Hub id) run with transformers")
    group.add_argument("--llm_endpoint", help="OpenAI-compatible server URL, e.g. http://localhost:8000/v1 (opt-in)")
    group.add_argument("--llm_model_name", help="the model the --llm_endpoint server serves")
    group.add_argument("--llm_cache", help="LLM answer cache folder (build default: OUTPUT_DIR/llm_cache)")
    group.add_argument("--llm_retries", type=int, default=2, help="retries on an invalid answer before the rules")
    group.add_argument("--llm_device", help="device of the --llm_model, e.g. cuda (default: transformers' choice)")


def _splitter(args: argparse.Namespace, parser: argparse.ArgumentParser):
    from pexr.build import SplitterSpec

    if args.llm_endpoint and args.llm_model:
        parser.error("give --llm_model (local) or --llm_endpoint with --llm_model_name, not both")
    if bool(args.llm_endpoint) != bool(args.llm_model_name):
        parser.error("--llm_endpoint and --llm_model_name go together")
    model = args.llm_model or args.llm_model_name
    return SplitterSpec(model, args.llm_endpoint, args.llm_cache, args.llm_retries, args.llm_device)


def _add_build(commands) -> None:
    p = commands.add_parser("build", help="build a parquet dataset of (image, text, body part) triplets")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="CSV/JSONL: study_id, patient_id, report, image_path[s], [body_part]")
    source.add_argument("--dicom_dir", help="folder tree of DICOM files (with --reports)")
    p.add_argument("--reports", help="report table CSV (study_key,report) for --dicom_dir")
    p.add_argument("--study_key", default="AccessionNumber", help="DICOM field that keys reports to studies")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_side", type=int, default=512, help="longest image side in pixels (never upscaled)")
    p.add_argument("--split", type=_fractions, default=(0.8, 0.1, 0.1), help="train,validation,test fractions")
    p.add_argument("--shard_size", type=int, default=256, help="studies per shard")
    p.add_argument("--num_workers", type=int, default=_cpu_count(), help="worker processes (default: all cores)")
    p.add_argument("--salt", default=os.environ.get("PEXR_SALT"), help="pseudonym secret (default: $PEXR_SALT, "
                   "else the one saved in OUTPUT_DIR/build_state.json, else a new random one)")  # fmt: skip
    p.add_argument("--max_age_years", type=float, default=18.0, help="reject patients this old or older")
    p.add_argument("--no_age_filter", action="store_true", help="keep every age")
    p.add_argument("--require_age", action="store_true", help="reject images whose age is unknown")
    p.add_argument("--overwrite", action="store_true", help="start over (keeps the saved salt)")
    p.add_argument("--max_shards", type=int, help="stop after this many shards (rerun to resume)")
    p.add_argument("--tokenizer", help="tokenizer for the stats' token counts (default: whitespace words)")
    p.add_argument("--no_progress", action="store_true")
    _add_splitter_args(p)


def _add_others(commands) -> None:
    p = commands.add_parser("stats", help="(re)write stats.md and stats.png of a build folder")
    p.add_argument("output_dir")
    p.add_argument("--tokenizer", help="count tokens with this tokenizer (default: whitespace words)")
    p.add_argument("--max_length", type=int, default=120, help="the text tower's max_length, marked on the plot")
    p = commands.add_parser("split-report", help="split one report into body-part texts, as JSON")
    p.add_argument("report", nargs="?", default="-", help="a text file, or - for stdin (default)")
    p.add_argument("--parts", required=True, help="comma-separated body parts, e.g. hip,knee")
    _add_splitter_args(p)
    p = commands.add_parser("mini", help="write PeXR-mini (synthetic) as a build input or a datasets folder")
    p.add_argument("output_dir")
    p.add_argument("--patients", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--format", choices=("manifest", "hf"), default="manifest",
                   help="manifest: manifest.csv + images/*.png (input for `pexr build`); hf: save_to_disk")  # fmt: skip


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pexr", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_build(commands)
    _add_others(commands)
    return parser


def run_build(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pexr.build import BuildOptions, BuildStateError, build_from_dicom_tree, build_from_manifest

    if args.dicom_dir and not args.reports:
        parser.error("--dicom_dir needs --reports")
    options = BuildOptions(
        max_side=args.max_side, split=args.split, max_age_years=None if args.no_age_filter else args.max_age_years,
        require_age=args.require_age, shard_size=args.shard_size, splitter=_splitter(args, parser),
    )  # fmt: skip
    common = dict(options=options, salt=args.salt, num_workers=args.num_workers, progress=not args.no_progress,
                  overwrite=args.overwrite, max_shards=args.max_shards, tokenizer=args.tokenizer)  # fmt: skip
    try:
        if args.manifest:
            result = build_from_manifest(args.manifest, args.output_dir, **common)
        else:
            result = build_from_dicom_tree(args.dicom_dir, args.reports, args.output_dir, study_key=args.study_key,
                                           **common)  # fmt: skip
    except BuildStateError as err:
        print(f"pexr build: {err}", file=sys.stderr)
        return 1
    rows = ", ".join(f"{split} {n}" for split, n in result.rows.items()) or "none"
    rejected = sum(result.rejects.values())
    print(f"{result.output_dir}: {result.num_shards} shards ({result.shards_run} built now, "
          f"{result.shards_skipped} done before); images kept: {rows}; rejected: {rejected}")  # fmt: skip
    for reason, count in sorted(result.rejects.items(), key=lambda item: -item[1]):
        print(f"  {count:6d}  {reason}")
    print("complete: see stats.md, rejects.jsonl" if result.complete else "incomplete: rerun the command to resume")
    return 0


def run_split_report(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from pexr.reports import split_report

    report = sys.stdin.read() if args.report == "-" else Path(args.report).read_text(encoding="utf-8")
    parts = [part.strip() for part in args.parts.split(",") if part.strip()]
    try:
        texts = split_report(report, parts, _splitter(args, parser).build())
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(texts, indent=2, ensure_ascii=False))
    return 0


def write_mini_manifest(output_dir: str | os.PathLike, data) -> Path:
    """Write a PeXR-mini `DatasetDict` as `manifest.csv` (one row per image, `reference_text` = the true text,
    ignored by the builder) and `images/<study>_<part>.png`; returns the manifest path."""
    out = Path(output_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, MINI_MANIFEST_COLUMNS)
        writer.writeheader()
        for split in data.values():
            for row in split:
                name = f"images/{row['study_id']}_{row['body_part']}.png"
                row["image"].save(out / name)
                writer.writerow({**{k: row[k] for k in MINI_MANIFEST_COLUMNS if k in row}, "image_path": name,
                                 "reference_text": row["text"]})  # fmt: skip
    return out / "manifest.csv"


def run_mini(args: argparse.Namespace) -> int:
    from pexr.synthetic import generate_pexr_mini

    data = generate_pexr_mini(num_patients=args.patients, seed=args.seed, image_size=args.image_size)
    if args.format == "hf":
        type(data)({name: split for name, split in data.items() if len(split)}).save_to_disk(args.output_dir)
        print(f"PeXR-mini ({sum(map(len, data.values()))} images) saved to {args.output_dir}")
    else:
        path = write_mini_manifest(args.output_dir, data)
        print(f"PeXR-mini manifest: {path} ({sum(map(len, data.values()))} images)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "build":
        return run_build(args, parser)
    if args.command == "split-report":
        return run_split_report(args, parser)
    if args.command == "mini":
        return run_mini(args)
    from pexr.stats import write_stats

    stats_path = Path(args.output_dir) / "stats.md"
    write_stats(args.output_dir, tokenizer=args.tokenizer, max_length=args.max_length)
    print(stats_path.read_text(encoding="utf-8"), end="")
    return 0
