"""The engine's pieces without processes: DeepSpeed JSON, parameter groups, schedule, sharded EMA."""
from __future__ import annotations

import json

import pytest
import torch

from pretrain.config import EngineConfig, OptimConfig
from pretrain.engine.ema import ShardedEMA, consolidated_ema, shard_range
from pretrain.engine.deepspeed_engine import deepspeed_config, param_groups
from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.engine.schedule import lr_multiplier


def test_deepspeed_config_from_the_typed_config_with_a_raw_json_override(tmp_path):
    engine = EngineConfig(zero_stage=3, precision="bf16", grad_clip=0.5)
    config = deepspeed_config(engine, micro_batch=16, grad_accum_steps=4, load_universal=True)
    assert config["zero_optimization"] == {"stage": 3} and config["bf16"] == {"enabled": True}
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"], config["gradient_clipping"]) == (16, 4, 0.5)
    assert config["checkpoint"] == {"load_universal": True}
    raw = tmp_path / "ds.json"
    raw.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1000}, "gradient_clipping": 2.0}))
    merged = deepspeed_config(engine.model_copy(update={"deepspeed_json": str(raw)}), micro_batch=16, grad_accum_steps=4)
    assert merged["zero_optimization"] == {"stage": 3, "stage3_prefetch_bucket_size": 1000}  # merged, not replaced
    assert merged["gradient_clipping"] == 2.0 and merged["bf16"] == {"enabled": True}
    raw.write_text("{not json")
    with pytest.raises(ValueError, match="ds.json is not valid JSON"):
        deepspeed_config(engine.model_copy(update={"deepspeed_json": str(raw)}), micro_batch=1, grad_accum_steps=1)
    with pytest.raises(FileNotFoundError, match="engine.deepspeed_json"):
        deepspeed_config(engine.model_copy(update={"deepspeed_json": str(tmp_path / "none.json")}), micro_batch=1, grad_accum_steps=1)


def groups_by_param(model, optim):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in param_groups(model, optim) for p in g["params"]}


def test_weight_decay_skips_biases_norms_position_embedding_and_class_token():
    objective = build_objective("softmax_xent", build_model("vit_demo", num_classes=10))
    groups = groups_by_param(objective, OptimConfig(lr=1e-3, weight_decay=0.1))
    assert len(groups) == sum(1 for _ in objective.parameters())
    for name in ("backbone.pos_embed", "backbone.cls_token", "backbone.blocks.0.norm1.weight", "backbone.head.bias"):
        assert groups[name] == (1e-3, 0.0), name
    assert groups["backbone.blocks.0.attn.qkv.weight"] == (1e-3, 0.1)


def test_layer_decay_scales_the_lr_by_depth_and_keeps_objective_parameters_at_full_lr():
    objective = build_objective("mae", build_model("vit_demo", num_classes=10), decoder_dim=32, decoder_depth=1, decoder_heads=2)
    groups = groups_by_param(objective, OptimConfig(lr=1e-3, weight_decay=0.05, layer_decay=0.5))
    lr = {name: g[0] for name, g in groups.items()}
    # vit_demo: embeddings (layer 0), 4 blocks (1-4), head (5): lr x 0.5^(5 - layer)
    assert lr["backbone.patch_embed.proj.weight"] == pytest.approx(1e-3 * 0.5**5)
    assert lr["backbone.blocks.0.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5**4)
    assert lr["backbone.blocks.3.mlp.fc1.weight"] == pytest.approx(1e-3 * 0.5**1)
    assert lr["backbone.head.weight"] == pytest.approx(1e-3)
    assert lr["mask_token"] == 1e-3 and groups["decoder_embed.weight"] == (1e-3, 0.05)
    assert groups["backbone.pos_embed"][1] == 0.0


def test_schedule_warmup_then_linear_or_cosine():
    kw = dict(total_steps=110, warmup_steps=10)
    assert [lr_multiplier(s, decay="linear", **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [lr_multiplier(s, decay="linear", **kw) for s in (10, 60, 110)] == pytest.approx([1.0, 0.5, 0.0])
    assert lr_multiplier(60, decay="cosine", **kw) == pytest.approx(0.5)
    assert lr_multiplier(110, decay="cosine", min_ratio=0.1, **kw) == pytest.approx(0.1)


def test_sharded_ema_equals_the_full_average_and_reslices_to_another_world_size(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.Linear(3, 1))  # 15, 3, 3, 1 elements: uneven shards
    full = ShardedEMA(model, decay=0.9, warmup=True, rank=0, world_size=1)
    shards = [ShardedEMA(model, decay=0.9, warmup=True, rank=r, world_size=2) for r in range(2)]
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        for ema in (full, *shards):
            ema.update()
        decay = min(0.9, (1 + t) / (10 + t))
        expected = {n: decay * expected[n] + (1 - decay) * p.detach() for n, p in model.named_parameters()}
    for ema in shards:
        ema.save(tmp_path)
    assert [shard_range(15, r, 2) for r in range(2)] == [(0, 8), (8, 15)]
    averaged = consolidated_ema(tmp_path)
    for name, value in expected.items():
        torch.testing.assert_close(averaged[name], value)
        torch.testing.assert_close(full.shadow[name].view_as(value), value)
    three = ShardedEMA(model, decay=0.9, warmup=True, rank=2, world_size=3)
    three.load(tmp_path)
    assert three.updates == 4
    torch.testing.assert_close(three.shadow["0.weight"], expected["0.weight"].flatten()[10:15])
    assert three.shadow["1.bias"].numel() == 0  # 1 element on 3 ranks: rank 0 holds it
