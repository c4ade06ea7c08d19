"""Downstream evaluation of PedCLIP and CLIP-like baselines: a task registry (`eval.tasks`: zero_shot,
linear_probe, concept_alignment, retrieval, routing, finetune, regression, segmentation), model adapters,
data-set adapters (`eval.data`), cached embeddings, scikit-learn metrics with bootstrap CIs, and reports.

    from eval import data, load_adapter, run_task
    adapter = load_adapter("outputs/pedclip-demo")
    names = data.label_names("pexr_mini")
    metrics = run_task("zero_shot", adapter, data.load("pexr_mini"), split="test", label_names=names)

Command line: `python -m eval --help`.
"""

from eval.adapters import ModelAdapter, load_adapter
from eval.registry import TASKS, register_task, run_task

__all__ = ["TASKS", "ModelAdapter", "load_adapter", "register_task", "run_task"]
