"""Machinery shared by the trained tasks (`finetune`, `regression`, `segmentation`): seeded runs, model inputs made
batch by batch (or kept in memory when small), and a training loop that keeps the epoch scoring best on the
validation split. (Splits, label names and label fractions: `eval.tasks.common`, `eval.tasks.linear_probe`.)

Training never changes the adapter a caller passed in: the tasks work on `private_adapter(adapter)`, a shallow
copy whose model has its own copy of the vision tower."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from datasets import Dataset

TensorFn = Callable[[np.ndarray], torch.Tensor]


# ------------------------------------------------------------------------------------------------------- data


def column(dataset: Dataset, name: str, indices: np.ndarray | None = None) -> list:
    """The values of one column (decoded: PIL images for Image features), for `indices` or every row."""
    if name not in dataset.column_names:
        raise ValueError(f"the data has no {name!r} column; columns: {dataset.column_names}")
    subset = dataset.select_columns([name])
    rows = range(len(subset)) if indices is None else [int(i) for i in indices]
    return list(subset[list(rows)][name]) if len(rows) else []


def subsample(num_rows: int, fraction=None, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
    """Sorted row indices of a seeded `fraction` (0.1, "10%") of `num_rows` rows, all when None: the linear probe's
    `subsample_rows`, which also keeps both classes of every column of `labels` (`[N, L]`) that has them."""
    from eval.tasks.linear_probe import parse_fraction, subsample_rows  # here: eval.tasks imports this module

    if fraction is None:
        return np.arange(num_rows)
    labels = np.zeros((num_rows, 0), bool) if labels is None else labels
    return subsample_rows(labels, parse_fraction(fraction), seed)


def batches(indices: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(indices), batch_size):
        yield indices[start : start + batch_size]


class BatchSource:
    """Model inputs for the rows of a split, made by `make(indices) -> Tensor` (rows along axis 0). Kept in memory
    (made once, `chunk` rows at a time) when the whole split fits in `budget_mb`, else made again for every batch."""

    def __init__(self, num_rows: int, make: TensorFn, budget_mb: float = 1024, chunk: int = 64):
        self.num_rows, self.make, self.cached = num_rows, make, None
        if num_rows == 0:
            return
        probe = make(np.arange(1))
        if probe.element_size() * probe.numel() * num_rows / 2**20 <= budget_mb:
            self.cached = torch.cat([make(i) for i in batches(np.arange(num_rows), chunk)])

    def __len__(self) -> int:
        return self.num_rows

    def __call__(self, indices: np.ndarray) -> torch.Tensor:
        if self.cached is not None:
            return self.cached[torch.as_tensor(np.asarray(indices), dtype=torch.long)]
        return self.make(np.asarray(indices))


# ------------------------------------------------------------------------------------------------------- models


def private_adapter(adapter):
    """A shallow copy of `adapter` whose `model` is a copy with its own vision tower (`adapter.vision_tower()`,
    deep-copied, same device): train that tower freely. The rest of the model (text tower, projections) shares the
    original's tensors, so it costs no memory; leave it alone."""
    model, tower = adapter.model, adapter.vision_tower()
    own = {id(t) for t in itertools.chain(tower.parameters(), tower.buffers())}
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers()) if id(t) not in own}
    work = copy.copy(adapter)
    work.model = copy.deepcopy(model, shared)  # deepcopy's memo: tensors already "copied" are taken as they are
    return work


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block with torch's CPU (and CUDA) generators seeded, restoring the caller's generator state after."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def set_trainable(module: torch.nn.Module, trainable: bool) -> None:
    for param in module.parameters():
        param.requires_grad_(trainable)


def trainable_parameters(module: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: param for name, param in module.named_parameters() if param.requires_grad}


def predict(fn: TensorFn, num_rows: int, batch_size: int) -> np.ndarray:
    """`fn(indices)` over every row in batches, without gradients, as one float32 array."""
    with torch.no_grad():
        outputs = [fn(i).float().cpu() for i in batches(np.arange(num_rows), batch_size)]
    return torch.cat(outputs).numpy() if outputs else np.zeros((0,), np.float32)


# ------------------------------------------------------------------------------------------------------- training


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_fraction: float = 0.05):
    """Linear warm-up over `warmup_fraction` of the steps, then cosine decay to zero."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def fit(
    model: torch.nn.Module, param_groups: list[dict], batch_loss: Callable[[np.ndarray], torch.Tensor],
    validate: Callable[[], float], *, num_rows: int, epochs: int, batch_size: int, seed: int,
    higher_is_better: bool = True, weight_decay: float = 1e-4,
) -> float:  # fmt: skip
    """AdamW with a cosine schedule on `batch_loss(indices)`, shuffling `num_rows` rows each epoch (seeded); after
    every epoch, `validate()` (run in eval mode, no gradients) scores the model. The trainable parameters of the
    best-scoring epoch are restored at the end (non-finite scores never win; if none is finite the last epoch
    stays); so are the buffers (BatchNorm statistics). Returns the best validation score (NaN if none was finite)."""
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    optimizer = torch.optim.AdamW(param_groups, weight_decay=weight_decay)
    scheduler = cosine_schedule(optimizer, epochs * math.ceil(num_rows / batch_size))
    rng = np.random.default_rng(seed)
    best_score, best_state = float("nan"), None
    for _ in range(epochs):
        model.train()
        for indices in batches(rng.permutation(num_rows), batch_size):
            optimizer.zero_grad(set_to_none=True)
            batch_loss(indices).backward()
            optimizer.step()
            scheduler.step()
        model.eval()
        with torch.no_grad():
            score = float(validate())
        better = score > best_score if higher_is_better else score < best_score
        if math.isfinite(score) and (best_state is None or better):
            best_score, best_state = score, snapshot(model)
    model.eval()
    if best_state is not None:
        restore(model, best_state)
    return best_score


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters and of every buffer (e.g. BatchNorm running statistics)."""
    tensors = {**trainable_parameters(model), **dict(model.named_buffers())}
    return {name: tensor.detach().clone() for name, tensor in tensors.items()}


def restore(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with torch.no_grad():
        for name, value in state.items():
            tensors[name].copy_(value)
