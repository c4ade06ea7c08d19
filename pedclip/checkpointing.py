"""Atomic training checkpoints: `accelerator.save_state` into `checkpoint-N.tmp`, then one rename.

A crash mid-write leaves only a `.tmp` folder, which is never taken for a checkpoint (and is removed by the next save).
"""

import json
import os
import re
import shutil
from pathlib import Path

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def save_checkpoint(accelerator, checkpoint_dir: Path, step: int, trainer_state: dict, keep: int | None = None) -> Path:
    """Save the full training state at `step` (every process takes part); returns the checkpoint folder."""
    final = checkpoint_dir / f"checkpoint-{step}"
    tmp = checkpoint_dir / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        prune_checkpoints(checkpoint_dir, keep)
    accelerator.wait_for_everyone()
    return final


def complete_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in checkpoint_dir.iterdir() if (m := CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).exists()]


def prune_checkpoints(checkpoint_dir: Path, keep: int | None) -> None:
    """Remove leftover `.tmp` folders and all but the `keep` newest checkpoints."""
    for leftover in checkpoint_dir.glob("checkpoint-*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)
    if keep:
        for old in complete_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def resolve_checkpoint(resume_from: str, checkpoint_dir: Path) -> Path | None:
    """`latest` -> the newest complete checkpoint under `checkpoint_dir` (None if there is none); a path -> itself,
    which must be a complete checkpoint."""
    if resume_from == "latest":
        found = complete_checkpoints(checkpoint_dir)
        return found[-1] if found else None
    path = Path(resume_from)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})")
    return path


def load_checkpoint(accelerator, path: Path) -> dict:
    """Restore model/optimizer/scheduler/RNG states; returns the trainer state saved with them."""
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER_STATE).read_text())
