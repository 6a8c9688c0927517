"""The DeepSpeed settings a GPU run needs, generated from the typed `engine:` section, parsed by
DeepSpeed itself, and overridable by a raw JSON file."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepspeed.runtime.config import DeepSpeedConfig

from pretrain.config import EngineConfig, PretrainConfig, load_config
from pretrain.engine.deepspeed_engine import deepspeed_config

REPO = Path(__file__).resolve().parents[3]
GPU_RECIPES = sorted(p for p in (REPO / "configs/pretrain").glob("*.yaml") if not p.name.startswith("demo"))


def test_unset_settings_leave_deepspeeds_defaults():
    generated = deepspeed_config(EngineConfig(zero_stage=3), micro_batch=4)
    assert generated["zero_optimization"] == {"stage": 3} and "data_types" not in generated
    assert "communication_data_type" not in generated


def test_settings_reach_deepspeed_and_a_json_file_overrides_them(tmp_path):
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage3_prefetch_bucket_size": 1234}}))
    engine = EngineConfig(zero_stage=3, precision="bf16", grad_accum_dtype="fp32", communication_dtype="fp32", overlap_comm=True,
                          contiguous_gradients=True, bucket_size=10**8, prefetch_bucket_size=5 * 10**7,
                          param_persistence_threshold=10**5, max_live_parameters=10**9, deepspeed_json=str(override))
    parsed = DeepSpeedConfig(deepspeed_config(engine, micro_batch=4))
    zero = parsed.zero_config
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.communication_data_type == torch.float32
    assert zero.overlap_comm and zero.contiguous_gradients
    assert zero.reduce_bucket_size == zero.allgather_bucket_size == 10**8
    assert zero.prefetch_bucket_size == 1234  # the file wins
    assert zero.param_persistence_threshold == 10**5 and zero.max_live_parameters == 10**9


@pytest.mark.parametrize("recipe", GPU_RECIPES, ids=lambda p: p.stem)
def test_every_bf16_recipe_accumulates_and_reduces_gradients_in_fp32(recipe):
    cfg = load_config(PretrainConfig, recipe)
    parsed = DeepSpeedConfig(deepspeed_config(cfg.engine, micro_batch=cfg.data.batch_size))
    assert parsed.bfloat16_config.enabled and parsed.grad_accum_dtype == "fp32"
    assert parsed.communication_data_type == torch.float32
    if cfg.engine.zero_stage == 3:
        assert cfg.engine.zero_init and parsed.zero_config.param_persistence_threshold > 0
