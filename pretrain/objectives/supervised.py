"""Supervised objectives: softmax cross-entropy (i21k-style) and sigmoid cross-entropy (JFT-style)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pretrain.objectives.registry import register_objective


@register_objective("softmax_xent")
class SoftmaxXent(nn.Module):
    """Single-label classification (ImageNet-21k style)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.backbone(images)
        loss = F.cross_entropy(logits.float(), targets)  # class indices, or mixup's soft targets (B, C)
        labels = targets.argmax(-1) if targets.ndim == 2 else targets
        return loss, {"accuracy": (logits.argmax(-1) == labels).float().mean()}


@register_objective("sigmoid_xent")
class SigmoidXent(nn.Module):
    """Multi-label classification on multi-hot targets (JFT style): summed over classes."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.backbone(images).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(-1).mean()
        top1 = targets.gather(1, logits.argmax(-1, keepdim=True)).mean()  # precision@1
        return loss, {"accuracy": top1}
