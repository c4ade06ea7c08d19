"""Contrastive loss over the GLOBAL batch: features gathered from every process with their gradient.

Every process computes the same loss over the gathered batch; the gather's backward sums the gradients of all
processes for each process's own rows (N times one process's gradient), which DDP's averaging divides back by N,
so N processes x batch b train exactly like 1 process x batch N*b.
"""

import torch
import torch.distributed as dist

from modeling_pedclip import contrastive_loss


class GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal sizes on every process); backward all-reduces and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rows = tensor.shape[0]
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # gloo has no reduce-scatter
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return GatherWithGrad.apply(tensor)


def global_contrastive_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor):
    """Symmetric InfoNCE over the batch of all processes (embeddings L2-normalised)."""
    images, texts = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
    return contrastive_loss(images @ texts.t() * logit_scale.exp())
