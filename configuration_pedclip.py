"""PedCLIP configuration: a ViT-B/16 vision tower with Mixture of Body-part Experts (MoBE) and a BERT text tower.

Paper: "PedCLIP: A Vision-Language model for Pediatric X-rays with Mixture of Body part Experts" (MICCAI 2025).
This file imports no torch, so a config can be read anywhere.
"""

import math
from dataclasses import field

from transformers import BertConfig, PreTrainedConfig

# The 23 pediatric body parts, one MoBE expert each. Index i is expert i and body_part_labels value i.
DEFAULT_BODY_PARTS = (
    "chest", "abdomen", "skull", "facial_bones", "neck",
    "cervical_spine", "thoracic_spine", "lumbar_spine", "whole_spine",
    "pelvis", "hip", "femur", "knee", "lower_leg", "ankle", "foot",
    "shoulder", "clavicle", "humerus", "elbow", "forearm", "wrist", "hand",
)  # fmt: skip

# DICOM BodyPartExamined defined terms (PS3.16 Annex L) for each default body part.
DICOM_BODY_PART_TERMS = {
    "chest": "CHEST", "abdomen": "ABDOMEN", "skull": "SKULL", "facial_bones": "FACE", "neck": "NECK",
    "cervical_spine": "CSPINE", "thoracic_spine": "TSPINE", "lumbar_spine": "LSPINE", "whole_spine": "SPINE",
    "pelvis": "PELVIS", "hip": "HIP", "femur": "FEMUR", "knee": "KNEE", "lower_leg": "LEG", "ankle": "ANKLE",
    "foot": "FOOT", "shoulder": "SHOULDER", "clavicle": "CLAVICLE", "humerus": "HUMERUS", "elbow": "ELBOW",
    "forearm": "FOREARM", "wrist": "WRIST", "hand": "HAND",
}  # fmt: skip

ROUTER_MODES = ("soft", "label", "topk")
GATE_INPUTS = ("mlp_input", "residual")


class PedCLIPVisionConfig(PreTrainedConfig):
    r"""
    Vision tower: a ViT (transformers' `ViTConfig` field names and defaults, i.e. ViT-B/16 at 224) whose MLPs in
    `moe_layers` are Mixture of Body-part Experts blocks.

    Args:
        hidden_size (`int`, defaults to 768): width of the tokens.
        num_hidden_layers (`int`, defaults to 12): number of transformer layers.
        num_attention_heads (`int`, defaults to 12): attention heads per layer.
        intermediate_size (`int`, defaults to 3072): hidden width of each MLP and of each expert.
        hidden_act (`str`, defaults to `"gelu"`): MLP activation (a key of `transformers.activations.ACT2FN`).
        hidden_dropout_prob (`float`, defaults to 0.0): dropout on embeddings and residual branches.
        attention_probs_dropout_prob (`float`, defaults to 0.0): dropout on attention probabilities.
        initializer_range (`float`, defaults to 0.02): std of the truncated-normal weight init.
        layer_norm_eps (`float`, defaults to 1e-12): LayerNorm epsilon (transformers ViT; timm ViTs use 1e-6).
        image_size (`int`, defaults to 224): input side length in pixels.
        patch_size (`int`, defaults to 16): patch side length in pixels.
        num_channels (`int`, defaults to 3): input channels (X-rays are replicated to 3 by the processor).
        qkv_bias (`bool`, defaults to `True`): bias on the query/key/value projections.
        moe_layers (`list[int]`, defaults to the last layer): indices of the layers whose MLP is a MoBE block.
            The paper finds later layers work best but does not name them.
        num_experts (`int`, defaults to 23): experts per MoBE layer, one per body part.
        router_mode (`str`, defaults to `"soft"`): `"soft"` = the paper's dense softmax mixture, `"label"` = teacher
            forcing (each image goes to the expert of its `body_part_labels`), `"topk"` = keep the `router_top_k`
            largest gate weights and renormalise them (fast inference).
        router_top_k (`int`, defaults to 1): experts kept per image under `"topk"` routing.
        gate_input (`str`, defaults to `"mlp_input"`): which CLS token the gate reads (the paper does not say):
            `"mlp_input"` = the layer-normed token the experts see, `"residual"` = the residual stream before that norm.
    """

    model_type = "pedclip_vision_model"
    base_config_key = "vision_config"

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    moe_layers: list[int] | None = None
    num_experts: int = 23
    router_mode: str = "soft"
    router_top_k: int = 1
    gate_input: str = "mlp_input"

    def __post_init__(self, **kwargs):
        if self.moe_layers is None:
            self.moe_layers = [self.num_hidden_layers - 1]
        self.moe_layers = sorted({int(i) % self.num_hidden_layers for i in self.moe_layers})
        super().__post_init__(**kwargs)
        self.validate_moe()

    def validate_moe(self):
        """Raise a `ValueError` naming the first MoBE field that cannot work."""
        if self.router_mode not in ROUTER_MODES:
            raise ValueError(f"router_mode={self.router_mode!r}; expected one of {ROUTER_MODES}")
        if self.gate_input not in GATE_INPUTS:
            raise ValueError(f"gate_input={self.gate_input!r}; expected one of {GATE_INPUTS}")
        if not 1 <= self.router_top_k <= self.num_experts:
            raise ValueError(f"router_top_k={self.router_top_k} must be in [1, num_experts={self.num_experts}]")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not divisible by heads={self.num_attention_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}")


class PedCLIPTextConfig(BertConfig):
    r"""
    Text tower: BERT (BioClinicalBERT-shaped by default). Every `transformers.BertConfig` field keeps BERT's meaning
    and default: `vocab_size` 30522 (BioClinicalBERT: 28996, set from its folder by `from_towers`), `hidden_size` 768,
    `num_hidden_layers` 12, `num_attention_heads` 12, `intermediate_size` 3072, `hidden_act` "gelu",
    `hidden_dropout_prob` 0.1, `attention_probs_dropout_prob` 0.1, `max_position_embeddings` 512,
    `type_vocab_size` 2, `initializer_range` 0.02, `layer_norm_eps` 1e-12, `pad_token_id` 0.

    Args:
        max_length (`int`, defaults to 120): reports are padded/truncated to this many tokens (paper).
    """

    model_type = "pedclip_text_model"
    base_config_key = "text_config"

    max_length: int = 120


class PedCLIPConfig(PreTrainedConfig):
    r"""
    PedCLIP: CLIP-style image-text model for pediatric X-rays.

    Args:
        vision_config (`dict` or `PedCLIPVisionConfig`, defaults to ViT-B/16 with MoBE in the last layer).
        text_config (`dict` or `PedCLIPTextConfig`, defaults to BERT-base).
        projection_dim (`int`, defaults to 512): size of the shared image-text embedding space.
        body_parts (`list[str]`, defaults to `DEFAULT_BODY_PARTS`): body part name of each expert, in expert order;
            its length must equal `vision_config.num_experts`.
        logit_scale_init_value (`float`, defaults to log(1/0.07)): initial log inverse temperature (CLIP's).
        gate_loss_weight (`float`, defaults to 1.0): lambda in `loss = contrastive + lambda * gate_loss`.
    """

    model_type = "pedclip"
    sub_configs_defaults = {"vision_config": PedCLIPVisionConfig, "text_config": PedCLIPTextConfig}

    vision_config: dict | PedCLIPVisionConfig | None = None
    text_config: dict | PedCLIPTextConfig | None = None
    projection_dim: int = 512
    body_parts: list[str] = field(default_factory=lambda: list(DEFAULT_BODY_PARTS))
    logit_scale_init_value: float = math.log(1 / 0.07)
    gate_loss_weight: float = 1.0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.body_parts = list(self.body_parts)
        if len(self.body_parts) != self.vision_config.num_experts:
            raise ValueError(
                f"{len(self.body_parts)} body_parts for {self.vision_config.num_experts} experts: "
                "give one body part name per expert"
            )
        if len(set(self.body_parts)) != len(self.body_parts):
            raise ValueError(f"body_parts has duplicate names: {self.body_parts}")

    @property
    def body_part_to_id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.body_parts)}


__all__ = ["PedCLIPConfig", "PedCLIPTextConfig", "PedCLIPVisionConfig", "DEFAULT_BODY_PARTS", "DICOM_BODY_PART_TERMS"]

PedCLIPConfig.register_for_auto_class()
