"""Variant table over timm's classes (style: timm's `@register_model` one-liners).

Every entry names the timm architecture it is built from, so an export of its weights loads
back with `timm.create_model(timm_name, **timm_kwargs)` and `strict=True`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    timm_name: str
    kwargs: dict[str, Any] = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {
    # Tiny variant for CPU demos and tests: 28 px grey-as-RGB inputs, 7x7 patches grid.
    "vit_demo": ModelSpec("vit_tiny_patch16_224", dict(img_size=28, patch_size=4, embed_dim=96, depth=4, num_heads=3)),
    "vit_ti16": ModelSpec("vit_tiny_patch16_224"),
    "vit_s16": ModelSpec("vit_small_patch16_224"),
    "vit_b16": ModelSpec("vit_base_patch16_224"),
    "vit_l16": ModelSpec("vit_large_patch16_224"),
    "vit_h14": ModelSpec("vit_huge_patch14_224"),
}


def export_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """The timm name and keyword arguments that rebuild `name` with `overrides` applied."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    return {"timm_name": spec.timm_name, "timm_kwargs": {**spec.kwargs, **overrides}}


def build_model(name: str, *, num_classes: int, grad_checkpointing: bool = False, **overrides: Any) -> nn.Module:
    """Build variant `name` with a `num_classes` head; `overrides` reach timm's constructor."""
    spec = export_spec(name, num_classes=num_classes, **overrides)
    model = timm.create_model(spec["timm_name"], pretrained=False, **spec["timm_kwargs"])
    model.set_grad_checkpointing(grad_checkpointing)
    return model
