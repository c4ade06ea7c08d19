"""Trainable heads for the trained evaluation tasks: a linear head on a vision tower's pooled feature, the tower and
head together (`VisionClassifier`, used by `finetune` and by fine-tuned `regression`), and a light progressive
upsampling decoder on frozen ViT patch tokens (`segmentation`)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class ClassificationHead(nn.Module):
    """BatchNorm (no affine: standardises each feature, as MAE's linear probe), dropout and one linear layer from
    `in_features` (+ `extra_features`, e.g. a one-hot sex, appended after the norm) to `num_outputs` logits (or
    regression outputs). The linear layer starts at zero: a fresh head predicts its bias only."""

    def __init__(self, in_features: int, num_outputs: int, extra_features: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(in_features + extra_features, num_outputs)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.training and features.shape[0] == 1:  # batch statistics need two rows: use the running ones
            features = F.batch_norm(features, self.norm.running_mean, self.norm.running_var, eps=self.norm.eps)
        else:
            features = self.norm(features)
        if extra is not None:
            features = torch.cat([features, extra.to(features.dtype)], dim=-1)
        return self.linear(self.dropout(features))


class VisionClassifier(nn.Module):
    """An adapter's vision tower and a `ClassificationHead` on its pooled feature (`adapter.vision_features`).

    The tower is registered as a sub-module, so `parameters()`, `train()` and `state_dict()` cover both; the forward
    goes through `adapter.vision_features`, which runs that same tower."""

    def __init__(self, adapter, head: ClassificationHead):
        super().__init__()
        self.adapter = adapter
        self.tower = adapter.vision_tower()
        self.head = head

    def forward(self, pixel_values: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        pooled, _ = self.adapter.vision_features(pixel_values)
        return self.head(pooled.float(), extra)


def _conv_block(in_channels: int, out_channels: int) -> nn.Sequential:
    groups = math.gcd(out_channels, 8)
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.GroupNorm(groups, out_channels),
        nn.GELU(),
    )


class SegmentationDecoder(nn.Module):
    """Progressive upsampling decoder (SETR-PUP style) on ViT patch tokens.

    Patch tokens `[B, gh*gw, hidden]` are reshaped to the patch grid, projected to `channels` by a 1x1 conv, then
    `ceil(log2(output_size / grid))` stages of (3x3 conv, GroupNorm, GELU, bilinear upsample x2) bring them to (at
    least) the input size, halving the channels each stage (down to 16); a 1x1 conv gives `num_classes` logits,
    resized bilinearly to `output_size` exactly when the ratio is not a power of two (e.g. patch 14)."""

    def __init__(
        self, hidden_size: int, grid: tuple[int, int], output_size: tuple[int, int], num_classes: int = 1,
        channels: int = 64,
    ):  # fmt: skip
        super().__init__()
        self.grid, self.output_size = tuple(grid), tuple(output_size)
        ratio = max(output_size[0] / grid[0], output_size[1] / grid[1])
        stages = max(0, math.ceil(math.log2(ratio) - 1e-9))
        self.project = nn.Conv2d(hidden_size, channels, 1)
        blocks, width = [], channels
        for _ in range(stages):
            out = max(16, width // 2)
            blocks.append(_conv_block(width, out))
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """`[B, N, hidden]` -> logits `[B, num_classes, *output_size]`."""
        batch, tokens, hidden = patch_tokens.shape
        if tokens != self.grid[0] * self.grid[1]:
            raise ValueError(f"got {tokens} patch tokens; the decoder's {self.grid} grid needs {math.prod(self.grid)}")
        x = patch_tokens.transpose(1, 2).reshape(batch, hidden, *self.grid)
        x = self.project(x)
        for block in self.blocks:
            x = F.interpolate(block(x), scale_factor=2, mode="bilinear", align_corners=False)
        x = self.classifier(x)
        if tuple(x.shape[-2:]) != self.output_size:
            x = F.interpolate(x, size=self.output_size, mode="bilinear", align_corners=False)
        return x
