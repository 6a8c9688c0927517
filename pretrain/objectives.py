"""Training objectives: modules that wrap a backbone and return (loss, metrics).

DeepSpeed wraps the objective module, so everything an objective trains (a decoder, a
mask token) lives inside it; exports keep only `objective.backbone`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

OBJECTIVES: dict[str, Callable[..., nn.Module]] = {}


def register_objective(name: str):
    def wrap(cls):
        OBJECTIVES[name] = cls
        return cls

    return wrap


def build_objective(name: str, backbone: nn.Module, **kwargs) -> nn.Module:
    if name not in OBJECTIVES:
        raise KeyError(f"unknown objective {name!r}; known: {', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[name](backbone, **kwargs)


@register_objective("softmax_xent")
class SoftmaxXent(nn.Module):
    """Single-label classification (ImageNet-21k style)."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.backbone(images)
        loss = F.cross_entropy(logits.float(), targets)
        return loss, {"accuracy": (logits.argmax(-1) == targets).float().mean()}


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
