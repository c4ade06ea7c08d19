"""MoBE speed against equal-FLOP transformers ViTs, measured in one run with paired, alternating timings.

    python benchmarks/mobe.py                      # CPU-sized ViT (4 layers, width 192, 112 px)
    python benchmarks/mobe.py --preset vit-b16 --dtype bfloat16   # the paper's ViT-B/16, on a GPU

Rows (targets from the model-package issue):
- soft routing, MoBE in every layer / `ViTModel` whose MLP is E times wider (same FLOPs): forward <= 1.15,
  training step (forward + backward) <= 1.2.
- label and top-1 routing at a skewed body-part mix / a plain `ViTModel` (same FLOPs per image): <= 1.3.
  These run at `--routed_batch_size` (64 by default, the scale of a real training batch: the paper uses 128 per
  GPU); small batches split into many tiny per-expert groups and pay per-group overhead.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import ViTConfig, ViTModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from configuration_pedclip import PedCLIPVisionConfig  # noqa: E402
from modeling_pedclip import PedCLIPVisionModel  # noqa: E402

from timing import paired_ratio  # noqa: E402

PRESETS = {
    "cpu-small": dict(hidden_size=192, num_attention_heads=3, num_hidden_layers=4, intermediate_size=768,
                      image_size=112, patch_size=16, batch_size=16, routed_batch_size=64),
    "vit-b16": dict(hidden_size=768, num_attention_heads=12, num_hidden_layers=12, intermediate_size=3072,
                    image_size=224, patch_size=16, batch_size=32, routed_batch_size=128),
}  # fmt: skip
# Share of each expert's images, shaped like PeXR (chest, wrist and forearm ~46%; a long tail).
SKEWED_MIX = [0.22, 0.14, 0.10, 0.08, 0.07, 0.06, 0.05, 0.05, 0.04, 0.03, 0.03, 0.02, 0.02, 0.02, 0.01, 0.01,
              0.01, 0.01, 0.01, 0.01, 0.005, 0.005, 0.0]  # fmt: skip


def build_models(preset: dict, num_experts: int, device, dtype):
    """The MoBE tower (MoBE in every layer) and its two peers: a wide-MLP ViT and a plain ViT."""
    shape = {k: v for k, v in preset.items() if "batch_size" not in k}
    moe_config = PedCLIPVisionConfig(**shape, num_experts=num_experts, moe_layers=list(range(shape["num_hidden_layers"])))
    moe = PedCLIPVisionModel(moe_config)
    wide = ViTModel(ViTConfig(**{**shape, "intermediate_size": num_experts * shape["intermediate_size"]}),
                    add_pooling_layer=False)  # fmt: skip
    plain = ViTModel(ViTConfig(**shape), add_pooling_layer=False)
    return [m.to(device=device, dtype=dtype) for m in (moe, wide, plain)]


def step_fn(model, pixels, train: bool, **route):
    """One forward (no grad) or one training step (forward + backward of a scalar) of `model`."""

    def run():
        if train:
            model.zero_grad(set_to_none=True)
            model(pixels, **route).last_hidden_state.float().square().mean().backward()
        else:
            with torch.no_grad():
                model(pixels, **route)

    return run


def skewed_labels(num_experts: int, batch: int) -> torch.Tensor:
    mix = torch.tensor(SKEWED_MIX[:num_experts]) + 1e-9
    return torch.multinomial(mix / mix.sum(), batch, replacement=True, generator=torch.Generator().manual_seed(0))


def benchmark_rows(moe, wide, plain, pixels, routed_pixels, labels):
    """(name, model, peer, pixels, train, routing kwargs, peer name, target) for each reported ratio."""
    soft, label, topk = {"router_mode": "soft"}, {"router_mode": "label", "body_part_labels": labels}, {"router_mode": "topk"}
    return [
        ("soft, forward", moe, wide, pixels, False, soft, "wide ViTModel (E x MLP)", 1.15),
        ("soft, training step", moe, wide, pixels, True, soft, "wide ViTModel (E x MLP)", 1.2),
        ("label, forward", moe, plain, routed_pixels, False, label, "plain ViTModel", 1.3),
        ("label, training step", moe, plain, routed_pixels, True, label, "plain ViTModel", 1.3),
        ("top-1, forward", moe, plain, routed_pixels, False, topk, "plain ViTModel", 1.3),
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="cpu-small")
    parser.add_argument("--num_experts", type=int, default=23)
    parser.add_argument("--batch_size", type=int, default=None, help="soft rows (default: the preset's)")
    parser.add_argument("--routed_batch_size", type=int, default=None, help="label/top-1 rows (default: the preset's)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--check", action="store_true", help="exit 1 if a ratio misses its target")
    args = parser.parse_args()

    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    preset = PRESETS[args.preset]
    batch, routed_batch = args.batch_size or preset["batch_size"], args.routed_batch_size or preset["routed_batch_size"]
    moe, wide, plain = build_models(preset, args.num_experts, device, dtype)
    size = preset["image_size"]
    pixels = torch.randn(batch, 3, size, size, device=device, dtype=dtype)
    routed_pixels = torch.randn(routed_batch, 3, size, size, device=device, dtype=dtype)
    labels = skewed_labels(args.num_experts, routed_batch).to(device)
    with torch.no_grad():
        topk_experts = moe(routed_pixels, router_mode="topk").gate_logits[0].argmax(-1)
    print(f"preset {args.preset}, {args.num_experts} experts, {args.dtype} on {device}, {torch.get_num_threads()} "
          f"threads; soft batch {batch}, routed batch {routed_batch}: the label mix uses {labels.unique().numel()} "
          f"experts, top-1 (untrained gate) {topk_experts.unique().numel()}")  # fmt: skip

    missed = []
    print(f"{'PedCLIP vision tower':<24}{'peer':<26}{'ms':>9}{'peer ms':>9}{'ratio':>7}{'target':>8}")
    for name, model, peer, inputs, train, route, peer_name, target in benchmark_rows(
        moe, wide, plain, pixels, routed_pixels, labels
    ):
        model.train(train), peer.train(train)
        ms, peer_ms, ratio = paired_ratio(
            step_fn(model, inputs, train, **route), step_fn(peer, inputs, train), device, args.repeats
        )
        missed += [name] if ratio > target else []
        verdict = "ok" if ratio <= target else "MISSED"
        print(f"{name:<24}{peer_name:<26}{ms * 1e3:9.1f}{peer_ms * 1e3:9.1f}{ratio:7.3f}{'<=' + str(target):>8} {verdict}")
    if args.check and missed:
        sys.exit(f"missed targets: {missed}")


if __name__ == "__main__":
    main()
