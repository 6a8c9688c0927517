"""The DeepSpeed engine: its JSON config generated from our typed config, and one train step."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import EngineConfig, OptimConfig
from pretrain.schedule import lr_multiplier


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(engine: EngineConfig, *, micro_batch: int) -> dict[str, Any]:
    """The DeepSpeed JSON for `engine`; a user's `deepspeed_json` file overrides its keys."""
    zero: dict[str, Any] = {"stage": engine.zero_stage}
    if engine.zero_stage == 3:
        # Gather full weights at save time so exports need no offline consolidation step.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.grad_accum_steps,
        "gradient_clipping": engine.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "steps_per_print": 2**31 - 1,  # we log ourselves
        "wall_clock_breakdown": False,
        # ZeRO without DeepSpeed's compiled optimizers: the client torch optimizer is used.
        "zero_allow_untested_optimizer": True,
    }
    if engine.deepspeed_json:
        path = Path(engine.deepspeed_json)
        if not path.is_file():
            raise FileNotFoundError(f"engine.deepspeed_json: {path} does not exist")
        config = _deep_update(config, json.loads(path.read_text()))
    return config


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    # No weight decay on biases, norms, position embeddings and tokens (timm's grouping).
    groups = param_groups_weight_decay(model, optim.weight_decay)
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=optim.betas)


def build_engine(model: nn.Module, *, optim: OptimConfig, engine: EngineConfig, micro_batch: int, total_steps: int):
    """`deepspeed.initialize` over `model` with our optimizer and schedule; returns the engine."""
    import deepspeed

    optimizer = build_optimizer(model, optim)
    schedule = LambdaLR(
        optimizer,
        functools.partial(
            lr_multiplier, total_steps=total_steps, warmup_steps=optim.warmup_steps,
            decay=optim.decay, min_ratio=optim.min_lr_ratio,
        ),
    )
    ds_engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=schedule,
        config=deepspeed_config(engine, micro_batch=micro_batch),
    )
    return ds_engine


def train_step(ds_engine, batches) -> tuple[float, dict[str, float]]:
    """One optimizer step over `grad_accum_steps` micro-batches; returns mean loss and metrics."""
    losses, metrics = [], {}
    device = ds_engine.device
    dtype = torch.bfloat16 if ds_engine.bfloat16_enabled() else torch.float32
    for images, targets in batches:
        loss, step_metrics = ds_engine(images.to(device, dtype), targets.to(device))
        ds_engine.backward(loss)
        ds_engine.step()
        losses.append(loss.detach().float())
        for k, v in step_metrics.items():
            metrics.setdefault(k, []).append(v.detach().float())
    out = {k: torch.stack(v).mean().item() for k, v in metrics.items()}
    return torch.stack(losses).mean().item(), out
