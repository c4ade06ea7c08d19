"""The task registry: `@register_task("name")` adds a task, `run_task` runs one by name.

A task is `fn(adapter, data: datasets.DatasetDict | datasets.Dataset, **options) -> dict[str, float]`: it evaluates
`adapter` (see `eval.adapters.ModelAdapter`) on `data` and returns flat metrics (`auc/macro`, `auc/<label>`, ...),
each metric `m` with `m_ci_low` / `m_ci_high` (bootstrap 95% interval, `eval.metrics.bootstrap_ci`).
"""

from __future__ import annotations

import importlib
from typing import Callable

TASKS: dict[str, Callable] = {}


def register_task(name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` under `name` (a second registration under a taken name is refused)."""

    def decorate(fn: Callable) -> Callable:
        if name in TASKS and TASKS[name] is not fn:
            raise ValueError(f"task {name!r} is already registered by {TASKS[name].__module__}")
        TASKS[name] = fn
        return fn

    return decorate


def load_tasks() -> dict[str, Callable]:
    """Import `eval.tasks` (which imports every task module, so each registers) and return `TASKS`."""
    importlib.import_module("eval.tasks")
    return TASKS


def get_task(name: str) -> Callable:
    tasks = load_tasks()
    if name not in tasks:
        unavailable = importlib.import_module("eval.tasks").UNAVAILABLE
        if name in unavailable:
            raise ImportError(f"task {name!r} is unavailable: {unavailable[name]}")
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}")
    return tasks[name]


def run_task(name: str, adapter, data, **options) -> dict[str, float]:
    """Run the task registered as `name` on `adapter` and `data` with `options`."""
    return get_task(name)(adapter, data, **options)
