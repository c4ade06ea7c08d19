"""PedCLIP model: ViT vision tower with Mixture of Body-part Experts (MoBE) + BERT text tower, CLIP-style.

MoBE (paper eq. 1-2): in each MoBE layer, gate logits `g = v_[IMG] @ W_G` come from that layer's CLS token (in fp32),
`s = softmax(g)` and the MLP output is `sum_e s_e * B_e(V)`: one gate vector per image, shared by all its tokens.
"""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertModel, PreTrainedModel, ViTModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, load_state_dict
from transformers.utils import ModelOutput, can_return_tuple

try:
    from .configuration_pedclip import PedCLIPConfig, PedCLIPTextConfig, PedCLIPVisionConfig
except ImportError:
    from configuration_pedclip import PedCLIPConfig, PedCLIPTextConfig, PedCLIPVisionConfig


@dataclass
class PedCLIPVisionOutput(ModelOutput):
    """Vision tower output. `last_hidden_state` is after the final layernorm (as `ViTModel`); `pooler_output` is its
    CLS ([IMG]) token; `gate_logits` holds one `[B, num_experts]` fp32 tensor per MoBE layer."""

    last_hidden_state: torch.Tensor | None = None
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    gate_logits: tuple[torch.Tensor, ...] | None = None


@dataclass
class PedCLIPOutput(ModelOutput):
    """`loss = contrastive_loss + gate_loss_weight * gate_loss`; embeddings are L2-normalised; `gate_logits` holds one
    `[B, num_experts]` tensor per MoBE layer."""

    loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    gate_loss: torch.Tensor | None = None
    logits_per_image: torch.Tensor | None = None
    logits_per_text: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    text_embeds: torch.Tensor | None = None
    gate_logits: tuple[torch.Tensor, ...] | None = None
    vision_model_output: PedCLIPVisionOutput | None = None
    text_model_output: BaseModelOutputWithPooling | None = None

    def to_tuple(self) -> tuple:
        return tuple(v.to_tuple() if isinstance(v, ModelOutput) else v for v in self.values())


# ----------------------------------------------------------------------------------------------------------- losses
def contrastive_loss(logits_per_image: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE: mean of image->text and text->image cross-entropy, matching pairs on the diagonal."""
    targets = torch.arange(logits_per_image.shape[0], device=logits_per_image.device)
    return (F.cross_entropy(logits_per_image, targets) + F.cross_entropy(logits_per_image.t(), targets)) / 2


def gate_loss(gate_logits: tuple[torch.Tensor, ...], body_part_labels: torch.Tensor) -> torch.Tensor:
    """Mean over MoBE layers of the cross-entropy between each layer's gate logits and the body-part labels."""
    losses = [F.cross_entropy(logits.float(), body_part_labels) for logits in gate_logits]
    return torch.stack(losses).mean()


def mean_gate_logits(gate_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """`[B, E]` fp32 mean over MoBE layers of the gate logits: the model's body-part prediction for each image."""
    return torch.stack(gate_logits).float().mean(0)


# ----------------------------------------------------------------------------------------------------- vision tower
class PedCLIPVisionEmbeddings(nn.Module):
    """CLS token + patch embeddings + learned position embeddings (ViT)."""

    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.image_size = config.image_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"pixel_values must be [batch, channels, {self.image_size}, {self.image_size}], "
                f"got {list(pixel_values.shape)}"
            )
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls_tokens = self.cls_token.expand(patches.shape[0], -1, -1)
        return self.dropout(torch.cat([cls_tokens, patches], dim=1) + self.position_embeddings)


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Plain softmax attention; `query/key/value` are `[B, heads, N, head_dim]`."""
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


class PedCLIPVisionAttention(nn.Module):
    """Multi-head self-attention; the kernel follows `config._attn_implementation` (sdpa by default)."""

    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        shape = (batch, tokens, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        key = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        dropout = self.config.attention_probs_dropout_prob if self.training else 0.0
        output, _ = attention(self, query, key, value, None, scaling=self.scaling, dropout=dropout)
        return self.out_proj(output.reshape(batch, tokens, -1))


class PedCLIPVisionMLP(nn.Module):
    """The ViT MLP of the layers that hold no MoBE."""

    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class ScaleExperts(torch.autograd.Function):
    """Scale expert activations `[B*N, E*H]` by the gate scores `[B, E]` in place (one pass, nothing extra kept).
    The gate's gradient is recovered from the scaled activations as `sum(grad * scaled) / s`, exact wherever `s > 0`
    (where `s == 0` the softmax passes no gradient to the gate logits anyway)."""

    @staticmethod
    def forward(ctx, activations: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if activations.grad_fn is not None and hasattr(activations.grad_fn, "_saved_result"):
            activations = activations.clone()  # its producer (e.g. ReLU) keeps it for backward: leave it intact
        else:
            ctx.mark_dirty(activations)
        expert_view(activations, scores).mul_(scores[:, None, :, None])
        ctx.save_for_backward(activations, scores)
        return activations

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scaled, scores = ctx.saved_tensors
        grad = expert_view(grad, scores)
        weighted = (grad * expert_view(scaled, scores)).sum((1, 3), dtype=scores.dtype)
        grad_scores = torch.where(scores > 0, weighted / scores, torch.zeros_like(weighted))
        return (grad * scores.to(grad.dtype)[:, None, :, None]).view(scaled.shape), grad_scores


def expert_view(activations: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """`[B*N, E*H]` -> `[B, N, E, H]` for `scores` `[B, E]`."""
    return activations.view(scores.shape[0], -1, scores.shape[1], activations.shape[-1] // scores.shape[1])


class PedCLIPMoBE(nn.Module):
    """Mixture of Body-part Experts: `num_experts` MLPs stored stacked, mixed per image by a gate on the CLS token.

    Weights: `gate.weight` `[E, C]` (W_G transposed, no bias), `fc1_weight` `[E, H, C]`, `fc1_bias` `[E, H]`,
    `fc2_weight` `[E, H, C]`, `fc2_bias` `[E, C]`. Both stacks view as one wide MLP of width `E*H` with no copy
    (`fc1_weight` holds each expert's fc1 in `nn.Linear`'s `[out, in]` layout: a `[E, C, H]` stack would need a
    transposing copy every step, measured 5% slower). `soft` routing runs that wide MLP with its hidden activations
    scaled by `s` (same FLOPs); `label`/`topk` group images by expert and run only the experts in use.
    """

    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__()
        experts, width, hidden = config.num_experts, config.hidden_size, config.intermediate_size
        self.num_experts = experts
        self.top_k = config.router_top_k
        self.gate = nn.Linear(width, experts, bias=False)
        self.fc1_weight = nn.Parameter(torch.zeros(experts, hidden, width))
        self.fc1_bias = nn.Parameter(torch.zeros(experts, hidden))
        self.fc2_weight = nn.Parameter(torch.zeros(experts, hidden, width))
        self.fc2_bias = nn.Parameter(torch.zeros(experts, width))
        self.activation = ACT2FN[config.hidden_act]

    def forward(
        self, hidden_states: torch.Tensor, gate_tokens: torch.Tensor, router_mode: str, body_part_labels=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`hidden_states` `[B, N, C]` (the layer-normed tokens), `gate_tokens` `[B, C]` -> (output, gate logits)."""
        gate_logits = F.linear(gate_tokens.float(), self.gate.weight.float())
        if router_mode == "soft":
            return self.soft_mixture(hidden_states, gate_logits.softmax(-1)), gate_logits
        if router_mode == "label":
            experts = check_body_part_labels(body_part_labels, hidden_states.shape[0], self.num_experts)[:, None]
            return self.routed(hidden_states, experts, None), gate_logits
        if router_mode == "topk":
            weights, experts = gate_logits.softmax(-1).topk(self.top_k, dim=-1)
            return self.routed(hidden_states, experts, weights / weights.sum(-1, keepdim=True)), gate_logits
        raise ValueError(f"router_mode={router_mode!r}; expected 'soft', 'label' or 'topk'")

    def soft_mixture(self, hidden_states: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """`sum_e s_e * B_e(V)` as one MLP of width E*H with per-image scaled activations."""
        batch, tokens, width = hidden_states.shape
        experts, hidden = self.num_experts, self.fc1_bias.shape[-1]
        scores = scores.to(hidden_states.dtype)
        fc1_weight, fc1_bias = self.fc1_weight.view(experts * hidden, width), self.fc1_bias.view(-1)
        activations = self.activation(F.linear(hidden_states.reshape(-1, width), fc1_weight, fc1_bias))
        activations = ScaleExperts.apply(activations, scores)  # a base tensor: in place on a view would copy
        output = (activations @ self.fc2_weight.view(experts * hidden, width)).view(batch, tokens, width)
        return output + (scores @ self.fc2_bias)[:, None, :]

    def routed(self, hidden_states: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
        """Run only the experts in `experts` (`[B, K]`), images grouped per expert; weight by `weights` (`[B, K]`)."""
        batch, top_k = experts.shape
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        images = torch.arange(batch, device=experts.device).repeat_interleave(top_k)[order]
        counts = torch.bincount(flat_experts, minlength=self.num_experts)
        used = counts.nonzero().squeeze(1)
        groups = hidden_states[images].split(counts[used].tolist())
        output = torch.cat([self.expert_mlp(group, *expert) for group, expert in zip(groups, self.experts(used))])
        if weights is not None:
            output = output * weights.reshape(-1)[order].to(output.dtype)[:, None, None]
        if top_k == 1:
            return output[torch.argsort(order)]
        return torch.zeros_like(hidden_states).index_add(0, images, output)

    def experts(self, used: torch.Tensor):
        """(fc1_weight, fc1_bias, fc2_weight, fc2_bias) of each expert in `used`. Training gathers the used experts
        once (its gradient is one zero-fill plus their slices; indexing a Parameter per expert would allocate a
        full-size gradient each time); inference takes views, copying nothing."""
        stacked = (self.fc1_weight, self.fc1_bias, self.fc2_weight, self.fc2_bias)
        if torch.is_grad_enabled():
            return list(zip(*(param.index_select(0, used).unbind(0) for param in stacked)))
        return [tuple(param[e] for param in stacked) for e in used.tolist()]

    def expert_mlp(self, tokens: torch.Tensor, fc1_weight, fc1_bias, fc2_weight, fc2_bias) -> torch.Tensor:
        """One expert on `tokens` `[n, N, C]`."""
        flat = tokens.reshape(-1, tokens.shape[-1])
        hidden = self.activation(F.linear(flat, fc1_weight, fc1_bias))
        return torch.addmm(fc2_bias, hidden, fc2_weight).view(tokens.shape)


def check_body_part_labels(labels: torch.Tensor | None, batch: int, num_experts: int) -> torch.Tensor:
    """Validate teacher-forcing labels: one integer in [0, num_experts) per image."""
    if labels is None:
        raise ValueError("router_mode='label' (teacher forcing) needs body_part_labels, one per image")
    if labels.shape != (batch,) or labels.dtype.is_floating_point:
        raise ValueError(f"body_part_labels must be an integer tensor of shape [{batch}], got {labels.dtype} {list(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_experts):
        raise ValueError(f"body_part_labels must lie in [0, {num_experts}), got {labels.tolist()}")
    return labels.long()


class PedCLIPVisionLayer(GradientCheckpointingLayer):
    """Pre-norm transformer layer; its MLP slot holds a `PedCLIPMoBE` when `layer_idx in config.moe_layers`."""

    def __init__(self, config: PedCLIPVisionConfig, layer_idx: int):
        super().__init__()
        self.is_moe = layer_idx in config.moe_layers
        self.gate_reads_residual = config.gate_input == "residual"
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = PedCLIPVisionAttention(config)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = PedCLIPMoBE(config) if self.is_moe else PedCLIPVisionMLP(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self, hidden_states: torch.Tensor, router_mode: str = "soft", body_part_labels: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden_states = hidden_states + self.dropout(self.attention(self.layernorm_before(hidden_states)))
        normed = self.layernorm_after(hidden_states)
        if not self.is_moe:
            return hidden_states + self.dropout(self.mlp(normed)), None
        gate_tokens = (hidden_states if self.gate_reads_residual else normed)[:, 0]
        mixed, gate_logits = self.mlp(normed, gate_tokens, router_mode, body_part_labels)
        return hidden_states + self.dropout(mixed), gate_logits


class PedCLIPVisionEncoder(nn.Module):
    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList([PedCLIPVisionLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(self, hidden_states, router_mode, body_part_labels=None, output_hidden_states=False):
        """Returns (last hidden states, all hidden states or None, gate logits of the MoBE layers)."""
        all_states = [hidden_states] if output_hidden_states else None
        gate_logits = []
        for layer in self.layers:
            hidden_states, logits = layer(hidden_states, router_mode=router_mode, body_part_labels=body_part_labels)
            if logits is not None:
                gate_logits.append(logits)
            if output_hidden_states:
                all_states.append(hidden_states)
        return hidden_states, (tuple(all_states) if output_hidden_states else None), tuple(gate_logits)


# ------------------------------------------------------------------------------------------------- pretrained model
class PedCLIPPreTrainedModel(PreTrainedModel):
    config: PedCLIPConfig
    base_model_prefix = "pedclip"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = ["PedCLIPVisionEmbeddings", "PedCLIPVisionLayer", "BertLayer"]

    def _init_weights(self, module):
        """ViT-style truncated-normal init (the BERT tower is a sub-model: transformers applies BERT's own init)."""
        vision_std = getattr(self.config, "vision_config", self.config).initializer_range
        super()._init_weights(module)
        if isinstance(module, PedCLIPVisionEmbeddings):
            init.trunc_normal_(module.cls_token, std=vision_std)
            init.trunc_normal_(module.position_embeddings, std=vision_std)
        elif isinstance(module, PedCLIPMoBE):
            for weight in (module.fc1_weight, module.fc2_weight):
                init.trunc_normal_(weight, std=vision_std)
            for bias in (module.fc1_bias, module.fc2_bias):
                init.zeros_(bias)
            init.normal_(module.gate.weight, std=vision_std)
        elif isinstance(module, PedCLIPModel):
            init.normal_(module.visual_projection.weight, std=module.visual_projection.in_features**-0.5)
            init.normal_(module.text_projection.weight, std=module.text_projection.in_features**-0.5)
            init.constant_(module.logit_scale, self.config.logit_scale_init_value)


class PedCLIPVisionModel(PedCLIPPreTrainedModel):
    """The vision tower alone: a ViT whose `moe_layers` hold MoBE blocks."""

    config: PedCLIPVisionConfig
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    def __init__(self, config: PedCLIPVisionConfig):
        super().__init__(config)
        self.embeddings = PedCLIPVisionEmbeddings(config)
        self.encoder = PedCLIPVisionEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_init()

    @can_return_tuple
    def forward(
        self,
        pixel_values: torch.Tensor,
        body_part_labels: torch.Tensor | None = None,
        router_mode: str | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> PedCLIPVisionOutput:
        """`router_mode` defaults to `config.router_mode`; `body_part_labels` `[B]` are needed for `"label"`."""
        router_mode = router_mode or self.config.router_mode
        hidden_states, all_states, gate_logits = self.encoder(
            self.embeddings(pixel_values), router_mode, body_part_labels, bool(output_hidden_states)
        )
        last_hidden_state = self.layernorm(hidden_states)
        return PedCLIPVisionOutput(
            last_hidden_state=last_hidden_state,
            pooler_output=last_hidden_state[:, 0],
            hidden_states=all_states,
            gate_logits=gate_logits,
        )


# ------------------------------------------------------------------------------------------------------------ model
class PedCLIPModel(PedCLIPPreTrainedModel):
    """PedCLIP: MoBE ViT + BERT, projected into one space; CLIP's symmetric contrastive loss plus a gate loss."""

    config: PedCLIPConfig

    def __init__(self, config: PedCLIPConfig):
        super().__init__(config)
        self.vision_model = PedCLIPVisionModel._from_config(config.vision_config)
        self.text_model = BertModel._from_config(config.text_config, add_pooling_layer=False)
        self.visual_projection = nn.Linear(config.vision_config.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init_value))
        self.post_init()

    @can_return_tuple
    def get_text_features(
        self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None, **kwargs
    ) -> BaseModelOutputWithPooling:
        """BERT output whose `pooler_output` is the projected (unnormalised) [CLS] embedding."""
        outputs = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
            **kwargs,
        )
        outputs.pooler_output = self.text_projection(outputs.last_hidden_state[:, 0])
        return outputs

    @can_return_tuple
    def get_image_features(
        self, pixel_values, body_part_labels=None, router_mode=None, output_hidden_states=None, **kwargs
    ) -> PedCLIPVisionOutput:
        """Vision output whose `pooler_output` is the projected (unnormalised) [IMG] embedding."""
        outputs = self.vision_model(
            pixel_values,
            body_part_labels=body_part_labels,
            router_mode=router_mode,
            output_hidden_states=output_hidden_states,
        )
        outputs.pooler_output = self.visual_projection(outputs.pooler_output)
        return outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        body_part_labels: torch.Tensor | None = None,
        return_loss: bool = False,
        router_mode: str | None = None,
        gate_loss_weight: float | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> PedCLIPOutput:
        """Image-text logits; with `return_loss`, `loss = contrastive + gate_loss_weight * gate_loss` (the gate loss
        needs `body_part_labels`). `router_mode`/`gate_loss_weight` default to the config's."""
        vision = self.get_image_features(pixel_values, body_part_labels, router_mode, output_hidden_states)
        text = self.get_text_features(
            input_ids, attention_mask, token_type_ids, output_hidden_states=output_hidden_states, **kwargs
        )
        image_embeds = F.normalize(vision.pooler_output, dim=-1)
        text_embeds = F.normalize(text.pooler_output, dim=-1)
        logits_per_image = image_embeds @ text_embeds.t() * self.logit_scale.exp()
        output = PedCLIPOutput(
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_image.t(),
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            gate_logits=vision.gate_logits,
            vision_model_output=vision,
            text_model_output=text,
        )
        if return_loss:
            self.add_losses(output, body_part_labels, gate_loss_weight)
        return output

    def add_losses(self, output: PedCLIPOutput, body_part_labels, gate_loss_weight: float | None) -> None:
        output.contrastive_loss = contrastive_loss(output.logits_per_image)
        output.loss = output.contrastive_loss
        if body_part_labels is not None and output.gate_logits:
            weight = self.config.gate_loss_weight if gate_loss_weight is None else gate_loss_weight
            output.gate_loss = gate_loss(output.gate_logits, body_part_labels)
            output.loss = output.contrastive_loss + weight * output.gate_loss

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Save as a Hub model repo: weights, config whose `auto_map` also names the zero-shot pipeline class, code."""
        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **MODEL_AUTO_MAP}
        return super().save_pretrained(save_directory, *args, **kwargs)

    @classmethod
    def from_towers(cls, vision: str | Path | None, text: str | Path, **config_overrides) -> "PedCLIPModel":
        """Build PedCLIP from a pretrained ViT and a pretrained BERT; every expert starts as a copy of its layer's MLP.

        `vision`: a transformers ViT folder (or Hub id), a timm/DeiT-layout state-dict file (`.safetensors`,
        `.pth`/`.pt`/`.bin`), or None for a randomly initialised tower shaped by `vision_config=`. `text`: a BERT
        folder (or Hub id). `config_overrides`: `PedCLIPConfig` fields, MoBE fields of the vision config
        (`moe_layers`, `num_experts`, `router_mode`, `router_top_k`, `gate_input`), or `vision_config=` /
        `text_config=` dicts. A fresh model's vision tower reproduces the source ViT exactly.
        """
        vision_kwargs, vision_state = read_vision_tower(vision) if vision is not None else ({}, None)
        bert = BertModel.from_pretrained(text, add_pooling_layer=False)
        text_kwargs = {name: getattr(bert.config, name) for name in BERT_SHAPE_FIELDS}
        config = PedCLIPConfig(**split_overrides(config_overrides, vision_kwargs, text_kwargs))
        model = cls(config)
        if vision_state is not None:
            moe_layers, experts = config.vision_config.moe_layers, config.vision_config.num_experts
            gates = {f"encoder.layers.{i}.mlp.gate.weight" for i in moe_layers}
            load_exactly(model.vision_model, upcycle_mlps(vision_state, moe_layers, experts), str(vision), gates)
        load_exactly(model.text_model, bert.state_dict(), str(text))
        return model


MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_pedclip.PedCLIPConfig",
    "AutoModel": "modeling_pedclip.PedCLIPModel",
    "AutoModelForZeroShotImageClassification": "modeling_pedclip.PedCLIPModel",
}


# ----------------------------------------------------------------------------------------------- tower conversion
VIT_SHAPE_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "layer_norm_eps", "image_size", "patch_size", "num_channels", "qkv_bias",
)  # fmt: skip
BERT_SHAPE_FIELDS = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size",
    "initializer_range", "layer_norm_eps", "pad_token_id",
)  # fmt: skip
MOBE_FIELDS = ("moe_layers", "num_experts", "router_mode", "router_top_k", "gate_input")
TOP_LEVEL_FIELDS = ("projection_dim", "body_parts", "logit_scale_init_value", "gate_loss_weight")

# transformers ViTModel names (5.x in-memory names, and the older 4.x ones) -> PedCLIP vision tower names.
HF_VIT_RENAMES = (
    (r"^embeddings\.patch_embeddings\.projection\.", "embeddings.patch_embedding."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(?:query|q_proj)\.", r"encoder.layers.\1.attention.q_proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(?:key|k_proj)\.", r"encoder.layers.\1.attention.k_proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:attention\.)?(?:value|v_proj)\.", r"encoder.layers.\1.attention.v_proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.", r"encoder.layers.\1.mlp.fc1."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"encoder.layers.\1.mlp.fc2."),
    (r"^(?:encoder\.layer|layers)\.(\d+)\.(layernorm_before|layernorm_after)\.", r"encoder.layers.\1.\2."),
    (r"^(embeddings\.cls_token|embeddings\.position_embeddings|layernorm\.weight|layernorm\.bias)$", r"\1"),
)  # fmt: skip
# timm / DeiT VisionTransformer names -> PedCLIP vision tower names (qkv is split separately); heads are dropped.
TIMM_VIT_RENAMES = (
    (r"^cls_token$", "embeddings.cls_token"),
    (r"^pos_embed$", "embeddings.position_embeddings"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layernorm_before."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layernorm_after."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.attention.out_proj."),
    (r"^blocks\.(\d+)\.mlp\.(fc1|fc2)\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "layernorm."),
)  # fmt: skip
TIMM_DROPPED = r"^(head|head_dist|pre_logits)\."
TIMM_QKV = r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"
STATE_DICT_WRAPPERS = ("model", "state_dict", "module")


def rename_keys(state_dict: dict, renames, source: str, dropped: str | None = None) -> dict:
    """Pure renaming by the first matching `(pattern, replacement)`; any key no rule knows is an error naming it."""
    renamed, unknown = {}, []
    for key, tensor in state_dict.items():
        if dropped and re.match(dropped, key):
            continue
        rule = next((rule for rule in renames if re.match(rule[0], key)), None)
        if rule is None:
            unknown.append(key)
        else:
            renamed[re.sub(rule[0], rule[1], key)] = tensor
    if unknown:
        raise ValueError(f"{source}: keys that are not part of a plain ViT: {unknown}")
    return renamed


def convert_hf_vit_state_dict(state_dict: dict, source: str = "ViTModel") -> dict:
    """transformers `ViTModel` (no pooler) state dict -> dense PedCLIP vision tower state dict."""
    return rename_keys(state_dict, HF_VIT_RENAMES, source)


def convert_timm_vit_state_dict(state_dict: dict, source: str = "timm ViT") -> dict:
    """timm/DeiT `VisionTransformer` state dict -> dense PedCLIP vision tower state dict (fused qkv split in three)."""
    qkv = {key: tensor for key, tensor in state_dict.items() if re.match(TIMM_QKV, key)}
    rest = {key: tensor for key, tensor in state_dict.items() if key not in qkv}
    converted = rename_keys(rest, TIMM_VIT_RENAMES, source, dropped=TIMM_DROPPED)
    for key, tensor in qkv.items():
        layer, kind = re.match(TIMM_QKV, key).groups()
        for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
            converted[f"encoder.layers.{layer}.attention.{name}.{kind}"] = part
    return converted


def timm_vit_fields(state_dict: dict, source: str) -> dict:
    """Vision config fields read off a timm ViT state dict (heads assume timm's head width 64; LayerNorm eps 1e-6)."""
    try:
        hidden = state_dict["cls_token"].shape[-1]
        patch = state_dict["patch_embed.proj.weight"]
        positions = state_dict["pos_embed"].shape[1] - 1
        intermediate = state_dict["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as missing:
        raise ValueError(f"{source}: not a timm ViT state dict (no {missing})") from None
    grid = math.isqrt(positions)
    if grid * grid != positions:
        raise ValueError(f"{source}: pos_embed has {positions} patch positions, not a square grid plus one CLS token")
    layers = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"^blocks\.(\d+)\.", key)))
    return {
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": max(1, hidden // 64),
        "intermediate_size": intermediate, "hidden_act": "gelu", "layer_norm_eps": 1e-6,
        "image_size": grid * patch.shape[-1], "patch_size": patch.shape[-1], "num_channels": patch.shape[1],
        "qkv_bias": "blocks.0.attn.qkv.bias" in state_dict,
    }  # fmt: skip


def read_state_dict_file(path: Path) -> dict:
    """Tensors of a `.safetensors` file, or of a torch file read with `weights_only=True` (wrappers unwrapped)."""
    if path.suffix == ".safetensors":
        return load_state_dict(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and len(state) == 1 and next(iter(state)) in STATE_DICT_WRAPPERS:
        state = next(iter(state.values()))
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def read_vision_tower(vision: str | Path) -> tuple[dict, dict]:
    """(vision config fields, dense PedCLIP vision state dict) from a ViT folder/Hub id or a timm state-dict file."""
    path = Path(vision)
    if path.is_file():
        state = read_state_dict_file(path)
        return timm_vit_fields(state, str(path)), convert_timm_vit_state_dict(state, str(path))
    vit = ViTModel.from_pretrained(vision, add_pooling_layer=False)
    fields = {name: getattr(vit.config, name) for name in VIT_SHAPE_FIELDS}
    return fields, convert_hf_vit_state_dict(vit.state_dict(), str(vision))


def upcycle_mlps(state_dict: dict, moe_layers: list[int], num_experts: int) -> dict:
    """Pure: replace each MoBE layer's dense MLP by `num_experts` stacked copies of it (the gate stays new)."""
    upcycled = dict(state_dict)
    for layer in moe_layers:
        prefix = f"encoder.layers.{layer}.mlp."
        fc1_weight, fc1_bias = upcycled.pop(prefix + "fc1.weight"), upcycled.pop(prefix + "fc1.bias")
        fc2_weight, fc2_bias = upcycled.pop(prefix + "fc2.weight"), upcycled.pop(prefix + "fc2.bias")
        upcycled[prefix + "fc1_weight"] = fc1_weight.expand(num_experts, -1, -1).clone()
        upcycled[prefix + "fc1_bias"] = fc1_bias.expand(num_experts, -1).clone()
        upcycled[prefix + "fc2_weight"] = fc2_weight.t().expand(num_experts, -1, -1).clone()
        upcycled[prefix + "fc2_bias"] = fc2_bias.expand(num_experts, -1).clone()
    return upcycled


def load_exactly(module: nn.Module, state_dict: dict, source: str, allowed_missing: set[str] = frozenset()) -> None:
    """Load `state_dict` into `module`; any missing (beyond `allowed_missing`), unexpected or mis-shaped key is an
    error that names them."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict) - set(allowed_missing))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{key}: {list(state_dict[key].shape)} vs {list(own[key].shape)}"
        for key in state_dict
        if key in own and state_dict[key].shape != own[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"{source} does not fit {type(module).__name__}: missing {missing}, unexpected {unexpected}, "
            f"shape mismatch {mismatched}"
        )
    module.load_state_dict(state_dict, strict=False)


def split_overrides(overrides: dict, vision_fields: dict, text_fields: dict) -> dict:
    """`from_towers` overrides -> `PedCLIPConfig` kwargs over the fields read off the towers."""
    overrides = dict(overrides)
    vision = {**vision_fields, **overrides.pop("vision_config", {})}
    text = {**text_fields, **overrides.pop("text_config", {})}
    vision.update({name: overrides.pop(name) for name in MOBE_FIELDS if name in overrides})
    unknown = sorted(set(overrides) - set(TOP_LEVEL_FIELDS))
    if unknown:
        raise TypeError(f"from_towers got unknown overrides {unknown}; allowed: {TOP_LEVEL_FIELDS + MOBE_FIELDS}")
    return {"vision_config": vision, "text_config": text, **overrides}


PedCLIPModel.register_for_auto_class("AutoModel")

__all__ = [
    "PedCLIPModel", "PedCLIPVisionModel", "PedCLIPPreTrainedModel", "PedCLIPMoBE", "PedCLIPOutput",
    "PedCLIPVisionOutput", "contrastive_loss", "gate_loss", "mean_gate_logits", "convert_hf_vit_state_dict",
    "convert_timm_vit_state_dict", "upcycle_mlps",
]  # fmt: skip
