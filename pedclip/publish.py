"""`pedclip push`: build a Hub-ready folder from a trained PedCLIP folder, validate it, upload it as one commit.

    pedclip push --model outputs/pedclip --repo-id my-org/pedclip --dry-run --out hub-folder   # build, no network
    pedclip push --model outputs/pedclip --repo-id my-org/pedclip [--dtype bf16] [--max-shard-size 2GB]
                 [--eval-results results/results.json ...] [--public] [--license apache-2.0] [--token TOKEN]

The Hub folder is BUILT FRESH, never copied: model and processor are loaded from FOLDER with the installed PedCLIP
classes (weights that do not match the config are refused) and `save_pretrained` into a staging folder, which also
applies `--dtype` and the `--max-shard-size` sharding and writes the three code files; the model card README.md is
rendered from the `model_card.md` template (`pedclip.model_card`) with FOLDER's training_stats.json and the
evaluation results (`--eval-results`: eval's results.json or the trainer's eval_results.json; default
FOLDER/eval_results.json). Then the staging folder is validated: only allow-listed files (`pedclip.hub`; data,
report text, logs, checkpoints, caches never are), the model and processor load through the folder's OWN code (its
`auto_map` classes imported from the folder as remote code) and give the source model's outputs, and the card
parses with the Hub metadata. Only then `pedclip.hub.push_folder` creates the repo (private unless `--public`) and
uploads one commit. FOLDER is only read. Offline (HF_HUB_OFFLINE) the push refuses before building anything; when
the Hub cannot be reached it fails after the build and removes the staging folder; either way nothing half-done.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from pedclip.hub import disallowed_paths, offline_reason, push_folder
from pedclip.model_card import DEFAULT_LICENSE, load_eval_records, read_training_stats, render_card

logger = logging.getLogger("pedclip.publish")
DTYPES = ("bf16", "fp16", "fp32")
TRAINER_RESULTS_FILE = "eval_results.json"


def load_source(model_dir: Path, dtype: str | None = None):
    """The model (cast to `dtype` when given) and processor of a saved PedCLIP folder; `ValueError` when its
    weights do not match its config (missing, unexpected or mis-shaped tensors)."""
    import torch

    from modeling_pedclip import PedCLIPModel
    from processing_pedclip import PedCLIPProcessor

    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json, so not a saved PedCLIP model folder")
    model, info = PedCLIPModel.from_pretrained(model_dir, output_loading_info=True)
    problems = {kind: sorted(map(str, keys)) for kind, keys in info.items() if keys}
    if problems:
        raise ValueError(f"{model_dir}: the weights do not match the config: {problems}")
    if dtype:
        model = model.to({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype])
    return model.eval(), PedCLIPProcessor.from_pretrained(model_dir)


def gather_records(model_dir: Path, paths, eval_model: str | None = None) -> list[dict]:
    """The evaluation records of the model in `model_dir`, from `paths` (default: its eval_results.json). Eval
    names a model by its folder, as trainer results are named here; `eval_model` picks another name."""
    paths = [Path(p) for p in paths or []]
    default = model_dir / TRAINER_RESULTS_FILE
    paths = paths or ([default] if default.is_file() else [])
    records = [r for path in paths for r in load_eval_records(path, model_dir.name)]
    models = sorted({r["model"] for r in records})
    if not records:
        return []
    name = eval_model or (model_dir.name if model_dir.name in models or len(models) > 1 else models[0])
    if name not in models:
        raise ValueError(f"no evaluation results of model {name!r} in {[str(p) for p in paths]}; they hold {models}"
                         " (pick one with --eval-model)")  # fmt: skip
    return [r for r in records if r["model"] == name]


def build_hub_folder(
    model_dir, target, repo_id: str, *, dtype: str | None = None, max_shard_size: str = "2GB",
    eval_results=None, eval_model: str | None = None, license: str = DEFAULT_LICENSE,
) -> Path:  # fmt: skip
    """Build and validate the Hub folder of `model_dir` in `target` (an existing, empty folder); returns `target`."""
    model_dir, target = Path(model_dir), Path(target)
    records = gather_records(model_dir, eval_results, eval_model)
    model, processor = load_source(model_dir, dtype)
    model.save_pretrained(target, max_shard_size=max_shard_size)
    processor.save_pretrained(target)
    name = repo_id.rstrip("/").split("/")[-1]
    records = [{**r, "model": name} for r in records]
    card = render_card(name, model.config, stats=read_training_stats(model_dir), records=records, repo_id=repo_id,
                       license=license, num_parameters=model.num_parameters())  # fmt: skip
    (target / "README.md").write_text(str(card), encoding="utf-8")
    validate_hub_folder(target, model, processor)
    return target


def validate_hub_folder(folder: Path, model, processor) -> None:
    """Raise `ValueError` unless `folder` holds only allow-listed files, its card parses with the Hub metadata, and
    its model and processor, loaded through the folder's own code, give `model`'s outputs."""
    from huggingface_hub import ModelCard

    extra = disallowed_paths(folder)
    if extra:
        raise ValueError(f"{folder}: the built folder holds files a model repo must not get: {extra}")
    card = ModelCard((folder / "README.md").read_text(encoding="utf-8"))
    missing = [k for k in ("license", "library_name", "pipeline_tag", "tags") if not getattr(card.data, k, None)]
    if missing:
        raise ValueError(f"{folder / 'README.md'}: the model card lacks the metadata {missing}")
    reloaded_model, reloaded_processor = load_as_remote_code(folder)
    expected, got = probe_outputs(model, processor), probe_outputs(reloaded_model, reloaded_processor)
    for key in expected:
        if expected[key].shape != got[key].shape or not (expected[key] == got[key]).all():
            raise ValueError(f"{folder}: the saved model's {key} differ from the source model's")


def load_as_remote_code(folder: Path):
    """Model and processor of `folder` through the classes its config/processor `auto_map` name, imported from the
    folder's own code files (as `trust_remote_code` does on a machine without PedCLIP installed)."""
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    def remote_class(config_file: str, auto_class: str):
        reference = json.loads((folder / config_file).read_text(encoding="utf-8")).get("auto_map", {}).get(auto_class)
        if not reference:
            raise ValueError(f"{folder / config_file}: no auto_map entry for {auto_class}")
        return get_class_from_dynamic_module(reference, str(folder), local_files_only=True)

    model = remote_class("config.json", "AutoModel").from_pretrained(folder).eval()
    return model, remote_class("processor_config.json", "AutoProcessor").from_pretrained(folder)


def probe_outputs(model, processor) -> dict:
    """Logits and embeddings of one synthetic gray X-ray against two texts."""
    import numpy as np
    import torch
    from PIL import Image

    image = Image.fromarray(np.add.outer(np.arange(64), np.arange(48)).astype(np.uint8) * 2)
    inputs = processor(images=image, text=["normal study", "fracture"], body_parts=[model.config.body_parts[0]])
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.no_grad():
        out = model(**inputs)
    return {"logits": out.logits_per_image, "image embeddings": out.image_embeds, "text embeddings": out.text_embeds}


def dry_run(model_dir, out, repo_id: str, **options) -> Path:
    """Build the Hub folder of `model_dir` into `out` (missing or empty) without any network access; built in a
    sibling temporary folder and renamed into place, so a failure leaves `out` as it was."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out}: exists and is not an empty folder; the dry run writes a fresh Hub folder")
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir(parents=True)  # beside `out`, so the rename below stays on one file system
    try:
        build_hub_folder(model_dir, staging, repo_id, **options)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def push(model_dir, repo_id: str, *, private: bool = True, token: str | None = None, endpoint: str | None = None,
         **options) -> str:  # fmt: skip
    """Build the Hub folder of `model_dir` in a temporary staging folder and upload it to `repo_id` as one commit
    (private unless `private=False`); returns the commit URL. `RuntimeError` when offline (before building anything)
    or when the upload fails; the staging folder is removed either way."""
    reason = offline_reason()
    if reason:
        raise RuntimeError(f"cannot push {model_dir} to {repo_id}: {reason}")
    with tempfile.TemporaryDirectory(prefix="pedclip-push-") as staging:
        build_hub_folder(model_dir, staging, repo_id, **options)
        logger.info("built and validated %s; uploading to %s", model_dir, repo_id)
        return push_folder(staging, repo_id, private=private, token=token, endpoint=endpoint)


def add_push_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `push` subcommand to `subparsers` (of the `pedclip` command line)."""
    p = subparsers.add_parser("push", help="build, validate and upload a Hub model repo (private by default)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--model", required=True, help="the trained PedCLIP folder (e.g. train_accelerate.py's output)")
    p.add_argument("--repo-id", "--repo_id", required=True, help="ORG/NAME of the Hub model repo")
    p.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep the saved dtype)")
    p.add_argument("--max-shard-size", "--max_shard_size", default="2GB", help="largest weight shard (default 2GB)")
    p.add_argument("--eval-results", "--eval_results", nargs="+", metavar="FILE",
                   help="eval's results.json and/or the trainer's eval_results.json (default: MODEL/eval_results.json)")
    p.add_argument("--eval-model", "--eval_model",
                   help="the model name in --eval-results to publish (default: MODEL's folder name)")
    p.add_argument("--license", default=DEFAULT_LICENSE, help=f"the card's license (default {DEFAULT_LICENSE})")
    p.add_argument("--public", action="store_true", help="make a new repo public (default: private)")
    p.add_argument("--dry-run", "--dry_run", action="store_true", help="build and validate into --out; no network")
    p.add_argument("--out", help="where --dry-run writes the Hub folder (missing or empty)")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    p.set_defaults(func=run_push)
    return p


def run_push(args: argparse.Namespace) -> int:
    """The `push` subcommand: 0 on success; 1 with the reason on stderr otherwise."""
    options = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, eval_results=args.eval_results,
                   eval_model=args.eval_model, license=args.license)  # fmt: skip
    try:
        if args.dry_run:
            if not args.out:
                raise ValueError("--dry-run needs --out DIR, the folder to build")
            out = dry_run(args.model, args.out, args.repo_id, **options)
            print(f"dry run: built and validated {out} ({len(list(out.iterdir()))} files); nothing was uploaded")
        else:
            if args.out:
                raise ValueError("--out is only for --dry-run (a push builds in a temporary folder)")
            url = push(args.model, args.repo_id, private=not args.public, token=args.token, **options)
            print(f"pushed {args.model} to {args.repo_id} ({'public' if args.public else 'private'}): {url}")
    except (OSError, RuntimeError, ValueError, KeyError) as error:
        print(f"pedclip push: error: {error}", file=sys.stderr)
        return 1
    return 0

