"""The self-supervised recipes validate, and their objectives build on their models (meta device: no memory)."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import PretrainConfig, load_config
from pretrain.models import build_model
from pretrain.objectives import build_objective

RECIPES = {
    "configs/pretrain/vit_b16_mpp.yaml": 98,  # 196 patches, half corrupted
    "configs/pretrain/mae_vit_l16.yaml": 147,  # 196 patches, 49 visible
    "configs/pretrain/demo_mpp.yaml": 24,  # 49 patches
    "configs/pretrain/demo_mae.yaml": 37,
}


@pytest.mark.parametrize("path", sorted(RECIPES))
def test_recipe_builds_its_objective(path):
    cfg = load_config(PretrainConfig, path)
    assert cfg.data.label_mode == "none"
    # The objective undoes (MPP) or draws with (MAE) the data's own normalisation.
    assert tuple(cfg.train.objective_kwargs["pixel_mean"]) == cfg.data.mean
    assert tuple(cfg.train.objective_kwargs["pixel_std"]) == cfg.data.std
    with torch.device("meta"):
        backbone = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
        objective = build_objective(cfg.train.objective, backbone, **cfg.train.objective_kwargs)
    num_patches = backbone.patch_embed.num_patches
    if cfg.train.objective == "mae":
        assert num_patches - objective.num_visible == RECIPES[path]
    else:
        assert round(objective.corrupt_ratio * num_patches) == RECIPES[path]
