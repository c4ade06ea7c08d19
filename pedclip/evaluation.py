"""Evaluation of a PedCLIP model on a split: embeddings, retrieval recall, gate (routing) accuracy, zero-shot AUC."""

from collections import defaultdict

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from modeling_pedclip import mean_gate_logits


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
        parts["gate_logits"].append(mean_gate_logits(out.gate_logits))
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


def _float_tensor(x) -> torch.Tensor:
    return x.detach().float().cpu() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, np.float32))


def positive_negative_probabilities(image_embeds, positive_embeds, negative_embeds) -> np.ndarray:
    """`[N, L]` CheXzero zero-shot score: for each image and label l, the softmax over the cosine logits
    (image·positive_l, image·negative_l), taken at the positive prompt. Inputs `[N, D]`, `[L, D]`, `[L, D]`
    (normalised; tensors or arrays). The one implementation shared by `zero_shot_auc` and `eval`'s zero_shot."""
    image, positive, negative = (_float_tensor(x) for x in (image_embeds, positive_embeds, negative_embeds))
    logits = torch.stack([image @ positive.t(), image @ negative.t()], dim=-1)
    return logits.softmax(-1)[..., 0].numpy()


def masked_label_aucs(labels, scores, masks, names: list[str]) -> dict[str, float]:
    """AUC of each label column of `[N, L]` `labels`/`scores` over the rows where `masks[:, l]`; a label whose
    masked rows hold only positives or only negatives is left out (AUC needs both)."""
    labels, scores, masks = np.asarray(labels, bool), np.asarray(scores), np.asarray(masks, bool)
    aucs = {}
    for column, name in enumerate(names):
        y = labels[masks[:, column], column]
        if y.size and y.min() != y.max():
            aucs[name] = float(roc_auc_score(y, scores[masks[:, column], column]))
    return aucs


@torch.no_grad()
def zero_shot_auc(model, processor, image_embeds: torch.Tensor, findings: list[list[str]], eligible: dict) -> dict:
    """AUC of each finding from prompts built from its name: score = softmax over ("{finding}", "no {finding}").
    `eligible[finding]` is a boolean mask of the rows whose body part can show it; returns per-finding AUCs and
    their mean."""
    names = list(eligible)
    pairs = []
    for finding in names:
        text = processor(text=[finding, f"no {finding}"], padding=True, return_tensors="pt")
        pairs.append(torch.nn.functional.normalize(model.get_text_features(**text).pooler_output, dim=-1))
    if not pairs:
        return {"zero_shot_auc": float("nan"), "zero_shot_auc_per_finding": {}}
    pairs = torch.stack(pairs)  # [L, 2, D]
    scores = positive_negative_probabilities(image_embeds, pairs[:, 0], pairs[:, 1])
    labels = [[finding in row for finding in names] for row in findings]
    masks = np.stack([np.asarray(eligible[finding], bool) for finding in names], axis=1)
    aucs = masked_label_aucs(labels, scores, masks, names)
    return {"zero_shot_auc": float(np.mean(list(aucs.values()))), "zero_shot_auc_per_finding": aucs}


def finding_eligibility(findings: list[list[str]], body_parts: list[str]) -> dict[str, list[bool]]:
    """For each finding, which rows can show it: the rows of the body parts where it occurs at all."""
    parts_with = defaultdict(set)
    for part, row_findings in zip(body_parts, findings):
        for finding in row_findings:
            parts_with[finding].add(part)
    return {finding: [part in parts for part in body_parts] for finding, parts in sorted(parts_with.items())}
