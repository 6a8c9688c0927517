"""Models by name: one table of shapes; a family resolver turns a shape plus options into a build.

`build_model(name, num_classes=..., **overrides)` builds it; `export_spec(name, **overrides)`
names the timm architecture and arguments that load its weights with `strict=True` (timm_name
None where timm lacks the architecture: rebuild those with `build_model`). Options every model
takes: `zero_head=True` (classifier starts at zero, as the ViT paper fine-tunes) and the
`grad_checkpointing` flag (activation checkpointing of every block).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

import torch.nn as nn

from pretrain.models.pervit import PERVIT_SIZES, PerViT
from pretrain.models.vit import BuildPlan, resolve_vit

VIT_PAPER = "Dosovitskiy et al. 2021 (ViT), Table 1"
AUGREG = "Steiner et al. 2022 (How to train your ViT), model table"
SCALING = "Zhai et al. 2022 (Scaling Vision Transformers), Table 2"
VIT22B = "Dehghani et al. 2023 (Scaling Vision Transformers to 22 Billion Parameters), Table 1"
PERVIT_PAPER = "Min et al. 2022 (PerViT), model table"


@dataclass(frozen=True)
class ModelSpec:
    family: str  # key of FAMILIES
    kwargs: dict[str, Any] = field(default_factory=dict)  # the family resolver's shape arguments
    paper_params_m: float | None = None  # published parameter count, millions, 224 px, 1000 classes
    paper: str = ""  # where paper_params_m comes from
    tiny: bool = False  # CPU-sized: the test suite runs it forward and backward


def resolve_pervit(*, num_classes: int, **kwargs: Any) -> BuildPlan:
    return BuildPlan(partial(PerViT, num_classes=num_classes, **kwargs), None, {})


FAMILIES: dict[str, Callable[..., BuildPlan]] = {"vit": resolve_vit, "pervit": resolve_pervit}


def _vit(timm_name: str, patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs: Any) -> dict[str, Any]:
    return dict(timm_name=timm_name, patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads, **kwargs)


MODELS: dict[str, ModelSpec] = {
    # Tiny variants for CPU demos and tests. vit_demo: 28 px grey-as-RGB inputs, 7x7 patch grid.
    "vit_demo": ModelSpec("vit", _vit("vit_tiny_patch16_224", 4, 96, 4, 3, img_size=28), tiny=True),
    # Hybrid on the ResNet stem only (timm's R+ViT-Ti): 32 px -> 8x8 stem map -> 4x4 grid of 2x2 patches.
    "r_vit_demo": ModelSpec("vit", _vit("vit_tiny_r_s16_p8_224", 2, 64, 2, 2, hybrid_layers=(), img_size=32), tiny=True),
    # CPU twins of the largest shapes: the same block layout and MLP ratio, a few blocks.
    "vit_g14_demo": ModelSpec("vit", _vit("vit_giant_patch14_224", 4, 88, 2, 4, mlp_ratio=48 / 11, img_size=32), tiny=True),
    "vit_G14_demo": ModelSpec("vit", _vit("vit_gigantic_patch14_224", 4, 104, 2, 4, mlp_ratio=64 / 13, img_size=32), tiny=True),
    "vit_22b_demo": ModelSpec("vit", _vit("vit_22b", 4, 64, 2, 4, block="parallel", img_size=32), tiny=True),
    "pervit_demo": ModelSpec("pervit", dict(img_size=64, stem_dims=(8, 8, 16, 16), embed_dims=(16, 24, 24, 32),
                                            stage_depths=(1, 1, 1, 1), num_heads=2), tiny=True),
    # The papers' models.
    "vit_ti16": ModelSpec("vit", _vit("vit_tiny_patch16_224", 16, 192, 12, 3), 5.7, AUGREG),
    "vit_s16": ModelSpec("vit", _vit("vit_small_patch16_224", 16, 384, 12, 6), 22.1, AUGREG),
    "vit_b16": ModelSpec("vit", _vit("vit_base_patch16_224", 16, 768, 12, 12), 86, VIT_PAPER),
    "vit_l16": ModelSpec("vit", _vit("vit_large_patch16_224", 16, 1024, 24, 16), 307, VIT_PAPER),
    "vit_h14": ModelSpec("vit", _vit("vit_huge_patch14_224", 14, 1280, 32, 16), 632, VIT_PAPER),
    "vit_g14": ModelSpec("vit", _vit("vit_giant_patch14_224", 14, 1408, 40, 16, mlp_ratio=48 / 11), 1011, SCALING),
    "vit_G14": ModelSpec("vit", _vit("vit_gigantic_patch14_224", 14, 1664, 48, 16, mlp_ratio=64 / 13), 1843, SCALING),
    # timm has no such architecture by name (timm_name None): rebuilt from the registry.
    "vit_22b": ModelSpec("vit", _vit("vit_22b", 14, 6144, 48, 48, block="parallel"), 21_700, VIT22B),
    # R50 hybrids of the ViT paper: 1x1 patches of a BiT ResNet-50 feature map; /16 moves stage 4's
    # blocks into stage 3 (3, 4, 9), /32 keeps all four stages.
    "r50_vit_b16": ModelSpec("vit", _vit("vit_base_r50_s16_224", 1, 768, 12, 12, hybrid_layers=(3, 4, 9))),
    "r50_vit_l32": ModelSpec("vit", _vit("vit_large_r50_s32_224", 1, 1024, 24, 16, hybrid_layers=(3, 4, 6, 3))),
    "pervit_t": ModelSpec("pervit", PERVIT_SIZES["t"], 7.6, PERVIT_PAPER),
    "pervit_s": ModelSpec("pervit", PERVIT_SIZES["s"], 21.5, PERVIT_PAPER),
    "pervit_m": ModelSpec("pervit", PERVIT_SIZES["m"], 44.0, PERVIT_PAPER),
}


def _plan(name: str, overrides: dict[str, Any]) -> BuildPlan:
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    overrides = dict(overrides)
    overrides.setdefault("num_classes", 1000)
    try:
        return FAMILIES[spec.family](**{**spec.kwargs, **overrides})
    except TypeError as err:
        raise _rejected(name, err) from None


def _rejected(name: str, err: TypeError) -> TypeError:
    return TypeError(f"model {name!r} ({MODELS[name].family} family) rejects the given arguments: {err}")


def export_spec(name: str, **overrides: Any) -> dict[str, Any]:
    """The timm name and keyword arguments that rebuild `name` with `overrides` applied.

    `{"timm_name": None, "timm_kwargs": {}}` where timm has no such architecture (PerViT, 2-D
    position embeddings, the tanh pre-logits head).
    """
    overrides.pop("zero_head", None)  # an initialisation, not an architecture
    plan = _plan(name, overrides)
    return {"timm_name": plan.timm_name, "timm_kwargs": dict(plan.timm_kwargs)}


def zero_init_head(model: nn.Module) -> nn.Module:
    """Zero the classifier (ViT paper fine-tuning): the first steps leave the features alone."""
    head = model.get_classifier()
    if isinstance(head, nn.Linear):
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
    return model


def build_model(name: str, *, num_classes: int, grad_checkpointing: bool = False, zero_head: bool = False,
                **overrides: Any) -> nn.Module:
    """Build variant `name` with a `num_classes` head; `overrides` reach the family's constructor."""
    plan = _plan(name, dict(num_classes=num_classes, **overrides))
    try:
        model = plan.build()
    except TypeError as err:
        if "argument" not in str(err):
            raise
        raise _rejected(name, err) from None
    if plan.init is not None:
        plan.init(model)
    model.set_grad_checkpointing(grad_checkpointing)
    return zero_init_head(model) if zero_head else model
