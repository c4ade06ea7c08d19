"""Evaluation of a PedCLIP model on a split: embeddings, retrieval recall, gate (routing) accuracy, zero-shot AUC."""

from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score


@torch.no_grad()
def embed_split(model, collator, rows, batch_size: int = 64, router_mode: str = "soft") -> dict[str, torch.Tensor]:
    """Normalised image/text embeddings, gate logits (mean over MoBE layers) and labels of every row of `rows`."""
    model.eval()
    parts = {"image_embeds": [], "text_embeds": [], "gate_logits": [], "body_part_labels": []}
    for start in range(0, len(rows), batch_size):
        batch = collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
        out = model(**batch, router_mode=router_mode)
        parts["image_embeds"].append(out.image_embeds)
        parts["text_embeds"].append(out.text_embeds)
        parts["gate_logits"].append(torch.stack(out.gate_logits).mean(0))
        parts["body_part_labels"].append(batch["body_part_labels"])
    return {name: torch.cat(values) for name, values in parts.items()}


def retrieval_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, ks=(1, 5)) -> dict[str, float]:
    """Image->text and text->image recall@k, the i-th image matching the i-th text."""
    similarity = image_embeds @ text_embeds.t()
    targets = torch.arange(len(similarity))
    metrics = {}
    for direction, sim in (("image_to_text", similarity), ("text_to_image", similarity.t())):
        ranks = (sim > sim[targets, targets][:, None]).sum(1)  # how many candidates beat the true match
        metrics.update({f"{direction}_R@{k}": (ranks < k).float().mean().item() for k in ks})
    return metrics


def routing_accuracy(gate_logits: torch.Tensor, body_part_labels: torch.Tensor) -> float:
    return (gate_logits.argmax(-1) == body_part_labels).float().mean().item()


@torch.no_grad()
def zero_shot_auc(model, processor, image_embeds: torch.Tensor, findings: list[list[str]], eligible: dict) -> dict:
    """AUC of each finding from prompts built from its name: score = softmax over ("{finding}", "no {finding}").
    `eligible[finding]` is a boolean mask of the rows whose body part can show it; returns per-finding AUCs and
    their mean."""
    aucs = {}
    for finding, mask in eligible.items():
        labels = np.array([finding in row for row, keep in zip(findings, mask) if keep])
        if labels.min() == labels.max():
            continue  # AUC needs positives and negatives
        text = processor(text=[finding, f"no {finding}"], padding=True, return_tensors="pt")
        text_embeds = torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1)
        logits = image_embeds[torch.as_tensor(mask)] @ text_embeds.t()
        aucs[finding] = float(roc_auc_score(labels, logits.softmax(-1)[:, 0].numpy()))
    return {"zero_shot_auc": float(np.mean(list(aucs.values()))), "zero_shot_auc_per_finding": aucs}


def finding_eligibility(findings: list[list[str]], body_parts: list[str]) -> dict[str, list[bool]]:
    """For each finding, which rows can show it: the rows of the body parts where it occurs at all."""
    parts_with = defaultdict(set)
    for part, row_findings in zip(body_parts, findings):
        for finding in row_findings:
            parts_with[finding].add(part)
    return {finding: [part in parts for part in body_parts] for finding, parts in sorted(parts_with.items())}
