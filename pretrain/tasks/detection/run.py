"""Detection transfer: data -> backbone + DETR head -> `Trainer` (mAP evaluator) -> export.

Resumes from `<train.output_dir>/checkpoints/latest` when `train.resume=true` and one exists
(or from `<train.remote_uri>/checkpoints/latest` when the local folder has none).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from data_pipeline.storage import join_url, write_atomic
from pretrain.config import OptimConfig, dump_config
from pretrain.tasks.detection.config import DetectConfig
from pretrain.tasks.detection.data import DetectionTransform, eval_loader, resolve_source, source_class_names, train_batches
from pretrain.tasks.detection.export import save_detector
from pretrain.tasks.detection.head import DETRHead
from pretrain.tasks.detection.losses import SetCriterion
from pretrain.tasks.detection.matcher import HungarianMatcher
from pretrain.tasks.detection.model import DetectionObjective, Detector, build_backbone
from pretrain.engine.distributed import DistInfo
from pretrain.engine.deepspeed_engine import param_groups
from pretrain.checkpoint.export import upload_exported
from pretrain.evaluation import build_evaluator
from pretrain.models.flops import flops_per_image
from pretrain.tracking.guard import check_reachable
from pretrain.tracking.tracker import build_tracker
from pretrain.trainer import Trainer


def build_objective(cfg: DetectConfig) -> tuple[DetectionObjective, dict]:
    """The detector and its loss; returns it with the backbone's export meta ({} when built fresh)."""
    backbone, meta = build_backbone(checkpoint=cfg.backbone.checkpoint, model=cfg.backbone.model, kwargs=cfg.backbone.kwargs,
                                    image_size=cfg.data.image_size, tracking_uri=cfg.tracking.tracking_uri)
    head = DETRHead(in_dim=backbone.num_features, num_classes=cfg.data.num_classes, **cfg.head.model_dump())
    loss = cfg.loss
    matcher = HungarianMatcher(cost_class=loss.cost_class, cost_bbox=loss.cost_bbox, cost_giou=loss.cost_giou)
    criterion = SetCriterion(num_classes=cfg.data.num_classes, matcher=matcher, eos_coef=loss.eos_coef,
                             ce_weight=loss.ce_weight, bbox_weight=loss.bbox_weight, giou_weight=loss.giou_weight)
    return DetectionObjective(Detector(backbone, head), criterion, aux_loss=loss.aux_loss), meta


def detection_param_groups(objective: nn.Module, optim: OptimConfig, *, backbone_lr_scale: float, freeze_steps: int) -> list[dict]:
    """The project's groups (weight decay, optional layer decay) of the backbone, lr scaled and at
    lr 0 for the first `freeze_steps`, then of the head."""
    detector = objective.detector
    backbone = param_groups(detector.backbone, optim)
    head = param_groups(detector.head, optim.model_copy(update={"layer_decay": None}))
    if sum(len(g["params"]) for g in backbone + head) != sum(1 for p in objective.parameters() if p.requires_grad):
        raise ValueError("the detection objective has parameters outside detector.backbone and detector.head")
    return [{**g, "lr": g["lr"] * backbone_lr_scale, "freeze_steps": freeze_steps} for g in backbone] + head


def run(cfg: DetectConfig, dist_info: DistInfo) -> dict[str, float]:
    check_reachable(cfg.tracking.tracking_uri)  # every rank, before any work: all stop together
    torch.manual_seed(cfg.train.seed)  # same initial head on every rank
    objective, backbone_meta = build_objective(cfg)
    data = cfg.data
    mean = data.mean or tuple(backbone_meta.get("mean", (0.5, 0.5, 0.5)))
    std = data.std or tuple(backbone_meta.get("std", (0.5, 0.5, 0.5)))
    sources = {split: resolve_source(getattr(data, split), num_classes=data.num_classes, is_main=dist_info.is_main)
               for split in ("train", "val")}
    class_names = source_class_names(sources["val"], data.num_classes)
    common = dict(num_classes=data.num_classes, max_objects=data.max_objects, batch_size=data.batch_size,
                  rank=dist_info.rank, world_size=dist_info.world_size, num_workers=data.num_workers)
    loader = train_batches(sources["train"], transform=DetectionTransform(data.image_size, mean, std, hflip=data.hflip),
                           seed=data.seed, shuffle_buffer=data.shuffle_buffer, max_bad_fraction=data.max_corrupt_fraction, **common)
    val_map = build_evaluator(
        "detection", loader=eval_loader(sources["val"], transform=DetectionTransform(data.image_size, mean, std), **common),
        num_classes=data.num_classes, class_names=class_names, mean=mean, std=std, plot_images=cfg.train.plot_images,
        score_threshold=cfg.train.score_threshold, output_dir=cfg.train.output_dir, is_main=dist_info.is_main,
        every=cfg.train.eval_every, at_start=cfg.train.eval_at_start)
    detector = objective.detector

    def freeze(step: int) -> None:  # frozen: no backbone backward either
        detector.train_backbone = step >= cfg.backbone.freeze_steps

    trainer = Trainer(
        objective, data=loader, loop=cfg.train, optim=cfg.optim, engine=cfg.engine, micro_batch=data.batch_size,
        dist_info=dist_info, config=dump_config(cfg), evaluators=[val_map], before_step=freeze, desc="detect",
        groups=detection_param_groups(objective, cfg.optim, backbone_lr_scale=cfg.backbone.lr_scale,
                                      freeze_steps=cfg.backbone.freeze_steps),
        flops_per_sample=3.0 * flops_per_image(detector, data.image_size),  # the detector's forward; the matching not counted
    )
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id, run_id=trainer.run_id,
        tags={"stage": "detect", "backbone": cfg.backbone.checkpoint or cfg.backbone.model},
    )
    if trainer.run_id is None:
        tracker.log_params(dump_config(cfg) | {"world_size": dist_info.world_size})
    results = trainer.fit(tracker)
    trainer.close()
    output_dir = Path(cfg.train.output_dir)
    weights = save_detector(detector, output_dir / "export" / "detector.safetensors", is_main=dist_info.is_main, meta={
        "config": dump_config(cfg), "backbone_meta": backbone_meta, "class_names": class_names,
        "mean": list(mean), "std": list(std), "run_id": tracker.run_id, "step": trainer.step,
    })
    if dist_info.is_main:
        write_atomic(output_dir / "metrics.json", json.dumps(results, indent=1).encode())
        tracker.log_artifact(weights, "detector")
        tracker.log_artifact(weights.with_suffix(".json"), "detector")
        if cfg.train.remote_uri:
            upload_exported(weights, join_url(cfg.train.remote_uri, "export", weights.name))
    tracker.close()
    return results
