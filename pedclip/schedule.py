"""The paper's training schedule: teacher-forced routing with lambda = 1, then the gate routes with lambda annealed;
and AdamW parameter groups (no weight decay on norms, biases and the temperature)."""

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class RoutingSchedule:
    """Steps `[0, teacher_forcing_steps)`: `label` routing (experts chosen by the body-part labels) and lambda 1.
    Then `soft` routing (the gate's output routes) with lambda going linearly from 1 to `final_gate_loss_weight`
    at `total_steps`."""

    teacher_forcing_steps: int
    total_steps: int
    final_gate_loss_weight: float = 0.0

    def at(self, step: int) -> tuple[str, float]:
        """(router_mode, gate_loss_weight) for optimisation step `step` (0-based)."""
        if step < self.teacher_forcing_steps:
            return "label", 1.0
        span = max(1, self.total_steps - self.teacher_forcing_steps)
        progress = min(1.0, (step - self.teacher_forcing_steps) / span)
        return "soft", 1.0 + (self.final_gate_loss_weight - 1.0) * progress


def is_decayed(name: str, param: nn.Parameter) -> bool:
    """Weight decay applies to matrices only: not to norms, biases (stacked expert biases too) or `logit_scale`."""
    return param.ndim >= 2 and not name.endswith("bias") and "logit_scale" not in name


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: decayed weights, and everything else without decay."""
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for name, p in params if is_decayed(name, p)], "weight_decay": weight_decay},
        {"params": [p for name, p in params if not is_decayed(name, p)], "weight_decay": 0.0},
    ]
