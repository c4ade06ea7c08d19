"""The evaluation tasks. Importing this package imports every task module, so each registers in
`eval.registry.TASKS`. A module that is absent or fails to import (e.g. a missing optional dependency) leaves its
task unavailable: `UNAVAILABLE[task]` holds the error, which `eval.registry.get_task` raises when that task is asked
for, while the other tasks keep working."""

import importlib

TASK_MODULES = (
    "zero_shot", "linear_probe", "concept_alignment", "retrieval", "routing", "finetune", "regression",
    "segmentation",
)  # fmt: skip


def _import_all() -> dict[str, str]:
    unavailable = {}
    for module in TASK_MODULES:
        try:
            importlib.import_module(f"{__name__}.{module}")
        except ImportError as error:
            unavailable[module] = f"{type(error).__name__}: {error}"
    return unavailable


UNAVAILABLE = _import_all()
