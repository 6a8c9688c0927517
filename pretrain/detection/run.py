"""Detection transfer run: data -> backbone + DETR head -> DeepSpeed engine -> loop, eval, export.

Resumes from `<train.output_dir>/checkpoints/latest` when `train.resume=true` and one exists.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from data_pipeline.storage import write_atomic
from pretrain.checkpoint import Checkpointer
from pretrain.config import dump_config
from pretrain.detection.config import DetectConfig
from pretrain.detection.data import DetectionTransform, eval_loader, resolve_source, source_class_names, train_batches
from pretrain.detection.evaluate import coco_map, gather_to_main, plot_predictions, predict
from pretrain.detection.head import DETRHead
from pretrain.detection.losses import SetCriterion
from pretrain.detection.matcher import HungarianMatcher
from pretrain.detection.export import save_detector
from pretrain.detection.model import DetectionObjective, Detector, build_backbone
from pretrain.detection.optim import build_detection_engine
from pretrain.distributed import DistInfo, print0
from pretrain.engine import input_dtype, resolve_grad_accum, train_step
from pretrain.tracking import build_tracker


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


def evaluate(ds_engine, loader, *, num_classes: int, keep_images: int, progress: bool):
    """mAP over every rank's share (computed on rank 0, sent to all) and rank 0's first images."""
    predictions, truths, images = predict(ds_engine.module.detector, loader, device=ds_engine.device, dtype=input_dtype(ds_engine),
                                          keep_images=keep_images, sync=ds_engine.zero_optimization_partition_weights(),
                                          progress=progress)
    predictions, truths = gather_to_main(predictions), gather_to_main(truths)
    metrics = [coco_map(predictions, truths, num_classes) if not dist.is_initialized() or dist.get_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(metrics, src=0)
    return metrics[0], (images, predictions[: len(images)], truths[: len(images)])


def run(cfg: DetectConfig, dist_info: DistInfo) -> dict[str, float]:
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
    val_loader = eval_loader(sources["val"], transform=DetectionTransform(data.image_size, mean, std), **common)

    accum = resolve_grad_accum(cfg.engine, micro_batch=data.batch_size, world_size=dist_info.world_size)
    output_dir = Path(cfg.train.output_dir)
    checkpointer = Checkpointer(output_dir / "checkpoints", keep_last=cfg.train.keep_last, rank=dist_info.rank,
                                world_size=dist_info.world_size)
    point = checkpointer.prepare_resume() if cfg.train.resume else None
    ds_engine = build_detection_engine(
        objective, optim=cfg.optim, engine=cfg.engine, micro_batch=data.batch_size, grad_accum_steps=accum,
        total_steps=cfg.train.steps, backbone_lr_scale=cfg.backbone.lr_scale, freeze_steps=cfg.backbone.freeze_steps,
        load_universal=point is not None and point.universal,
    )
    detector = ds_engine.module.detector
    step, run_id = 0, None
    if point is not None:
        checkpointer.load(ds_engine, point)
        step, run_id = point.step, point.meta.get("run_id")
        loader.load_state_dict(point.meta["data"])
        print0(f"resumed from {point.tag} at step {step}")
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id, run_id=run_id,
        tags={"stage": "detect", "backbone": cfg.backbone.checkpoint or cfg.backbone.model},
    )
    if run_id is None:
        tracker.log_params(dump_config(cfg) | {"world_size": dist_info.world_size})

    def validate(plot: bool) -> dict[str, float]:
        metrics, (images, predictions, truths) = evaluate(
            ds_engine, val_loader, num_classes=data.num_classes, keep_images=cfg.train.plot_images if plot else 0,
            progress=dist_info.is_main)
        metrics = {f"val_{k}": v for k, v in metrics.items()}
        tracker.log_metrics(metrics, step=step)
        if plot and dist_info.is_main and len(images):
            png = plot_predictions(images, predictions, truths, output_dir / "predictions" / f"step{step:08d}.png",
                                   mean=mean, std=std, class_names=class_names, score_threshold=cfg.train.score_threshold)
            tracker.log_artifact(png, "predictions")
        return metrics

    def save() -> None:
        meta = [{"config": dump_config(cfg), "data": loader.state_dict(), "run_id": tracker.run_id}]
        dist.broadcast_object_list(meta, src=0)  # rank 0 alone knows the run id
        checkpointer.save(ds_engine, step=step, meta=meta[0])

    results: dict[str, float] = {}
    if cfg.train.eval_at_start and step == 0:
        results.update({f"{k}_at_start": v for k, v in validate(plot=False).items()})
        tracker.log_metrics(results, step=0)
    global_batch = data.batch_size * accum * dist_info.world_size
    batches = iter(loader)
    window_start, window_steps = time.perf_counter(), 0
    progress = tqdm(total=cfg.train.steps, initial=step, desc="detect", disable=not dist_info.is_main, mininterval=2)
    while step < cfg.train.steps:
        detector.train_backbone = step >= cfg.backbone.freeze_steps  # frozen: no backbone backward either
        loss, metrics = train_step(ds_engine, [next(batches) for _ in range(accum)])
        step += 1
        window_steps += 1
        progress.update(1)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            stats = torch.tensor([loss, *metrics.values()])
            dist.all_reduce(stats)
            stats /= dist_info.world_size
            logged = dict(zip(["loss", *metrics], stats.tolist()))
            logged |= {"lr": ds_engine.get_lr()[-1], "samples_per_s": window_steps * global_batch / (time.perf_counter() - window_start)}
            tracker.log_metrics(logged, step=step)
            results.update(logged)
            progress.set_postfix(loss=f"{logged['loss']:.3f}")
            window_start, window_steps = time.perf_counter(), 0
        if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.steps:
            results.update(validate(plot=False))
        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.steps:
            save()
    progress.close()
    results.update(validate(plot=True))
    save()
    checkpointer.close()
    weights = save_detector(detector, output_dir / "export" / "detector.safetensors", is_main=dist_info.is_main, meta={
        "config": dump_config(cfg), "backbone_meta": backbone_meta, "class_names": class_names,
        "mean": list(mean), "std": list(std), "run_id": tracker.run_id, "step": step,
    })
    if dist_info.is_main:
        write_atomic(output_dir / "metrics.json", json.dumps(results, indent=1).encode())
        tracker.log_artifact(weights, "detector")
        tracker.log_artifact(weights.with_suffix(".json"), "detector")
    tracker.close()
    return results
