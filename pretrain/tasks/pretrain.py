"""`python -m pretrain train --config configs/pretrain/X.yaml [key.sub=value ...]`

Parses, builds and runs: data stream -> model -> objective -> evaluators -> `Trainer` -> export.
Resumes from `<train.output_dir>/checkpoints/latest` when `train.resume=true` and one exists
(or from `<train.remote_uri>/checkpoints/latest` when the local folder has none), on any
number of ranks.
"""
from __future__ import annotations

import argparse
import functools
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from data_pipeline.loader import build_loader
from data_pipeline import storage
from pretrain.config import PretrainConfig, dump_config
from pretrain.engine.distributed import DistInfo, print0
from pretrain.evaluation import Evaluator, build_evaluator
from pretrain.checkpoint.export import export_checkpoint, upload_exported
from pretrain.models import build_model
from pretrain.objectives import build_objective
from pretrain.engine.deepspeed_engine import build_partitioned, compile_blocks
from pretrain.engine.perf import fused_attention, train_flops_per_sample
from pretrain.tracking.model_registry import registered_name
from pretrain.tracking.datasets import log_shard_datasets
from pretrain.tracking.guard import check_reachable
from pretrain.tracking.tracker import Tracker, build_tracker
from pretrain.tasks.recipe import add_recipe_arguments, run_recipe
from pretrain.trainer import Trainer


def objective_builder(cfg: PretrainConfig) -> tuple[Callable[[], nn.Module], Callable[[], nn.Module]]:
    """(build the objective, build its backbone): the one place the model is constructed."""
    build_backbone = functools.partial(build_model, cfg.model.name, num_classes=cfg.data.num_classes,
                                       grad_checkpointing=cfg.model.grad_checkpointing, **cfg.model.kwargs)

    def build_full_objective() -> nn.Module:
        return build_objective(cfg.train.objective, build_backbone(), pixel_mean=cfg.data.mean, pixel_std=cfg.data.std,
                               **cfg.train.objective_kwargs)

    return build_full_objective, build_backbone


def build_evaluators(cfg: PretrainConfig, dist_info: DistInfo, *, build_full_objective, build_backbone) -> list[Evaluator]:
    """Validation every `train.eval_every` steps and at the end, few-shot and visualization at their cadences."""
    train, rank, world = cfg.train, dist_info.rank, dist_info.world_size
    evaluators = []
    if cfg.data.val_urls:
        loader = build_loader(cfg.data, rank=rank, world_size=world, urls=cfg.data.val_urls, train=False)
        evaluators.append(build_evaluator("validation", loader=loader, every=train.eval_every))
    if train.fewshot is not None:
        evaluators.append(build_evaluator(
            "fewshot", fewshot=train.fewshot, build_backbone=build_backbone, is_main=dist_info.is_main,
            image_size=cfg.data.image_size, mean=cfg.data.mean, std=cfg.data.std, every=train.fewshot.every, final=False))
    if train.visualize_every:
        images = None
        if dist_info.is_main:  # a fixed batch, augmentation off, outside the training stream
            vis_loader = build_loader(cfg.data, rank=0, world_size=1, urls=cfg.data.val_urls or cfg.data.train_urls, train=False)
            images = next(iter(vis_loader))[0][:8]
        evaluators.append(build_evaluator("visualize", images=images, build_objective=build_full_objective,
                                          output_dir=train.output_dir, is_main=dist_info.is_main,
                                          every=train.visualize_every, final=False))
    return evaluators


def export(cfg: PretrainConfig, trainer: Trainer, tracker: Tracker) -> None:
    """Rank 0: the model (and the EMA) as safetensors, logged to MLflow and mirrored to S3."""
    output_dir = Path(cfg.train.output_dir)
    for weights in ("model", "ema") if cfg.train.ema is not None else ("model",):
        name = "model.safetensors" if weights == "model" else "model_ema.safetensors"
        exported = Path(export_checkpoint(trainer.checkpoint_dir, output_dir / "export" / name, weights=weights))
        tracker.log_artifact(exported, "model")
        tracker.log_artifact(exported.with_suffix(".json"), "model")
        if cfg.train.remote_uri:
            upload_exported(exported, storage.join_url(cfg.train.remote_uri, "export", exported.name))
        print0(f"exported {exported}")


def run(cfg: PretrainConfig, dist_info: DistInfo) -> dict[str, float]:
    check_reachable(cfg.tracking.tracking_uri)  # every rank, before any work: all stop together
    torch.manual_seed(cfg.train.seed)  # same initial weights on every rank
    loader = build_loader(cfg.data, rank=dist_info.rank, world_size=dist_info.world_size, urls=cfg.data.train_urls, train=True)
    build_full_objective, build_backbone = objective_builder(cfg)
    objective = build_partitioned(build_full_objective, cfg.engine, micro_batch=cfg.data.batch_size)  # zero.Init at ZeRO-3
    if cfg.train.visualize_every and not callable(getattr(objective, "visualize", None)):
        raise ValueError(f"train.visualize_every needs an objective with visualize(images); {cfg.train.objective!r} has none")
    flops_per_sample = train_flops_per_sample(objective, cfg.data.image_size)
    evaluators = build_evaluators(cfg, dist_info, build_full_objective=build_full_objective, build_backbone=build_backbone)
    trainer = Trainer(objective, data=loader, loop=cfg.train, optim=cfg.optim, engine=cfg.engine, micro_batch=cfg.data.batch_size,
                      dist_info=dist_info, config=dump_config(cfg), evaluators=evaluators, flops_per_sample=flops_per_sample)
    if cfg.model.compile:
        compile_blocks(trainer.engine.module)
    tracker = build_tracker(
        is_main=dist_info.is_main, tracking_uri=cfg.tracking.tracking_uri, experiment=cfg.tracking.experiment,
        run_name=cfg.tracking.run_name, parent_run_id=cfg.tracking.parent_run_id, run_id=trainer.run_id,
        tags={"stage": "pretrain", "model": cfg.model.name},
    )
    if trainer.run_id is None:
        tracker.log_params(dump_config(cfg) | {"flops_per_sample": flops_per_sample, "fused_attn": fused_attention(objective)})
        log_shard_datasets(tracker, train=cfg.data.train_urls, val=cfg.data.val_urls)
    final = trainer.fit(tracker)
    if dist_info.is_main:
        export(cfg, trainer, tracker)
        tracker.register_model(registered_name(cfg.tracking.registered_model, cfg.model.name), model=cfg.model.name, step=trainer.step)
    trainer.close()
    tracker.close()
    return final


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, example="configs/pretrain/demo_fmnist.yaml")


def main(args: argparse.Namespace) -> int:
    return run_recipe(PretrainConfig, args, run)
