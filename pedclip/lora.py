"""LoRA fine-tuning of PedCLIP's vision tower with `peft`, including the stacked MoBE experts.

`PedCLIPImageClassifier` puts a linear head (`classifier`) on PedCLIP's image embedding; `lora_config` builds the
`peft.LoraConfig` that adapts the tower's attention projections and MLPs (`nn.Linear`, peft's `target_modules`) and
the MoBE experts' stacked `[E, H, C]` weights `fc1_weight` / `fc2_weight` (peft's `target_parameters`: rank `r` per
expert). With `modules_to_save=["classifier"]`, `PeftModel.save_pretrained` writes only the LoRA matrices and the
head (`adapter_model.safetensors`, `adapter_config.json`, and peft's `README.md` model card), and
`PeftModel.from_pretrained(PedCLIPImageClassifier(base, num_labels), adapter_dir)` restores the trained classifier
on a freshly loaded base model. The recipe is in README.md ("LoRA fine-tuning"); `eval.tasks.finetune` uses the same
target selection for its `lora` mode.

peft limits for `target_parameters` (0.21): no `lora_dropout`, DoRA or LoRA bias; `merge_and_unload()` works (the
per-expert delta is added to the stacked weight).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_outputs import ImageClassifierOutput

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "o_proj", "query", "key", "value", "qkv")
MLP_TARGETS = ("fc1", "fc2")
DEFAULT_LORA_TARGETS = ATTENTION_TARGETS + MLP_TARGETS
EXPERT_PARAMETERS = ("fc1_weight", "fc2_weight")
HEAD_NAME = "classifier"


def lora_targets_of(module: nn.Module, targets=None) -> list[str]:
    """Module names for LoRA: `targets` as given, else those of `DEFAULT_LORA_TARGETS` (attention projections and
    MLP layers) present as `nn.Linear` leaves of `module`."""
    if targets is not None:
        return list(targets)
    present = {name.rsplit(".", 1)[-1] for name, m in module.named_modules() if isinstance(m, nn.Linear)}
    found = [name for name in DEFAULT_LORA_TARGETS if name in present]
    if not found:
        raise ValueError(f"no nn.Linear named any of {DEFAULT_LORA_TARGETS} in the tower; pass lora_targets=")
    return found


def expert_parameters_of(module: nn.Module) -> list[str]:
    """Names (last part) of the stacked `[E, ., .]` MoBE expert weights in `module` (none outside PedCLIP)."""
    names = {name.rsplit(".", 1)[-1] for name, p in module.named_parameters() if p.ndim == 3}
    return [name for name in EXPERT_PARAMETERS if name in names]


def lora_config(module: nn.Module, r: int = 8, alpha: float = 16, targets=None, experts: bool | None = None,
                dropout: float = 0.0, modules_to_save=None):  # fmt: skip
    """A `peft.LoraConfig` of rank `r` (scale `alpha / r`) for `module` (a vision tower or a classifier around one).

    `targets`: `nn.Linear` names (`target_modules`; default: those of `DEFAULT_LORA_TARGETS` in `module`; `[]` for
    none). `experts`: adapt the MoBE expert stacks (`target_parameters`); `None` = when `targets` is None and the
    module has them. Raises ValueError when `experts=True` finds no stacked expert weights, when nothing would be
    adapted, or for `dropout > 0` together with the experts (peft cannot drop out inside a weight delta)."""
    from peft import LoraConfig

    parameters = expert_parameters_of(module) if experts or (experts is None and targets is None) else []
    if experts and not parameters:
        raise ValueError("lora_experts=True needs stacked MoBE expert weights (a PedCLIP tower)")
    modules = lora_targets_of(module, targets)
    if not modules and not parameters:
        raise ValueError("LoRA needs target modules or the MoBE experts; got targets=[] and no experts")
    if parameters and dropout:
        raise ValueError(f"lora_dropout={dropout}: peft's LoRA on the MoBE experts (target_parameters) has no "
                         "dropout; use dropout=0 or experts=False")  # fmt: skip
    return LoraConfig(
        r=int(r), lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, target_parameters=parameters or None,
        modules_to_save=list(modules_to_save) if modules_to_save else None,
    )  # fmt: skip


class PedCLIPImageClassifier(nn.Module):
    """PedCLIP's vision tower, its image embedding and a linear head `classifier` (`num_labels` logits).

    Holds (does not copy) `base_model.vision_model` and, with `use_projection` (default), `visual_projection`: the
    head reads the projected embedding `get_image_features` returns (unnormalised), else the pooled [IMG] token
    (`hidden_size` wide). The text tower is not held. `router_mode` (default: the config's) is the MoBE routing used
    unless `forward` is given one. Plain `nn.Module`, so `peft.get_peft_model` / `PeftModel.from_pretrained` take it.
    """

    def __init__(self, base_model: nn.Module, num_labels: int, use_projection: bool = True,
                 router_mode: str | None = None):  # fmt: skip
        super().__init__()
        self.vision_model = base_model.vision_model
        projection = base_model.visual_projection
        self.visual_projection = projection if use_projection else nn.Identity()
        width = projection.out_features if use_projection else base_model.vision_model.config.hidden_size
        self.classifier = nn.Linear(width, num_labels)
        self.router_mode = router_mode

    def image_features(self, pixel_values: torch.Tensor, body_part_labels=None, router_mode=None) -> torch.Tensor:
        """The embedding the head reads, `[B, width]`."""
        output = self.vision_model(
            pixel_values, body_part_labels=body_part_labels, router_mode=router_mode or self.router_mode
        )
        return self.visual_projection(output.pooler_output)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, body_part_labels=None,
                router_mode: str | None = None) -> ImageClassifierOutput:  # fmt: skip
        """Logits `[B, num_labels]`; with `labels`, `loss` too: cross-entropy for integer class ids `[B]`, binary
        cross-entropy with logits for float multi-label targets `[B, num_labels]`."""
        logits = self.classifier(self.image_features(pixel_values, body_part_labels, router_mode))
        loss = None
        if labels is not None:
            if labels.dtype.is_floating_point:
                loss = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
            else:
                loss = F.cross_entropy(logits, labels)
        return ImageClassifierOutput(loss=loss, logits=logits)
