"""The paper recipes hold the ViT paper's hyperparameters (App. B.1, Table 3) and run on any GPU count."""
from __future__ import annotations

from pathlib import Path

import pytest

from pretrain.config import EngineConfig, PretrainConfig, load_config
from pretrain.engine.deepspeed_engine import resolve_grad_accum
from pretrain.models import MODELS

CONFIGS = Path(__file__).resolve().parents[3] / "configs" / "pretrain"

# recipe: (model, base lr, weight decay, dropout, objective, label mode, classes, epochs)
PAPER = {
    "vit_b16_jft": ("vit_b16", 8e-4, 0.1, 0.0, "sigmoid_xent", "multi", 18291, 7),
    "vit_l16_jft": ("vit_l16", 4e-4, 0.1, 0.0, "sigmoid_xent", "multi", 18291, 7),
    "vit_h14_jft": ("vit_h14", 3e-4, 0.1, 0.0, "sigmoid_xent", "multi", 18291, 14),
    "vit_h14_i21k": ("vit_h14", 1e-3, 0.03, 0.1, "softmax_xent", "single", 21843, 90),
    "r50_vit_b16_i21k": ("r50_vit_b16", 1e-3, 0.03, 0.1, "softmax_xent", "single", 21843, 90),
}
IMAGES = {"multi": 303e6, "single": 14_197_122}  # JFT-300M, ImageNet-21k (fall 2011)


@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_paper_recipe(recipe):
    model, lr, wd, dropout, objective, label_mode, classes, epochs = PAPER[recipe]
    cfg = load_config(PretrainConfig, CONFIGS / f"{recipe}.yaml")
    assert cfg.model.name == model and cfg.model.kwargs["pre_logits_size"] == MODELS[model].kwargs["embed_dim"]
    assert cfg.model.kwargs.get("proj_drop_rate", 0.0) == cfg.model.kwargs.get("pos_drop_rate", 0.0) == dropout
    assert (cfg.optim.name, cfg.optim.betas, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", (0.9, 0.999), lr, wd)
    assert (cfg.optim.warmup_steps, cfg.optim.decay, cfg.optim.min_lr_ratio) == (10_000, "linear", 0.0)
    assert (cfg.engine.global_batch, cfg.engine.grad_clip, cfg.engine.precision) == (4096, 1.0, "bf16")
    assert (cfg.train.objective, cfg.data.label_mode, cfg.data.num_classes, cfg.data.image_size) == (objective, label_mode, classes, 224)
    assert cfg.train.steps == pytest.approx(epochs * IMAGES[label_mode] / 4096, abs=1)
    # the same recipe on 1 node of 8 GPUs up to as many GPUs as the batch allows without accumulation
    for gpus in (8, 16, 32, 4096 // cfg.data.batch_size):
        accum = resolve_grad_accum(cfg.engine, micro_batch=cfg.data.batch_size, world_size=gpus)
        assert cfg.data.batch_size * accum * gpus == 4096


def test_global_batch_that_does_not_divide_fails_naming_the_fix():
    with pytest.raises(ValueError, match=r"engine.global_batch=4096 is not a multiple of data.batch_size=48 x 8 ranks"):
        resolve_grad_accum(EngineConfig(global_batch=4096), micro_batch=48, world_size=8)
    assert resolve_grad_accum(EngineConfig(grad_accum_steps=3), micro_batch=48, world_size=8) == 3
