"""The self-supervised recipes validate, and their objectives build on their models (meta device: no memory)."""
from __future__ import annotations

import pytest
import torch

from pretrain.config import ConfigError, PretrainConfig, load_config
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
    with torch.device("meta"):
        backbone = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
        objective = build_objective(cfg.train.objective, backbone, **cfg.train.objective_kwargs)
    num_patches = backbone.patch_embed.num_patches
    if cfg.train.objective == "mae":
        assert num_patches - objective.num_visible == RECIPES[path]
    else:
        assert round(objective.corrupt_ratio * num_patches) == RECIPES[path]


@pytest.mark.parametrize("path", ["configs/pretrain/demo_mpp.yaml", "configs/pretrain/demo_mae.yaml"])
def test_objectives_take_the_datas_normalisation_also_when_overridden(path):
    # MPP undoes the normalisation for its colour targets and MAE draws with it: both follow data.mean/std.
    cfg = load_config(PretrainConfig, path, ["data.mean=[0.1,0.2,0.3]", "data.std=[0.4,0.5,0.6]"])
    backbone = build_model(cfg.model.name, num_classes=cfg.data.num_classes, **cfg.model.kwargs)
    objective = build_objective(cfg.train.objective, backbone, pixel_mean=cfg.data.mean, pixel_std=cfg.data.std,
                                **cfg.train.objective_kwargs)
    assert objective.pixel_mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert objective.pixel_std.flatten().tolist() == pytest.approx([0.4, 0.5, 0.6])


def test_normalisation_in_objective_kwargs_is_refused_naming_the_data_keys():
    with pytest.raises(ConfigError, match=r"pixel_mean.*set data.mean/data.std"):
        load_config(PretrainConfig, "configs/pretrain/demo_mae.yaml", ["train.objective_kwargs.pixel_mean=[0.5,0.5,0.5]"])
