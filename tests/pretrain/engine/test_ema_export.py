"""The EMA export of a model with BatchNorm (PerViT's stem) is a whole model: buffers included."""
from __future__ import annotations

import json

import torch

from pretrain.engine.ema import ShardedEMA
from pretrain.checkpoint.export import export_checkpoint, load_exported
from pretrain.models import build_model
from pretrain.objectives import build_objective


def test_ema_export_of_a_batchnorm_model_carries_its_running_statistics_and_loads(tmp_path):
    torch.manual_seed(0)
    objective = build_objective("softmax_xent", build_model("pervit_demo", num_classes=10))
    objective.train()
    objective.backbone(torch.randn(4, 3, 64, 64))  # BatchNorm statistics move off their initial values
    ema = ShardedEMA(objective, decay=0.9, warmup=True, rank=0, world_size=1)
    ema.update()
    tag = tmp_path / "checkpoints" / "step00000001"
    tag.mkdir(parents=True)
    ema.save(tag)
    config = {"model": {"name": "pervit_demo", "kwargs": {}}, "engine": {"zero_stage": 2, "precision": "fp32"},
              "data": {"num_classes": 10, "image_size": 64, "mean": [0.5] * 3, "std": [0.5] * 3}}
    (tag / "meta.json").write_text(json.dumps({"config": config, "step": 1}))
    (tmp_path / "checkpoints" / "latest").write_text(tag.name)

    out = export_checkpoint(tmp_path / "checkpoints", tmp_path / "model_ema.safetensors", weights="ema")
    model, meta = load_exported(out)  # strict: every buffer present
    live = objective.backbone.state_dict()
    stats = [k for k in live if k.endswith("running_mean")]
    assert stats and meta["weights"] == "ema"
    for key in stats:
        assert live[key].abs().sum() > 0
        torch.testing.assert_close(model.state_dict()[key], live[key])
