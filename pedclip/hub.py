"""Push a trained PedCLIP folder to the Hub: private by default, model files only (never data or report text)."""

import os
from fnmatch import fnmatch
from pathlib import Path

# What a model repo needs; checkpoints, logs and anything else in the output folder stay on this machine.
HUB_FILE_PATTERNS = (
    "config.json", "model*.safetensors", "model.safetensors.index.json", "*.py", "processor_config.json",
    "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
    "eval_results.json", "README.md",
)  # fmt: skip


def files_to_push(folder: str | Path) -> list[Path]:
    """The files of `folder` (top level only) that a push uploads."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and any(fnmatch(p.name, pat) for pat in HUB_FILE_PATTERNS))


def push_folder(folder: str | Path, repo_id: str, private: bool = True, token: str | None = None) -> str:
    """Create `repo_id` (private unless asked otherwise) and upload `files_to_push(folder)`; returns the commit URL.
    Offline, or when the Hub cannot be reached, this raises a `RuntimeError` that says so."""
    from huggingface_hub import HfApi

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise RuntimeError(f"cannot push {folder} to {repo_id}: HF_HUB_OFFLINE is set (no network); unset it to push")
    names = [p.name for p in files_to_push(folder)]
    if "config.json" not in names:
        raise RuntimeError(f"cannot push {folder}: it holds no saved model (no config.json)")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id, allow_patterns=names)
    except Exception as error:  # network, auth and permission errors all end the push the same way
        raise RuntimeError(f"pushing {folder} to the Hub repo {repo_id} failed: {error}") from error
    return str(commit)
