"""Image-embedding extraction speed (what `eval/` spends its time on): PedCLIP's `get_image_features` under soft
and top-1 routing against a transformers `CLIPModel` with the same ViT shape, in one run with paired, alternating
timings (random init, offline; the text towers are tiny and unused).

    python benchmarks/embed.py                                    # the CPU demo's ViT (192 wide, 4 layers, 64 px)
    python benchmarks/embed.py --preset vit-b16 --dtype bfloat16  # the paper's ViT-B/16, MoBE in layers 10-11

Rows: soft routing (every expert, dense); top-1 routing with the untrained gate (it sends a batch of random images
to few experts: the fastest case); and top-1 at a PeXR-like body-part mix (the images grouped over many experts, as
a trained gate would send a mixed batch: computed through label routing with labels drawn from `mobe.SKEWED_MIX`,
the same grouped path without the weight multiply). Ratio = PedCLIP time / CLIP time (lower is faster).
"""

import sys
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_pedclip import PedCLIPConfig  # noqa: E402
from modeling_pedclip import PedCLIPModel  # noqa: E402

from mobe import skewed_labels  # noqa: E402
from timing import benchmark_parser, device_and_dtype, paired_ratio  # noqa: E402

VISION_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "image_size",
                 "patch_size")  # fmt: skip
PRESETS = {
    "demo": dict(vision=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                             image_size=64, patch_size=8),
                 moe_layers=[3], batch_size=64),
    "vit-b16": dict(vision=dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                                image_size=224, patch_size=16),
                    moe_layers=[10, 11], batch_size=256),
}  # fmt: skip
TINY_TEXT = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)


def build(preset: dict, num_experts: int, device, dtype):
    """PedCLIP and a CLIPModel whose vision towers share the preset's ViT shape (GELU both)."""
    vision = {**preset["vision"], "moe_layers": preset["moe_layers"], "num_experts": num_experts}
    parts = [f"part{i}" for i in range(num_experts)]
    config = PedCLIPConfig(vision_config=vision, text_config=TINY_TEXT, body_parts=parts)
    pedclip = PedCLIPModel(config)
    clip = CLIPModel(CLIPConfig(
        vision_config={**preset["vision"], "hidden_act": "gelu"},
        text_config={**TINY_TEXT, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        projection_dim=config.projection_dim,
    ))  # fmt: skip
    return [m.to(device=device, dtype=dtype).eval() for m in (pedclip, clip)]


def embed_fn(model, pixels, **route):
    def run():
        with torch.inference_mode():
            model.get_image_features(pixel_values=pixels, **route)

    return run


def main():
    parser = benchmark_parser(__doc__, PRESETS, repeats=7)
    parser.add_argument("--num_experts", type=int, default=23)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    preset = PRESETS[args.preset]
    batch = args.batch_size or preset["batch_size"]
    pedclip, clip = build(preset, args.num_experts, device, dtype)
    size = preset["vision"]["image_size"]
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    mix = skewed_labels(args.num_experts, batch).to(device)
    with torch.inference_mode():
        gate_logits = pedclip.get_image_features(pixel_values=pixels, router_mode="topk").gate_logits
    used = "/".join(str(logits.argmax(-1).unique().numel()) for logits in gate_logits)  # per MoBE layer
    print(f"preset {args.preset}, batch {batch}, {args.dtype} on {device}, {torch.get_num_threads()} threads; "
          f"MoBE layers {preset['moe_layers']} x {args.num_experts} experts; top-1 experts used: untrained gate "
          f"{used}, body-part mix {mix.unique().numel()}")  # fmt: skip
    print(f"{'PedCLIP image embeddings':<34}{'ms':>9}{'CLIP ms':>9}{'ratio':>8}{'img/s':>9}{'CLIP img/s':>12}")
    rows = (("soft routing", {"router_mode": "soft"}), ("top-1, untrained gate", {"router_mode": "topk"}),
            ("top-1 at a body-part mix", {"router_mode": "label", "body_part_labels": mix}))  # fmt: skip
    for name, route in rows:
        seconds, clip_seconds, ratio = paired_ratio(embed_fn(pedclip, pixels, **route), embed_fn(clip, pixels),
                                                    device, args.repeats)  # fmt: skip
        print(f"{name:<34}{seconds * 1e3:9.1f}{clip_seconds * 1e3:9.1f}{ratio:8.3f}{batch / seconds:9.1f}"
              f"{batch / clip_seconds:12.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
