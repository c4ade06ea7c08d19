"""Talk to the Hub: the allow-list of what a PedCLIP model repo may hold, the offline check, and the upload of a built
folder as one commit to a repo that is private unless asked otherwise. `pedclip.publish` builds that folder."""

import os
from fnmatch import fnmatch
from pathlib import Path

# Everything a model repo needs and nothing else: weights (one file or shards + index), config, the three code files,
# the processor and tokenizer files, the model card. Data, report text, logs, checkpoints and caches never match.
HUB_FILE_PATTERNS = (
    "config.json", "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
    "configuration_pedclip.py", "modeling_pedclip.py", "processing_pedclip.py",
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.txt", "README.md",
)  # fmt: skip
# Remote files that a new push replaces as a whole: stale shards or a stale single file would load instead.
REPLACED_ON_PUSH = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


def is_hub_file(name: str) -> bool:
    return any(fnmatch(name, pattern) for pattern in HUB_FILE_PATTERNS)


def files_to_push(folder: str | Path) -> list[Path]:
    """The allow-listed files at the top level of `folder`."""
    return sorted(p for p in Path(folder).iterdir() if p.is_file() and is_hub_file(p.name))


def disallowed_paths(folder: str | Path) -> list[str]:
    """Everything under `folder` that is not an allow-listed top-level file (sub-folders included), relative."""
    folder = Path(folder)
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.parent != folder or not p.is_file() or not is_hub_file(p.name))  # fmt: skip


def offline_reason() -> str | None:
    """Why the Hub cannot be used right now (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE set), or None."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name} is set (no network); unset it to push"
    return None


def push_folder(
    folder: str | Path, repo_id: str, private: bool = True, token: str | None = None, endpoint: str | None = None,
    commit_message: str = "Upload PedCLIP",
) -> str:  # fmt: skip
    """Create `repo_id` if needed (private unless `private=False`) and upload `folder` as ONE commit; returns the
    commit URL. `folder` must hold only allow-listed files (build it with `pedclip.publish`). Refuses to push a
    private model into an existing public repo. Offline, unreachable or refused: a `RuntimeError` that says so."""
    reason = offline_reason()
    if reason:
        raise RuntimeError(f"cannot push {folder} to {repo_id}: {reason}")
    names = [p.name for p in files_to_push(folder)]
    if "config.json" not in names:
        raise RuntimeError(f"cannot push {folder}: it holds no saved model (no config.json)")
    extra = disallowed_paths(folder)
    if extra:
        raise RuntimeError(f"cannot push {folder}: it holds files a model repo must not get: {extra}")
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.model_info(repo_id).private:
            raise RuntimeError(f"the Hub repo {repo_id} exists and is public; pass --public to push to it anyway")
        operations = commit_operations(folder, names, api.list_repo_files(repo_id))
        commit = api.create_commit(repo_id, operations=operations, commit_message=commit_message)
    except Exception as error:  # network, auth and permission errors all end the push the same way
        raise RuntimeError(f"pushing {folder} to the Hub repo {repo_id} failed: {error}") from error
    return str(getattr(commit, "commit_url", commit))


def commit_operations(folder: str | Path, names: list[str], remote_files: list[str]) -> list:
    """One commit's operations: add `names` from `folder`; delete remote weight files this push does not replace
    (a stale single file or shard would otherwise load, or linger, beside the new weights)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    stale = [f for f in remote_files if f not in names and any(fnmatch(f, p) for p in REPLACED_ON_PUSH)]
    return [CommitOperationDelete(path_in_repo=f) for f in stale] + [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(Path(folder) / name)) for name in names
    ]
