"""Training-step time of PedCLIP (teacher forcing and soft routing) against a plain CLIP of the same towers without
MoBE (transformers' `VisionTextDualEncoderModel`: ViT + BERT), measured in one run with paired, alternating timings.

    python benchmarks/train_step.py                                   # the CPU demo's model size
    python benchmarks/train_step.py --preset paper --dtype bfloat16   # ViT-B/16 + BERT-base at batch 128, on a GPU

A step is forward, loss (contrastive + gate loss for PedCLIP), backward and an AdamW update. With `--preset paper`
on a GPU it also prints PedCLIP's bf16 images/s.
"""

import sys
from pathlib import Path

import torch
from transformers import BertConfig, VisionTextDualEncoderConfig, VisionTextDualEncoderModel, ViTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_pedclip import PedCLIPConfig  # noqa: E402
from modeling_pedclip import PedCLIPModel  # noqa: E402

from timing import benchmark_parser, device_and_dtype, paired_ratio  # noqa: E402

PRESETS = {
    "demo": dict(vision=dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384,
                             image_size=64, patch_size=8),
                 text=dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
                 moe_layers=[3], batch_size=32, text_length=48),
    "paper": dict(vision=dict(), text=dict(vocab_size=28996), moe_layers=[10, 11], batch_size=128, text_length=120),
}  # fmt: skip


def build(preset: dict, device, dtype):
    """PedCLIP and the plain dual encoder with the same tower shapes."""
    config = PedCLIPConfig(vision_config={**preset["vision"], "moe_layers": preset["moe_layers"]}, text_config=preset["text"])
    pedclip = PedCLIPModel(config)
    vision = ViTConfig(**{k: getattr(config.vision_config, k) for k in preset["vision"]} | {"layer_norm_eps": 1e-12})
    text = BertConfig(**config.text_config.to_dict())
    plain = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(vision, text, projection_dim=config.projection_dim)
    )
    return [m.to(device=device, dtype=dtype).train() for m in (pedclip, plain)]


def step_fn(model, optimizer, inputs: dict, **kwargs):
    def step():
        optimizer.zero_grad(set_to_none=True)
        model(**inputs, return_loss=True, **kwargs).loss.backward()
        optimizer.step()

    return step


def make_inputs(preset: dict, config: PedCLIPConfig, device, dtype) -> dict:
    batch, size = preset["batch_size"], config.vision_config.image_size
    generator = torch.Generator().manual_seed(0)
    return {
        "pixel_values": torch.randn(batch, 3, size, size, generator=generator).to(device, dtype),
        "input_ids": torch.randint(1000, 2000, (batch, preset["text_length"]), generator=generator).to(device),
        "attention_mask": torch.ones(batch, preset["text_length"], dtype=torch.long, device=device),
        "body_part_labels": torch.randint(0, config.vision_config.num_experts, (batch,), generator=generator).to(device),
    }


def main():
    parser = benchmark_parser(__doc__, PRESETS, repeats=5)
    args = parser.parse_args()
    device, dtype = device_and_dtype(args)
    preset = dict(PRESETS[args.preset], **({"batch_size": args.batch_size} if args.batch_size else {}))
    pedclip, plain = build(preset, device, dtype)
    inputs = make_inputs(preset, pedclip.config, device, dtype)
    plain_inputs = {k: v for k, v in inputs.items() if k != "body_part_labels"}
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-5) for m in (pedclip, plain)]
    plain_step = step_fn(plain, optimizers[1], plain_inputs)
    print(f"preset {args.preset}, batch {preset['batch_size']}, {args.dtype} on {device}, {torch.get_num_threads()} "
          f"threads; MoBE layers {pedclip.config.vision_config.moe_layers} with {pedclip.config.vision_config.num_experts} experts")  # fmt: skip
    print(f"{'PedCLIP training step':<34}{'ms':>9}{'plain CLIP ms':>15}{'ratio':>8}{'images/s':>10}")
    for name, mode in (("teacher forcing (label routing)", "label"), ("soft routing", "soft")):
        ms, peer_ms, ratio = paired_ratio(
            step_fn(pedclip, optimizers[0], inputs, router_mode=mode), plain_step, device, args.repeats
        )
        print(f"{name:<34}{ms * 1e3:9.1f}{peer_ms * 1e3:15.1f}{ratio:8.3f}{preset['batch_size'] / ms:10.1f}")


if __name__ == "__main__":
    main()
