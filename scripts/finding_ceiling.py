"""How much of PeXR-mini's findings can the CPU demo's vision tower learn at all? An upper bound for its zero-shot AUC.

    python scripts/finding_ceiling.py                                   # the demo's tower: 128 px, 16 px patches
    python scripts/finding_ceiling.py --image_size 64 --patch_size 8 --patients 3000 --steps 2000

The demo's zero-shot AUC (train_accelerate.py) is an AUC per finding within the body parts that can show it. Here the
same from-scratch PedCLIP vision tower is trained *supervised*, with the finding labels themselves (binary
cross-entropy, one logit per finding), which contrastive training on report text can only approach. Printed, on the
validation + test images: the tower's within-body-part AUC per finding and their mean, and, as a reference that the
findings are visible in the pixels, the same AUCs of a logistic regression on the processed images downsampled to
`--reference_size` px.
"""

import argparse
import json
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from configuration_pedclip import PedCLIPVisionConfig
from modeling_pedclip import PedCLIPVisionModel
from pexr.synthetic import FINDINGS_BY_BODY_PART, generate_pexr_mini
from processing_pedclip import PedCLIPImageProcessor

FINDINGS = sorted({finding for findings in FINDINGS_BY_BODY_PART.values() for finding in findings})


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=600, help="PeXR-mini size (the demo: 600, seed 42)")
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--patch_size", type=int, default=16)
    p.add_argument("--hidden_size", type=int, default=192)
    p.add_argument("--num_layers", type=int, default=4)
    p.add_argument("--steps", type=int, default=400, help="the demo trains about 400 steps")
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=5e-4)
    p.add_argument("--reference_size", type=int, default=48)
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def split_tensors(data, splits, processor) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """(pixel values, [N, F] finding labels, body parts) of the rows of `splits`."""
    rows = [row for split in splits for row in data[split]]
    pixels = torch.tensor(np.stack(processor([row["image"] for row in rows])["pixel_values"]))
    labels = np.array([[finding in row["findings"] for finding in FINDINGS] for row in rows], dtype=np.float32)
    return pixels, labels, [row["body_part"] for row in rows]


def within_part_aucs(labels: np.ndarray, scores: np.ndarray, body_parts: list[str]) -> dict[str, float]:
    """AUC of each finding over the images of the body parts that can show it."""
    aucs = {}
    for column, finding in enumerate(FINDINGS):
        rows = np.array([finding in FINDINGS_BY_BODY_PART.get(part, ()) for part in body_parts])
        y = labels[rows, column]
        if 0 < y.sum() < len(y):
            aucs[finding] = round(float(roc_auc_score(y, scores[rows, column])), 3)
    return aucs


def train_tower(args, pixels: torch.Tensor, labels: np.ndarray) -> torch.nn.Module:
    """The vision tower + a linear head, trained `args.steps` AdamW steps (warmup 20, cosine) on the labels."""
    config = PedCLIPVisionConfig(
        hidden_size=args.hidden_size, num_hidden_layers=args.num_layers, num_attention_heads=args.hidden_size // 64,
        intermediate_size=2 * args.hidden_size, image_size=args.image_size, patch_size=args.patch_size, moe_layers=[],
    )  # fmt: skip
    tower = PedCLIPVisionModel(config)
    model = torch.nn.Sequential()
    model.tower, model.head = tower, torch.nn.Linear(args.hidden_size, len(FINDINGS))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, betas=(0.9, 0.98), weight_decay=0.1)
    warmup_cosine = lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + np.cos(np.pi * step / args.steps))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine)
    targets, generator = torch.tensor(labels), torch.Generator().manual_seed(args.seed)
    for step in range(args.steps):
        batch = torch.randint(len(pixels), (args.batch_size,), generator=generator)
        logits = model.head(tower(pixels[batch]).pooler_output)
        torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[batch]).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model.eval()


@torch.no_grad()
def tower_scores(model, pixels: torch.Tensor) -> np.ndarray:
    return torch.cat([model.head(model.tower(chunk).pooler_output) for chunk in pixels.split(128)]).numpy()


def pixel_reference(train: tuple, test: tuple, size: int) -> np.ndarray:
    """Scores of one logistic regression per finding on the gray pixels downsampled to `size` px."""
    def features(pixels):
        return torch.nn.functional.adaptive_avg_pool2d(pixels[:, :1], size).flatten(1).numpy()

    x_train, x_test, scores = features(train[0]), features(test[0]), np.zeros_like(test[1])
    for column in range(len(FINDINGS)):
        if 0 < train[1][:, column].sum() < len(train[1]):
            probe = LogisticRegression(C=0.1, max_iter=3000).fit(x_train, train[1][:, column])
            scores[:, column] = probe.decision_function(x_test)
    return scores


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    data = generate_pexr_mini(num_patients=args.patients, seed=args.seed)
    processor = PedCLIPImageProcessor(size=args.image_size)
    train, test = split_tensors(data, ["train"], processor), split_tensors(data, ["validation", "test"], processor)
    start = time.perf_counter()
    model = train_tower(args, train[0], train[1])
    seconds = time.perf_counter() - start
    tower = within_part_aucs(test[1], tower_scores(model, test[0]), test[2])
    pixels = within_part_aucs(test[1], pixel_reference(train, test, args.reference_size), test[2])
    print(json.dumps({
        "train_images": len(train[0]), "eval_images": len(test[0]), "steps": args.steps, "train_seconds": round(seconds),
        "tower_auc_mean": round(float(np.mean(list(tower.values()))), 3), "tower_auc": tower,
        "pixel_logistic_auc_mean": round(float(np.mean(list(pixels.values()))), 3), "pixel_logistic_auc": pixels,
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
