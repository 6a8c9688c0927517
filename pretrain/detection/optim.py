"""DeepSpeed engine of the detection objective: the project's DeepSpeed config and schedule,
with the backbone in its own parameter groups (a smaller learning rate, 0 while frozen)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from timm.optim import param_groups_weight_decay
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import EngineConfig, OptimConfig
from pretrain.engine import deepspeed_config
from pretrain.schedule import lr_multiplier

OPTIMIZERS = {
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr, betas=o.betas),
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum),
}


def _groups(module: nn.Module, weight_decay: float, lr: float, part: str) -> list[dict]:
    # No decay on biases, norms, and what timm's model names (position embeddings, tokens).
    skip = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    groups = param_groups_weight_decay(module, weight_decay, no_weight_decay_list=skip)
    return [{**g, "lr": lr, "part": part} for g in groups]


def _backbone_multiplier(step: int, *, freeze_steps: int, **schedule) -> float:
    # lr 0 is an exact freeze under every ZeRO stage: AdamW/Adam/SGD updates and decay all scale with lr.
    return 0.0 if step < freeze_steps else lr_multiplier(step, **schedule)


def build_detection_engine(objective: nn.Module, *, optim: OptimConfig, engine: EngineConfig, micro_batch: int,
                           total_steps: int, backbone_lr_scale: float, freeze_steps: int):
    """`deepspeed.initialize` over `objective` (a `DetectionObjective`); returns the engine."""
    import deepspeed

    detector = objective.detector
    groups = _groups(detector.backbone, optim.weight_decay, optim.lr * backbone_lr_scale, "backbone")
    groups += _groups(detector.head, optim.weight_decay, optim.lr, "head")
    if sum(len(g["params"]) for g in groups) != sum(1 for p in objective.parameters() if p.requires_grad):
        raise ValueError("the detection objective has parameters outside detector.backbone and detector.head")
    optimizer = OPTIMIZERS[optim.name](groups, optim)
    schedule = dict(total_steps=total_steps, warmup_steps=optim.warmup_steps, decay=optim.decay, min_ratio=optim.min_lr_ratio)
    multipliers = [
        functools.partial(_backbone_multiplier, freeze_steps=freeze_steps, **schedule) if g["part"] == "backbone"
        else functools.partial(lr_multiplier, **schedule)
        for g in groups
    ]
    ds_engine, *_ = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, multipliers),
        config=deepspeed_config(engine, micro_batch=micro_batch),
    )
    return ds_engine
