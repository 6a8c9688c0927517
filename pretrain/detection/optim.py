"""DeepSpeed engine of the detection objective: the project's DeepSpeed config, parameter groups
and schedule, with the backbone's groups at a smaller learning rate (0 while it is frozen)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR

from pretrain.config import EngineConfig, OptimConfig
from pretrain.engine import deepspeed_config, param_groups
from pretrain.schedule import lr_multiplier

OPTIMIZERS = {
    "adamw": lambda groups, o: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas),
    "adam": lambda groups, o: torch.optim.Adam(groups, lr=o.lr, betas=o.betas),
    "sgd": lambda groups, o: torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum),
}


def _backbone_multiplier(step: int, *, freeze_steps: int, **schedule) -> float:
    # lr 0 is an exact freeze under every ZeRO stage: AdamW/Adam/SGD updates and decay all scale with lr.
    return 0.0 if step < freeze_steps else lr_multiplier(step, **schedule)


def detection_param_groups(objective: nn.Module, optim: OptimConfig, *, backbone_lr_scale: float) -> tuple[list[dict], list[bool]]:
    """The project's groups (weight decay, optional layer decay) of the backbone, lr scaled, then
    of the head; returns them with a per-group "is backbone" flag."""
    detector = objective.detector
    backbone = param_groups(detector.backbone, optim)
    head = param_groups(detector.head, optim.model_copy(update={"layer_decay": None}))
    if sum(len(g["params"]) for g in backbone + head) != sum(1 for p in objective.parameters() if p.requires_grad):
        raise ValueError("the detection objective has parameters outside detector.backbone and detector.head")
    groups = [{**g, "lr": g["lr"] * backbone_lr_scale} for g in backbone] + head
    return groups, [True] * len(backbone) + [False] * len(head)


def build_detection_engine(objective: nn.Module, *, optim: OptimConfig, engine: EngineConfig, micro_batch: int,
                           grad_accum_steps: int, total_steps: int, backbone_lr_scale: float, freeze_steps: int,
                           load_universal: bool = False):
    """`deepspeed.initialize` over `objective` (a `DetectionObjective`); returns the engine."""
    import deepspeed

    groups, is_backbone = detection_param_groups(objective, optim, backbone_lr_scale=backbone_lr_scale)
    optimizer = OPTIMIZERS[optim.name](groups, optim)
    schedule = dict(total_steps=total_steps, warmup_steps=optim.warmup_steps, decay=optim.decay, min_ratio=optim.min_lr_ratio)
    multipliers = [
        functools.partial(_backbone_multiplier, freeze_steps=freeze_steps, **schedule) if backbone
        else functools.partial(lr_multiplier, **schedule)
        for backbone in is_backbone
    ]
    ds_engine, *_ = deepspeed.initialize(
        model=objective, optimizer=optimizer, lr_scheduler=LambdaLR(optimizer, multipliers),
        config=deepspeed_config(engine, micro_batch=micro_batch, grad_accum_steps=grad_accum_steps, load_universal=load_universal),
    )
    return ds_engine
