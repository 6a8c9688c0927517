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


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> dict[str, torch.Tensor]:
    """{attention module name: (B, heads, N, N) probabilities} of one eval-mode forward pass."""
    enable_attention_maps(model)
    maps: dict[str, torch.Tensor] = {}
    hooks = [
        module.register_forward_hook(lambda _m, _inp, out, key=name.removesuffix(".attn_drop"): maps.__setitem__(key, out))
        for name, module in model.named_modules()
        if name.endswith("attn_drop")
    ]
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return maps
