"""Run by test_zero_init.py under torchrun on 2 gloo ranks, in one process group:

1. models built under `deepspeed.zero.Init` (engine.build_partitioned at ZeRO-3) against the
   same seed built plainly: each rank's share of the parameters, and the gathered weights;
2. the trainer's own `run` on the ViT-22B-shaped tiny twin at ZeRO-3 (zero.Init on), then a
   resumed run of the same output folder for more steps.

    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.pretrain.engine.zero_init_run \
        --out RESULT.json --config RECIPE --job "k=v ..." --job "k=v ..."
"""
from __future__ import annotations

import argparse
import json
import shlex

import torch
import torch.distributed as dist

from pretrain.config import EngineConfig, PretrainConfig, load_config
from pretrain.engine.distributed import init_distributed, shutdown
from pretrain.engine.deepspeed_engine import build_partitioned, full_state_dict
from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.tasks.pretrain import run

# case -> (registry name, objective or None, build_model arguments)
CASES = {
    "vit_demo": ("vit_demo", None, {}),
    "vit_22b_demo": ("vit_22b_demo", None, {}),
    "vit_demo_2d_pre_logits": ("vit_demo", None, {"pos_embed": "2d", "pre_logits_size": 48}),
    "mae_vit_demo": ("vit_demo", "mae", {}),
}


def build(name: str, objective: str | None, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, **kwargs)
    return model if objective is None else build_objective(objective, model, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def compare(is_main: bool) -> dict:
    engine = EngineConfig(zero_stage=3, param_persistence_threshold=0)  # partition every tensor, however small
    out = {}
    for case, args in CASES.items():
        plain = build(*args).state_dict()
        sharded = build_partitioned(lambda: build(*args), engine, micro_batch=2)
        params = list(sharded.parameters())
        own = sum(p.ds_tensor.numel() for p in params)
        whole = sum(p.ds_numel for p in params)
        held = sum(p.numel() for p in params)  # what the module itself holds outside forward
        full = full_state_dict(sharded, is_main=is_main)
        if is_main:
            out[case] = {
                "same_keys": sorted(full) == sorted(plain),
                "max_abs_diff": max((full[k] - plain[k].float()).abs().max().item() for k in plain),
                "own_fraction": own / whole, "held_elements": held,
            }
        del sharded
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--config", required=True)
    parser.add_argument("--job", action="append", required=True)
    args = parser.parse_args()
    configs = [load_config(PretrainConfig, args.config, shlex.split(job)) for job in args.job]
    dist_info = init_distributed()
    try:
        result = {"compare": compare(dist_info.is_main), "runs": []}
        for cfg in configs:
            result["runs"].append(run(cfg, dist_info))
            dist.barrier()
        if dist_info.is_main:
            with open(args.out, "w") as f:
                json.dump(result, f)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
