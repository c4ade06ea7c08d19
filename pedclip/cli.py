"""The `pedclip` command (also `python -m pedclip`).

    pedclip predict --model M --labels "normal,pneumonia" [--prompts FILE | --template T ...] PATH... [--out F.csv]
    pedclip embed --model M PATH... --out FILE.parquet [--texts FILE]
    pedclip push --model FOLDER --repo-id ORG/NAME [--dry-run --out DIR]      (see `pedclip.publish`)

PATHs are image files (PNG, JPEG, 16-bit PNG/TIFF, DICOM) and folders (searched recursively). A file that cannot be
read is listed on stderr and in the output's `error` column, and the run goes on. Exit status: 0 when at least one
file was read, 1 when none could be, 2 for a usage or model error (`push`: see `pedclip.publish`). See
`pedclip.predict` for what the columns hold.
"""

from __future__ import annotations

import argparse
import sys

from pedclip import predict as runner
from pedclip.images import find_images
from pedclip.publish import add_push_parser


def _subparser(subparsers, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with the arguments `predict` and `embed` share."""
    parser = subparsers.add_parser(name, help=summary, description=description)
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files and folders (recursive)")
    parser.add_argument("--model", required=True, help="a PedCLIP model folder or Hub id")
    parser.add_argument("--batch_size", type=int, default=32, help="images per forward pass (default 32)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--router_mode", choices=("soft", "topk"), default=None,
                        help="MoBE routing (default: the model config's)")  # fmt: skip
    return parser


def add_predict_parser(subparsers) -> None:
    parser = _subparser(subparsers, "predict", "zero-shot classification of X-ray files",
                        "Zero-shot classification: one row per file with the gate's body part and a score per label.")
    parser.add_argument("--labels", help='comma-separated labels, e.g. "normal,pneumonia" (underscores read as '
                        "spaces in prompts); optional with a prompts file that maps labels to prompts")  # fmt: skip
    parser.add_argument("--prompts", metavar="FILE", help="templates (.txt: one per line; .json/.yaml: a list) or "
                        "a .json/.yaml mapping label -> prompt(s)")  # fmt: skip
    parser.add_argument("--template", "--templates", dest="templates", action="append", metavar="T",
                        help='a prompt template with {label} (repeat for an ensemble; default: pedclip.prompts\' '
                        "DEFAULT_TEMPLATES)")  # fmt: skip
    parser.add_argument("--score", choices=runner.SCORES, default="softmax",
                        help="softmax: over the labels, sums to 1 (default); pos_neg: per label, against negative "
                        "prompts (multi-label)")  # fmt: skip
    parser.add_argument("--negative_template", "--negative_templates", dest="negative_templates",
                        action="append", metavar="T", help="a negative template for --score pos_neg (repeatable)")
    parser.add_argument("--body_part_prompts", action="store_true",
                        help="fill {body_part} in the templates with the gate's body part of each image")
    parser.add_argument("--out", help="output .csv, .json or .jsonl (default: CSV to stdout)")
    parser.set_defaults(func=run_predict)


def add_embed_parser(subparsers) -> None:
    parser = _subparser(subparsers, "embed", "image (and text) embeddings to Parquet",
                        "Normalised image embeddings with the gate's body part, one row per file, to Parquet.")
    parser.add_argument("--out", required=True, help="output .parquet file")
    parser.add_argument("--texts", metavar="FILE", help="a text file, one text per line: their embeddings go to "
                        "OUT with .texts.parquet for .parquet")  # fmt: skip
    parser.set_defaults(func=run_embed)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pedclip", description="PedCLIP: pediatric X-ray vision-language model.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_predict_parser(subparsers)
    add_embed_parser(subparsers)
    add_push_parser(subparsers)
    return parser


def _files(paths: list[str]) -> list:
    files = find_images(paths)
    if not files:
        raise ValueError(f"no image or DICOM files under {', '.join(paths)}")
    return files


def _report(rows: list[dict], command: str) -> int:
    """List the unread files on stderr; 1 when no file was read, else 0."""
    failed = [row for row in rows if row["error"] is not None]
    for row in failed:
        print(f"pedclip {command}: skipped {row['file']}: {row['error']}", file=sys.stderr)
    if len(failed) == len(rows):
        print(f"pedclip {command}: error: none of the {len(rows)} files could be read", file=sys.stderr)
        return 1
    if failed:
        print(f"pedclip {command}: {len(rows) - len(failed)} files read, {len(failed)} skipped", file=sys.stderr)
    return 0


def run_predict(args: argparse.Namespace) -> int:
    runner.check_table_path(args.out)
    prompts = runner.read_prompts_file(args.prompts) if args.prompts else None
    if prompts is not None and args.templates:
        raise ValueError("give --prompts or --template, not both")
    labels = runner.parse_labels(args.labels, prompts)
    scorer = runner.LabelScorer(labels, prompts or args.templates, args.score, args.negative_templates,
                                args.body_part_prompts)  # fmt: skip
    files = _files(args.paths)
    encoder = runner.load_encoder(args.model, args.device, args.router_mode)
    rows = runner.predict(encoder, files, scorer, args.batch_size)
    runner.write_table(rows, args.out)
    return _report(rows, "predict")


def run_embed(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".parquet"):
        raise ValueError(f"{args.out}: the output must be a .parquet file")
    texts = runner.read_texts(args.texts) if args.texts else None
    files = _files(args.paths)
    encoder = runner.load_encoder(args.model, args.device, args.router_mode)
    metadata = runner.embedding_metadata(encoder, args.model)
    rows = runner.embed(encoder, files, args.batch_size)
    runner.write_parquet(rows, args.out, metadata)
    if texts is not None:
        runner.write_parquet(runner.embed_texts(encoder, texts), runner.texts_path(args.out), metadata)
    return _report(rows, "embed")


def main(argv: list[str] | None = None) -> int:
    """Run the `pedclip` command with `argv` (default: `sys.argv[1:]`); returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ImportError, OSError, ValueError) as exc:
        print(f"pedclip {args.command}: error: {exc}", file=sys.stderr)
        return 2
