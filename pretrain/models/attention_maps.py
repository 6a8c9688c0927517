"""Attention probabilities for analysis: every attention module passes them through `attn_drop`."""
from __future__ import annotations

import torch
import torch.nn as nn


def enable_attention_maps(model: nn.Module) -> nn.Module:
    """Turn off timm's fused attention (SDPA) so probabilities exist and pass `attn_drop`.

    Slower and heavier than the fused kernel: for analysis, not training. Our GPSA (timm's
    ConVit) and PerViT attention always compute them explicitly.
    """
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    return model

